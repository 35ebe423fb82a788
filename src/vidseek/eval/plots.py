"""Plots for evaluation and training: R@K curves, training curves, histograms.

Each function draws on its own ``matplotlib.figure.Figure`` with an Agg canvas chosen inside the
function, never through ``pyplot``: importing this module does not import matplotlib, and a
caller's global backend (an interactive session, a notebook) is left untouched. Files are
written atomically; the format follows the path's suffix (PNG when there is none).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vidseek.errors import ConfigError, DatasetError
from vidseek.eval.metrics import recall_at
from vidseek.utils import atomic_path

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_histogram", "plot_recall_curves", "plot_training_curve", "read_training_log"]


def _new_figure(width: float = 6.4, height: float = 4.2) -> "Figure":
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)  # binds the Agg canvas to this figure only
    return figure


def _save(figure: "Figure", path: str | Path) -> None:
    path = Path(path)
    image_format = path.suffix.lstrip(".").lower() or "png"
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=image_format)


def plot_recall_curves(
    ranks_by_name: Mapping[str, np.ndarray], path: str | Path, max_k: int = 50, title: str = ""
) -> None:
    """R@K (%) against K = 1..max_k, one line per named set of 1-based ground-truth ranks."""
    if not ranks_by_name:
        raise ConfigError("no ranks to plot; pass at least one named rank array")
    if max_k < 1:
        raise ConfigError(f"max_k must be at least 1, got {max_k}")
    ks = np.arange(1, max_k + 1)
    figure = _new_figure()
    axes = figure.add_subplot()
    for name, ranks in ranks_by_name.items():
        axes.plot(ks, [recall_at(ranks, int(k)) for k in ks], label=name)
    axes.set_xlabel("K")
    axes.set_ylabel("R@K (%)")
    axes.set_xlim(1, max_k)
    axes.set_ylim(0, 100)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    if title:
        axes.set_title(title)
    _save(figure, path)


def read_training_log(log_jsonl: str | Path) -> list[dict]:
    """The records of a JSON-lines training log.

    A run killed mid-write can leave a truncated last line; that one line is skipped. A broken
    line anywhere else is an error naming the file and line.
    """
    log_jsonl = Path(log_jsonl)
    if not log_jsonl.is_file():
        raise DatasetError(f"training log {log_jsonl} not found; pass the run's log.jsonl")
    lines = log_jsonl.read_text().splitlines()
    records = []
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if line_number == len(lines):
                break  # truncated final write of a crashed run
            raise DatasetError(f"{log_jsonl}:{line_number} is not valid JSON; fix or delete that line") from None
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_training_curve(
    log_jsonl: str | Path, path: str | Path, keys: Sequence[str] = ("loss", "val.t2v.R@1")
) -> None:
    """One panel per key, value against ``step``, from a JSON-lines training log.

    Training lines look like ``{"step": 10, "epoch": 0, "loss": 3.2, "lr": 1e-4}``; evaluation
    lines like ``{"step": 100, "val.t2v.R@1": 12.5}``. Each key is drawn from the lines that hold
    it, so sparse evaluation points and dense loss points share the step axis.
    """
    if not keys:
        raise ConfigError("no log keys to plot; name at least one, e.g. loss")
    records = read_training_log(log_jsonl)
    series: dict[str, tuple[list[float], list[float]]] = {}
    for key in keys:
        points = [
            (float(r["step"]), float(r[key]))
            for r in records
            if key in r and "step" in r and isinstance(r[key], (int, float)) and not isinstance(r[key], bool)
        ]
        if not points:
            available = sorted({k for r in records for k in r if k != "step"})
            raise ConfigError(
                f"training log {log_jsonl} has no values for {key!r}; available keys: {', '.join(available) or 'none'}"
            )
        steps, values = zip(*points)
        series[key] = (list(steps), list(values))

    figure = _new_figure(6.4, 2.4 * len(keys) + 0.6)
    panels = figure.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
    for axes, (key, (steps, values)) in zip(panels, series.items()):
        marker = "o" if len(steps) <= 30 else None  # sparse eval points stay visible
        axes.plot(steps, values, marker=marker, markersize=3)
        axes.set_ylabel(key)
        axes.grid(True, alpha=0.3)
    panels[-1].set_xlabel("step")
    figure.suptitle(Path(log_jsonl).parent.name or Path(log_jsonl).name)
    _save(figure, path)


def plot_histogram(values: Iterable[float], path: str | Path, title: str, xlabel: str) -> None:
    """Histogram of ``values`` (e.g. GRDR candidate-set sizes per query), with the median marked.

    Integer data with a small range gets one bin per integer, so counts are not split across bins.
    """
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        raise ConfigError(f"no values to draw a histogram of for {title!r}")
    if not np.isfinite(data).all():
        raise ConfigError(f"histogram {title!r} got NaN or infinite values; drop them first")
    low, high = float(data.min()), float(data.max())
    if np.all(data == np.round(data)) and high - low <= 100:
        bins: int | str | np.ndarray = np.arange(math.floor(low), math.floor(high) + 2) - 0.5
    else:
        bins = "auto"
    figure = _new_figure()
    axes = figure.add_subplot()
    axes.hist(data, bins=bins, color="tab:blue", alpha=0.8)
    median = float(np.median(data))
    axes.axvline(median, color="tab:red", linestyle="--", label=f"median {median:g}")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("count")
    axes.set_title(title)
    axes.legend()
    _save(figure, path)
