"""Evaluate a model on a dataset split: encode queries and videos, score blockwise, report.

The similarity matrix is computed in query blocks so its peak memory is bounded by
`block_queries × num_videos` (USERS.md pain point 5: an eval matrix that asked for 2 TB).
Videos that could not be decoded are excluded from the gallery and counted in the report
(`num_videos_failed`) rather than silently scored as zeros.

On the synthetic benchmark, the hard-negative subset is reported separately: for every query
whose video has an order-swapped (or one-attribute-changed) partner, the share of queries that
score their own video strictly above the partner (`hardneg.order.acc`, `hardneg.attribute.acc`).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from vidseek.models.base import RetrievalModel, tree_cat, tree_to


@torch.no_grad()
def encode_texts(model: RetrievalModel, texts: Sequence[str], context_length: int, batch_size: int = 256):
    parts = []
    for i in range(0, len(texts), batch_size):
        tokens = model.clip.tokenize(list(texts[i:i + batch_size]), context_length=context_length).to(model.device)
        parts.append(tree_to(model.encode_text(tokens), "cpu"))
    return tree_cat(parts)


@torch.no_grad()
def encode_videos(model: RetrievalModel, source, indices: Sequence[int], batch_size: int = 32):
    parts = []
    for i in range(0, len(indices), batch_size):
        feats = source.features(model, list(indices[i:i + batch_size]))
        parts.append(tree_to(model.encode_video_features(feats), "cpu"))
    return tree_cat(parts)


@torch.no_grad()
def similarity_matrix(model: RetrievalModel, text, video, block_queries: int = 256) -> np.ndarray:
    """[num_queries, num_videos] float32, scored `block_queries` queries at a time."""
    from vidseek.models.base import tree_slice

    num_queries = text.sentence.shape[0]
    device = model.device
    video_dev = tree_to(video, device)
    blocks = []
    for i in range(0, num_queries, block_queries):
        t = tree_to(tree_slice(text, i, i + block_queries), device)
        blocks.append(model.score(t, video_dev).float().cpu().numpy())
    return np.concatenate(blocks, axis=0) if blocks else np.zeros((0, 0), np.float32)


def hard_negative_metrics(sim: np.ndarray, query_video: Sequence[int], video_ids: Sequence[str],
                          records_meta: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Pairwise accuracy of own video vs each hard-negative partner, per kind, and R@1 within
    the queries that have an order-swapped partner."""
    column = {vid: j for j, vid in enumerate(video_ids)}
    wins: dict[str, list[bool]] = {}
    order_queries = []
    for q, v in enumerate(query_video):
        for partner in records_meta[v].get("hard_negatives", []) or []:
            j = column.get(partner["video_id"])
            if j is None:
                continue
            wins.setdefault(partner["kind"], []).append(bool(sim[q, v] > sim[q, j]))
            if partner["kind"] == "order":
                order_queries.append(q)
    out: dict[str, float] = {}
    for kind, w in sorted(wins.items()):
        out[f"hardneg.{kind}.acc"] = 100.0 * float(np.mean(w))
        out[f"hardneg.{kind}.pairs"] = float(len(w))
    if order_queries:
        from vidseek.eval.metrics import gt_ranks

        qs = sorted(set(order_queries))
        ranks = gt_ranks(sim[qs], [query_video[q] for q in qs])
        out["hardneg.order.t2v.R@1"] = 100.0 * float(np.mean(ranks <= 1))
    return out


def evaluate_model(model: RetrievalModel, dataset, source, context_length: int, *, dsl: bool = False,
                   batch_size: int = 32, ranks_out: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Full T2V/V2T report on `dataset` (a RetrievalDataset) with videos from `source`.

    `ranks_out`, if given, receives the per-query T2V ranks under "t2v" (for recall curves)."""
    from vidseek.eval.metrics import dual_softmax, retrieval_report

    model.eval()
    usable = list(source.usable)
    keep = {i: j for j, i in enumerate(usable)}
    queries = [(text, keep[v]) for text, v in dataset.queries() if v in keep]
    if not queries:
        from vidseek.errors import DatasetError

        raise DatasetError(f"no decodable videos with captions in the {dataset.split} split of {dataset.root}")
    text = encode_texts(model, [t for t, _ in queries], context_length)
    video = encode_videos(model, source, usable, batch_size=batch_size)
    sim = similarity_matrix(model, text, video)
    query_video = [v for _, v in queries]
    report = retrieval_report(sim, query_video)
    if ranks_out is not None:
        from vidseek.eval.metrics import gt_ranks

        ranks_out["t2v"] = gt_ranks(sim, query_video)
    report["num_videos_failed"] = float(len(dataset.records) - len(usable))
    meta = [dataset.records[i].meta for i in usable]
    if any(m.get("hard_negatives") for m in meta):
        report.update(hard_negative_metrics(sim, query_video, [dataset.records[i].video_id for i in usable], meta))
    if dsl:
        for key, value in retrieval_report(dual_softmax(sim), query_video).items():
            report[f"dsl.{key}"] = value
    return report
