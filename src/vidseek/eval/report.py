"""Evaluation reports: paper-style tables and a JSON record of the numbers AND how they were made.

USERS.md pain point 1 ("I cannot reproduce R@1"): the causes people found were batch size,
frame sampling, precision, split confusion, silent post-processing and checkpoints picked on
test. So `write_report` refuses to write a report that does not state frames, fps, batch,
precision, split, post-processing and checkpoint, and post-processed numbers (DSL) appear as
their own labelled table rows (METHODS.md, "Evaluation protocol").
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from vidseek.errors import ConfigError
from vidseek.utils import atomic_write_json

__all__ = [
    "REPORT_NAME",
    "REQUIRED_SETTINGS",
    "TABLE_COLUMNS",
    "ci_cells",
    "format_comparison",
    "format_intervals",
    "format_table",
    "read_outcomes",
    "write_report",
]

# What a reader needs to reproduce a retrieval number (USERS.md pain point 1).
REQUIRED_SETTINGS = ("frames", "fps", "batch", "precision", "split", "post_processing", "checkpoint")

DIRECTION_COLUMNS = ("R@1", "R@5", "R@10", "MdR", "MnR", "RSum")
# (flat metric key, header) in table order: T2V block | V2T block | SumR.
TABLE_COLUMNS = tuple(
    (f"{direction}.{name}", name) for direction in ("t2v", "v2t") for name in DIRECTION_COLUMNS
) + (("SumR", "SumR"),)

CELL_WIDTH = 7


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(CELL_WIDTH)
    return f"{float(value):.1f}".rjust(CELL_WIDTH)


def format_table(rows: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """Fixed-width table in the layout of the papers' result tables, one row per named result.

    Columns: ``T2V R@1 R@5 R@10 MdR MnR RSum | V2T R@1 R@5 R@10 MdR MnR RSum | SumR``, values with
    one decimal, ``-`` where a row lacks a metric (e.g. a T2V-only run). Rows are the flat dicts of
    `vidseek.eval.metrics.retrieval_report`, keyed by a name such as ``"seqTransf"`` or
    ``"seqTransf + DSL"``.
    """
    if not rows:
        raise ConfigError("no results to tabulate; evaluate at least one model before formatting a table")
    name_width = max(len("Method"), *(len(name) for name in rows))
    direction_width = len(DIRECTION_COLUMNS) * CELL_WIDTH

    def line(name: str, cells: list[str]) -> str:
        t2v, v2t, sumr = cells[:6], cells[6:12], cells[12]
        return f"{name:<{name_width}} |{''.join(t2v)} |{''.join(v2t)} |{sumr}"

    group_header = f"{'':<{name_width}} |{'Text->Video':^{direction_width}} |{'Video->Text':^{direction_width}} |{'':>{CELL_WIDTH}}"
    header = line("Method", [h.rjust(CELL_WIDTH) for _, h in TABLE_COLUMNS])
    rule = "-" * len(header)
    body = [line(name, [_cell(metrics.get(key)) for key, _ in TABLE_COLUMNS]) for name, metrics in rows.items()]
    lines = ([title] if title else []) + [group_header, header, rule] + body
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """numpy scalars/arrays and paths → JSON-native python values (recursively)."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(path: str | Path, results: Mapping[str, Any], settings: Mapping[str, Any],
                 per_query: Mapping[str, Any] | None = None) -> None:
    """Atomically write ``{"metrics": results, "settings": settings, "vidseek_version": ...}`` as JSON.

    ``per_query`` (`QueryOutcomes.to_json()`: each query's rank and hard-negative pair outcomes)
    is stored under ``"per_query"`` so `vidseek compare` can pair two reports query by query.

    ``results`` are flat metric dicts (or name → flat dict for several labelled rows, e.g. with and
    without DSL). ``settings`` must name every entry of `REQUIRED_SETTINGS` (frames, fps, batch,
    precision, split, post_processing, checkpoint); use ``None`` for one that does not apply, so a
    missing setting is a decision, never an omission.
    """
    missing = [key for key in REQUIRED_SETTINGS if key not in settings]
    if missing:
        raise ConfigError(
            f"evaluation report settings lack {', '.join(missing)}; record them (None if not applicable) "
            "so the numbers can be reproduced"
        )
    from vidseek.version import __version__

    report = {"metrics": _plain(results), "settings": _plain(settings), "vidseek_version": __version__}
    if per_query is not None:
        report["per_query"] = _plain(per_query)
    atomic_write_json(path, report)


