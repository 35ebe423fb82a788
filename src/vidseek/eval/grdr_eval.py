"""`vidseek eval` for GRDR runs: generative recall quality and the recall → rerank cascade.

Protocol (METHODS.md "GRDR … Inference", the release's "test-only pool"): the gallery is the
evaluated split's videos. Their dense index vectors (the dense run the GRDR run was trained on)
are tokenized into semantic IDs, a trie is built over all (video, view) IDs, and every query's
trie-constrained beam search (`beams` beams) returns a candidate set C_q. Reported:

* recall quality — candidate hit rate (ground truth ∈ C_q), candidate-set size statistics, and
  the dense model's own top-|C_q| hit rate with the SAME candidate count per query (what a dense
  index would have delivered for the same rerank budget);
* tokenizer health — view diversity (the release's known view collapse) and codebook usage per
  level, and the bytes per video of the semantic-ID index;
* the cascade — GRDR recall → rerank (`rerank` checkpoint, default the dense model itself)
  T2V R@1/5/10 vs full-corpus reranking with the same reranker, with per-query CPU/GPU time of
  each (query encoding included, video encoding offline for both), so "cascade R@1 ≥ 95 % of
  full-corpus R@1" is read off `cascade.R@1_vs_full` directly.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vidseek.errors import ConfigError, DatasetError

__all__ = ["cascade_ranks", "format_grdr_report", "plot_grdr_diagnostics", "run_grdr_eval"]


def cascade_ranks(scores_per_query: Sequence[np.ndarray], candidates: Sequence[Sequence[int]],
                  ground_truth: Sequence[int]) -> np.ndarray:
    """1-based rank of each query's ground-truth video after reranking its candidates only.

    `scores_per_query[q][j]` is the reranker's score of candidate `candidates[q][j]`. Ties count
    against the ground truth (as `gt_ranks`' pessimistic default). A query whose ground truth
    was not recalled gets rank +inf (a miss at every K)."""
    ranks = np.full(len(candidates), np.inf)
    for q, (scores, cands, gt) in enumerate(zip(scores_per_query, candidates, ground_truth)):
        cands = list(cands)
        if gt not in cands:
            continue
        at = cands.index(gt)
        others = np.delete(np.asarray(scores, dtype=np.float64), at)
        ranks[q] = 1 + int(np.count_nonzero(others >= float(scores[at])))
    return ranks


def _recall_at(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    from vidseek.eval.metrics import recall_at

    return {f"R@{k}": recall_at(ranks, k) for k in ks}


@torch.no_grad()
def _rerank_cascade(reranker: Any, text: Any, video: Any, candidates: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Reranker scores of each query's candidates only (one forward per query)."""
    from vidseek.models.base import tree_map, tree_slice, tree_to

    model = reranker.model
    out = []
    for q, cands in enumerate(candidates):
        if not cands:
            out.append(np.zeros(0, np.float32))
            continue
        idx = torch.as_tensor(list(cands), dtype=torch.long, device=model.device)
        subset = tree_map(lambda t: t.index_select(0, idx), video)
        out.append(model.score(tree_to(tree_slice(text, q, q + 1), model.device), subset)[0].float().cpu().numpy())
    return out


def _per_level(prefix: str, values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    return {f"{prefix}.l{level + 1}": scale * float(v) for level, v in enumerate(values)}


def format_grdr_report(metrics: dict[str, float], title: str = "") -> str:
    """A readable plain-text table of `run_grdr_eval`'s metrics."""
    levels = sorted({int(k.rsplit(".l", 1)[1]) for k in metrics if k.startswith("grdr.views.same_code.l")})

    def per_level(key: str) -> str:
        return " / ".join(f"{metrics[f'{key}.l{lv}']:.1f}" for lv in levels)

    lines = [title] if title else []
    lines += [
        f"gallery {int(metrics['num_videos'])} videos, {int(metrics['num_queries'])} queries, beams {int(metrics['beams'])}",
        "",
        "recall                         | hit rate % | candidates mean / median / max",
        "-------------------------------+------------+--------------------------------",
        f"GRDR generative recall         | {metrics['grdr.hit_rate']:10.1f} | "
        f"{metrics['grdr.candidates.mean']:.1f} / {metrics['grdr.candidates.median']:.0f} / {metrics['grdr.candidates.max']:.0f}",
        f"dense top-|C| (same size/query)| {metrics['dense.hit_rate_same_size']:10.1f} | (same sets' sizes)",
        "",
        "T2V after rerank               |    R@1 |    R@5 |   R@10 | ms/query",
        "-------------------------------+--------+--------+--------+---------",
        f"cascade: GRDR → rerank         | {metrics['cascade.R@1']:6.1f} | {metrics['cascade.R@5']:6.1f} | "
        f"{metrics['cascade.R@10']:6.1f} | {metrics['cascade.ms_per_query']:8.2f}",
        f"full corpus rerank             | {metrics['full.R@1']:6.1f} | {metrics['full.R@5']:6.1f} | "
        f"{metrics['full.R@10']:6.1f} | {metrics['full.ms_per_query']:8.2f}",
        f"cascade R@1 / full-corpus R@1: {metrics['cascade.R@1_vs_full']:.1f}% "
        f"(GRDR recall alone {metrics['grdr.recall_ms_per_query']:.2f} ms/query)",
        "",
        f"views with identical code per level % (l1 / l2 / ...): {per_level('grdr.views.same_code')}",
        f"views with identical ID prefix per level %:           {per_level('grdr.views.same_prefix')}",
        f"codebook used % per level:                            {per_level('grdr.codebook.used')}",
        f"codebook perplexity per level:                        {per_level('grdr.codebook.perplexity')}",
        f"bytes per video: semantic IDs {metrics['grdr.bytes_per_video']:.0f} "
        f"(whole trie {metrics['grdr.index_bytes_per_video']:.1f}), dense float32 vector {metrics['dense.bytes_per_video']:.0f}",
    ]
    return "\n".join(lines)


def run_grdr_eval(checkpoint: str | Path, data: str | Path, *, split: str = "test", beams: int | None = None,
                  rerank: str | None = None, json_out: str | Path | None = None, device: str | None = None,
                  progress: bool = True, echo: bool = True) -> dict[str, float]:
    """Evaluate a GRDR run on `split` (gallery = that split's videos). See the module docstring.

    `beams` defaults to the preset's test-only-pool width. Prints a table (with `echo`), writes
    the report JSON (`json_out`, `vidseek.eval.report.write_report`) and the candidate-size
    histogram PNG next to it (or into the run folder when no JSON is asked for). Returns the
    flat metrics."""
    from vidseek.eval.metrics import gt_ranks
    from vidseek.eval.plots import plot_histogram
    from vidseek.eval.report import write_report
    from vidseek.eval.runner import encode_texts, encode_videos, similarity_matrix
    from vidseek.models.grdr import codebook_usage, view_diversity
    from vidseek.models.base import tree_to
    from vidseek.search.indexer import load_checkpoint_model
    from vidseek.train.grdr_run import (index_vectors, model_source, load_grdr_run, recall_candidates,
                                        recall_summary, split_queries)
    from vidseek.train.loop import load_split
    from vidseek.utils import default_device

    device = device or default_device()
    run = load_grdr_run(checkpoint, device)
    beams = run.beams if beams is None else int(beams)
    if beams < 1:
        raise ConfigError(f"--beams must be at least 1, got {beams}")
    dense = run.dense
    reranker = dense if rerank is None else load_checkpoint_model(rerank, device)
    dataset = load_split(run.preset, data, split)
    dense_src = model_source(dense, dataset, progress)
    rerank_src = dense_src if reranker is dense else model_source(reranker, dataset, progress)
    usable = sorted(set(dense_src.usable) & set(rerank_src.usable))
    texts, truth = split_queries(dataset, usable)
    if not texts:
        raise DatasetError(f"no decodable videos with captions in the {split} split of {data}")

    # Offline for both sides: gallery vectors / representations.
    vectors = index_vectors(dense, dense_src, usable)
    rerank_video = tree_to(encode_videos(reranker.model, rerank_src, usable), reranker.model.device)

    # Recall: GRDR candidates; dense top-|C_q| with the same count per query.
    candidates, codes, trie, recall_s = recall_candidates(run.model, vectors, texts, beams)
    metrics: dict[str, float] = {"num_videos": float(len(usable)), "num_queries": float(len(texts)),
                                 "num_videos_failed": float(len(dataset.records) - len(usable)), "beams": float(beams)}
    metrics.update(recall_summary(candidates, truth))
    dense_text = encode_texts(dense.model, texts, dense.words)
    with torch.no_grad():
        dense_sim = (dense.model.index_text(tree_to(dense_text, dense.model.device)).float().cpu() @ vectors.t()).numpy()
    sizes = np.array([len(c) for c in candidates])
    metrics["dense.hit_rate_same_size"] = 100.0 * float(np.mean(gt_ranks(dense_sim, truth) <= sizes))
    metrics["grdr.recall_ms_per_query"] = 1000.0 * recall_s / len(texts)

    # Tokenizer health and index size.
    diversity = view_diversity(codes)
    usage = codebook_usage(codes, run.model.config.codebook_size)
    metrics.update(_per_level("grdr.views.same_code", diversity["same_code"], 100.0))
    metrics.update(_per_level("grdr.views.same_prefix", diversity["same_prefix"], 100.0))
    metrics.update(_per_level("grdr.codebook.used", usage["used_fraction"], 100.0))
    metrics.update(_per_level("grdr.codebook.perplexity", usage["perplexity"]))
    metrics["grdr.bytes_per_video"] = float(trie.bytes_per_video)
    metrics["grdr.index_bytes_per_video"] = trie.total_bytes / len(usable)
    metrics["grdr.distinct_ids"] = float(trie.num_ids)
    metrics["dense.bytes_per_video"] = float(vectors.shape[1] * 4)

    # Cascade vs full-corpus reranking with the same reranker (query encoding timed in both).
    began = time.perf_counter()
    rerank_text = encode_texts(reranker.model, texts, reranker.words)
    text_s = time.perf_counter() - began
    began = time.perf_counter()
    cascade_scores = _rerank_cascade(reranker, rerank_text, rerank_video, candidates)
    cascade_s = time.perf_counter() - began
    began = time.perf_counter()
    full_sim = similarity_matrix(reranker.model, rerank_text, rerank_video)
    full_s = time.perf_counter() - began
    for name, value in _recall_at(cascade_ranks(cascade_scores, candidates, truth)).items():
        metrics[f"cascade.{name}"] = value
    for name, value in _recall_at(gt_ranks(full_sim, truth)).items():
        metrics[f"full.{name}"] = value
    metrics["cascade.ms_per_query"] = 1000.0 * (recall_s + text_s + cascade_s) / len(texts)
    metrics["full.ms_per_query"] = 1000.0 * (text_s + full_s) / len(texts)
    metrics["cascade.R@1_vs_full"] = 100.0 * metrics["cascade.R@1"] / metrics["full.R@1"] if metrics["full.R@1"] else float("nan")

    title = f"{run.preset.name} on {data} [{split}], rerank {Path(reranker.checkpoint).parent.name}/{Path(reranker.checkpoint).name}"
    if echo:
        print(format_grdr_report(metrics, title))
    png = (Path(json_out).with_name(Path(json_out).stem + "_candidates.png") if json_out
           else Path(run.checkpoint).parent / f"grdr_candidates_{split}.png")
    plot_histogram(sizes, png, title=f"GRDR candidate-set size ({split}, beams {beams})", xlabel="candidates per query")
    if json_out:
        settings = {"preset": run.preset.name, "checkpoint": run.checkpoint, "step": run.payload.get("step"),
                    "split": split, "frames": dense.frames, "fps": None, "words": dense.words,
                    "batch": run.preset.train.batch_size, "precision": "fp32", "post_processing": "none",
                    "protocol": "test-only pool: gallery = the split's videos", "beams": beams,
                    "dense_checkpoint": dense.checkpoint, "rerank_checkpoint": reranker.checkpoint,
                    "candidate_histogram": str(png), "device": str(device),
                    "timing": "wall clock per query, query encoding included, video encoding offline"}
        write_report(json_out, metrics, settings)
    return metrics


def plot_grdr_diagnostics(run_dir: str | Path, out_png: str | Path) -> None:
    """Training diagnostics of a GRDR run in one PNG: loss per phase, code drift per loop, view
    collapse (share of videos whose views share a full ID) and codebook usage per loop."""
    import json

    from vidseek.eval.plots import _new_figure, _save
    from vidseek.train.checkpoint import read_checkpoint
    from vidseek.train.grdr_run import STEP_LOG

    run_dir = Path(run_dir)
    payload = read_checkpoint(run_dir)
    history = payload.get("history") or {}
    if payload["preset"].get("model") != "grdr" or not history.get("steps"):
        raise ConfigError(f"{run_dir} is not a finished GRDR run (no training history); pass a *-grdr-* run folder")
    log_path = run_dir / STEP_LOG
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    figure = _new_figure(11.0, 7.5)
    loss_ax, drift_ax, view_ax, usage_ax = (figure.add_subplot(2, 2, i) for i in range(1, 5))
    if records:
        loss_ax.plot(np.arange(len(records)), [r["loss"] for r in records], lw=0.8)
        edges = [i for i in range(1, len(records)) if (records[i]["loop"], records[i]["phase"])
                 != (records[i - 1]["loop"], records[i - 1]["phase"])]
        for edge in edges:
            loss_ax.axvline(edge, color="grey", lw=0.5, alpha=0.5)
        loss_ax.set_xlabel("step (all phases; grey lines = phase boundaries)")
    else:
        phases = history["steps"]
        loss_ax.plot(np.arange(len(phases)), [p["loss"] for p in phases], marker="o")
        loss_ax.set_xlabel("phase")
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("GRDR training loss")
    for entry in history.get("drift", []):
        drift_ax.bar([f"loop {entry['loop'] + 1} l{j + 1}" for j in range(len(entry["per_level"]))],
                     [100 * v for v in entry["per_level"]])
    drift_ax.set_ylabel("% videos whose code changed")
    drift_ax.set_title("code drift between loops")
    drift_ax.tick_params(axis="x", labelsize=7)
    loops = [d["loop"] + 1 for d in history.get("diversity", [])]
    view_ax.plot(loops, [100 * d["same_prefix"][-1] for d in history.get("diversity", [])], marker="o",
                 label="all views share the full ID")
    view_ax.plot(loops, [100 * d["same_code"][-1] for d in history.get("diversity", [])], marker="s",
                 label="all views share the newest code")
    view_ax.set_xticks(loops)
    view_ax.set_xlabel("loop (ID length)")
    view_ax.set_ylabel("% of training videos")
    view_ax.set_ylim(0, 100)
    view_ax.set_title("view collapse")
    view_ax.legend(fontsize=8)
    for entry in history.get("usage", []):
        usage_ax.plot(np.arange(1, len(entry["used_fraction"]) + 1), [100 * u for u in entry["used_fraction"]],
                      marker="o", label=f"after loop {entry['loop'] + 1}")
    usage_ax.set_xticks(np.arange(1, len(history["usage"][-1]["used_fraction"]) + 1) if history.get("usage") else [])
    usage_ax.set_xlabel("level")
    usage_ax.set_ylabel("% of codes used")
    usage_ax.set_ylim(0, 105)
    usage_ax.set_title("codebook usage")
    usage_ax.legend(fontsize=8)
    _save(figure, out_png)
