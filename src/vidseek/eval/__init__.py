"""Evaluation: tie-safe retrieval metrics, TRECVID inferred AP, paper-style reports, plots.

Importing this package pulls in numpy only; matplotlib is imported inside the plot functions.
"""
from __future__ import annotations

from vidseek.eval.metrics import (
    MetricInputError,
    average_precision,
    dual_softmax,
    gt_ranks,
    inferred_ap,
    mean_inferred_ap,
    read_sampled_qrels,
    recall_at,
    recall_metrics,
    retrieval_report,
)
from vidseek.eval.plots import plot_histogram, plot_recall_curves, plot_training_curve, read_training_log
from vidseek.eval.report import format_table, write_report

__all__ = [
    "MetricInputError",
    "average_precision",
    "dual_softmax",
    "format_table",
    "gt_ranks",
    "inferred_ap",
    "mean_inferred_ap",
    "plot_histogram",
    "plot_recall_curves",
    "plot_training_curve",
    "read_sampled_qrels",
    "read_training_log",
    "recall_at",
    "recall_metrics",
    "retrieval_report",
    "write_report",
]