# The report `vidseek eval` writes into a run folder, so `vidseek compare runA runB` finds it.
REPORT_NAME = "eval-{split}.json"


def read_outcomes(path: str | Path, split: str = "test"):
    """The per-query outcomes (`QueryOutcomes`) of a report file, or of a run folder's
    ``eval-<split>.json``; a clear error when the report lacks them."""
    import json

    from vidseek.eval.bootstrap import QueryOutcomes

    path = Path(path)
    if path.is_dir():
        path = path / REPORT_NAME.format(split=split)
        if not path.is_file():
            raise ConfigError(f"{path} not found: run `vidseek eval {path.parent} --data ... --split {split}` first")
    if not path.is_file():
        raise ConfigError(f"evaluation report {path} not found: pass a report written by `vidseek eval --json` or a run folder")
    try:
        report = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}); re-run `vidseek eval`") from None
    if not isinstance(report, dict) or "per_query" not in report:
        raise ConfigError(f"{path} has no per-query outcomes (written by an older vidseek or another tool); "
                          "re-run `vidseek eval` to rewrite it")
    return QueryOutcomes.from_json(report["per_query"], str(path))


def format_intervals(intervals: Mapping[str, Any], level: float = 0.95) -> str:
    """One line per metric: ``name  value  [low, high]`` (`Interval`s from `metric_intervals`)."""
    width = max((len(name) for name in intervals), default=0)
    head = f"{'metric':<{width}}  {'value':>7}  {int(round(100 * level))}% CI"
    lines = [head] + [f"{name:<{width}}  {iv.value:7.1f}  [{iv.low:.1f}, {iv.high:.1f}]" for name, iv in intervals.items()]
    return "\n".join(lines)


def format_comparison(deltas: Mapping[str, Mapping[str, float]], a_label: str, b_label: str,
                      level: float = 0.95) -> str:
    """Table of A, B, Δ = A − B and its paired-bootstrap interval per metric (from `compare_runs`);
    a ``*`` marks intervals that exclude 0."""
    width = max([len("metric")] + [len(name) for name in deltas])
    pct = int(round(100 * level))
    lines = [f"A = {a_label}", f"B = {b_label}",
             f"{'metric':<{width}}  {'A':>7}  {'B':>7}  {'A-B':>7}  {pct}% CI of A-B"]
    for name, d in deltas.items():
        mark = " *" if d["low"] > 0 or d["high"] < 0 else ""
        lines.append(f"{name:<{width}}  {d['a']:7.1f}  {d['b']:7.1f}  {d['delta']:+7.1f}  "
                     f"[{d['low']:+.1f}, {d['high']:+.1f}]{mark}")
    return "\n".join(lines)


def ci_cells(results: Mapping[str, Mapping[str, float]], keys: list[str] | tuple[str, ...]) -> list[str]:
    """Markdown cells ``value [low, high]`` per key of `summarize_runs` (mean) or `compare_runs`
    (signed Δ) results; ``-`` for a metric the results lack."""
    cells = []
    for key in keys:
        r = results.get(key)
        if r is None:
            cells.append("-")
        elif "delta" in r:
            cells.append(f"{r['delta']:+.1f} [{r['low']:+.1f}, {r['high']:+.1f}]")
        else:
            cells.append(f"{r['mean']:.1f} [{r['low']:.1f}, {r['high']:.1f}]")
    return cells
