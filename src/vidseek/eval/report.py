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

__all__ = ["REQUIRED_SETTINGS", "TABLE_COLUMNS", "format_table", "write_report"]

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


def write_report(path: str | Path, results: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """Atomically write ``{"metrics": results, "settings": settings, "vidseek_version": ...}`` as JSON.

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

    atomic_write_json(
        path, {"metrics": _plain(results), "settings": _plain(settings), "vidseek_version": __version__}
    )
