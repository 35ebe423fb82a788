"""Retrieval metrics: tie-safe ranks, R@K / MdR / MnR / RSum / SumR, DSL, and TRECVID inferred AP.

METHODS.md, "Evaluation protocol (all models)":

* R@1/5/10 (%), median rank (MdR) and mean rank (MnR) for text→video (T2V) and video→text (V2T);
  RSum = R@1 + R@5 + R@10 per direction; SumR = both directions.
* Ties must not inflate results. CLIP4Clip ranks with ``np.argsort`` + ``np.where``, which puts a
  tied ground truth wherever the sort happened to leave it; a degenerate model that scores every
  video equally can then report R@1 = 100 %. Here a tie never improves a rank (``"pessimistic"``).
* Multi-caption datasets: every caption is a T2V query; for V2T a video's rank is that of its
  best-ranked own caption among all captions.
* Dual softmax (DSL) post-processing is reported only as its own labelled row.
* TRECVID Ad-hoc Video Search: inferred AP over a ranked list of up to 1000 shots per topic,
  from sampled judgements (Yilmaz & Aslam, CIKM 2006; the stratified form of Yilmaz, Kanoulas &
  Aslam, SIGIR 2008, which NIST's ``sample_eval`` computes).

Everything takes numpy arrays and returns python floats; similarity matrices are processed in
row blocks, so a 10k × 10k matrix needs only a few tens of MB beyond the matrix itself.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from vidseek.errors import DatasetError, VidseekError

__all__ = [
    "INFAP_EPSILON",
    "TREC_DEPTH",
    "MetricInputError",
    "average_precision",
    "dual_softmax",
    "SUB_GALLERY",
    "gallery_hit_probability",
    "gallery_recall_at",
    "gt_ranks",
    "inferred_ap",
    "mean_inferred_ap",
    "read_sampled_qrels",
    "recall_at",
    "recall_metrics",
    "retrieval_report",
]

TieMode = Literal["pessimistic", "optimistic", "mean"]
TIE_MODES = ("pessimistic", "optimistic", "mean")

# Elements of one row block (about 16 MB of float32 plus two boolean masks of the same shape).
BLOCK_ELEMENTS = 1 << 22

# The smoothing constant of trec_eval's / sample_eval's infAP, kept so numbers stay comparable.
INFAP_EPSILON = 1e-5
# TRECVID AVS runs submit at most 1000 shots per topic; deeper entries are not evaluated.
TREC_DEPTH = 1000


class MetricInputError(VidseekError, ValueError):
    """A metric got an input it cannot score (NaN scores, an out-of-range ground-truth index…)."""


# --- ranks ---------------------------------------------------------------------------------------


def _positive_pairs(
    positives: Sequence[int] | Sequence[Collection[int]] | np.ndarray, num_rows: int, num_cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flatten per-row positive column sets into CSR form: (indptr [Q+1], rows, cols)."""
    if len(positives) != num_rows:
        raise MetricInputError(
            f"got {len(positives)} ground-truth entries for a similarity matrix with {num_rows} rows; "
            "pass one positive index (or set of indices) per row"
        )
    if isinstance(positives, np.ndarray) and positives.ndim == 1 and np.issubdtype(positives.dtype, np.integer):
        single = positives
    elif all(isinstance(entry, (int, np.integer)) for entry in positives):
        single = np.asarray(positives, dtype=np.int64)
    else:
        single = None
    if single is not None:  # one positive per row: no per-row python work
        cols = single.astype(np.int64).reshape(num_rows)
        counts = np.ones(num_rows, dtype=np.int64)
    else:
        col_lists: list[np.ndarray] = []
        for row, entry in enumerate(positives):
            if isinstance(entry, (int, np.integer)):
                entry_cols = np.array([int(entry)], dtype=np.int64)
            else:
                entry_cols = np.fromiter((int(c) for c in entry), dtype=np.int64)
            if entry_cols.size == 0:
                raise MetricInputError(f"row {row} has no ground-truth positive; give every query at least one")
            col_lists.append(entry_cols)
        counts = np.array([c.size for c in col_lists], dtype=np.int64)
        cols = np.concatenate(col_lists) if col_lists else np.zeros(0, dtype=np.int64)
    bad = (cols < 0) | (cols >= num_cols)
    if bad.any():
        row = int(np.repeat(np.arange(num_rows), counts)[np.flatnonzero(bad)[0]])
        raise MetricInputError(
            f"ground-truth index {int(cols[bad][0])} of row {row} is outside the {num_cols} columns "
            "of the similarity matrix; check the query→item mapping"
        )
    indptr = np.zeros(num_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    rows = np.repeat(np.arange(num_rows, dtype=np.int64), counts)
    return indptr, rows, cols


def gt_ranks(
    sim: np.ndarray,
    positives: Sequence[int] | Sequence[Collection[int]] | np.ndarray,
    ties: TieMode = "pessimistic",
) -> np.ndarray:
    """1-based rank of each row's best-scoring positive column in ``sim`` [Q, N] (higher = better).

    ``positives[q]`` is one column index or a collection of them (multi-caption protocol: the
    best-ranked positive counts). Other positives never push a row's rank down.

    Tie handling (METHODS.md "Ties must not inflate ranks"), with s = best positive score:
      * ``"pessimistic"`` (default): rank = 1 + #{j not positive : sim[q, j] >= s};
        a tie never helps, and an all-equal row ranks last among the non-positives + 1.
      * ``"optimistic"``: rank = 1 + #{j not positive : sim[q, j] > s}.
      * ``"mean"``: the average of the two (the expected rank under random tie-breaking).
    Returns int64 ranks, or float64 for ``"mean"``. NaN anywhere in ``sim`` raises
    `MetricInputError` (a ValueError) naming the first row that holds one.
    """
    if ties not in TIE_MODES:
        raise MetricInputError(f"unknown ties mode {ties!r}; use one of {', '.join(TIE_MODES)}")
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise MetricInputError(f"similarity matrix must be 2-D [queries, items], got shape {sim.shape}")
    if not np.issubdtype(sim.dtype, np.floating):
        sim = sim.astype(np.float64)
    num_rows, num_cols = sim.shape
    indptr, pair_rows, pair_cols = _positive_pairs(positives, num_rows, num_cols)

    at_least = np.zeros(num_rows, dtype=np.int64)  # non-positives scoring >= the best positive
    above = np.zeros(num_rows, dtype=np.int64)  # non-positives scoring > the best positive
    rows_per_block = max(1, BLOCK_ELEMENTS // max(num_cols, 1))
    for start in range(0, num_rows, rows_per_block):
        stop = min(num_rows, start + rows_per_block)
        # A contiguous copy: cheap, and it makes column-major inputs (e.g. sim.T) fast to scan.
        block = np.ascontiguousarray(sim[start:stop])
        nan_rows = np.isnan(block).any(axis=1)
        if nan_rows.any():
            row = start + int(np.flatnonzero(nan_rows)[0])
            raise MetricInputError(
                f"similarity matrix has NaN in row {row}; the model produced NaN features "
                "(check the checkpoint and the inputs) — NaN cannot be ranked"
            )
        lo, hi = indptr[start], indptr[stop]
        block_rows, block_cols = pair_rows[lo:hi] - start, pair_cols[lo:hi]
        is_positive = np.zeros(block.shape, dtype=bool)
        is_positive[block_rows, block_cols] = True
        best = np.full(stop - start, -np.inf, dtype=block.dtype)
        np.maximum.at(best, block_rows, block[block_rows, block_cols])
        best = best[:, None]
        at_least[start:stop] = np.count_nonzero((block >= best) & ~is_positive, axis=1)
        if ties != "pessimistic":
            above[start:stop] = np.count_nonzero((block > best) & ~is_positive, axis=1)

    if ties == "pessimistic":
        return 1 + at_least
    if ties == "optimistic":
        return 1 + above
    return 1.0 + 0.5 * (at_least + above).astype(np.float64)


# --- recall / rank summaries ---------------------------------------------------------------------


def recall_at(ranks: np.ndarray, k: int) -> float:
    """R@K in percent: the share of queries whose ground truth ranks within the top K."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise MetricInputError("cannot compute R@K over zero queries; the evaluation set is empty")
    return float(100.0 * np.count_nonzero(ranks <= k) / ranks.size)


#: Gallery size of the expected R@1 reported next to the full-gallery R@1: the earlier 600-clip
#: synthetic benchmark's test split, which issue 11's R@1 target refers to.
SUB_GALLERY = 120


def gallery_hit_probability(ranks: np.ndarray, num_videos: int, gallery: int, k: int = 1) -> np.ndarray:
    """Per query, the probability of a hit at K had it been ranked in a smaller gallery of `gallery`
    videos: its own video plus `gallery` − 1 others drawn uniformly without replacement.

    Exact, not sampled: with rank r in the full gallery of `num_videos`, r − 1 other videos score
    at least as high as the query's own; the number of them drawn into the smaller gallery is
    hypergeometric, and the query hits R@K when fewer than K are drawn.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    if ranks.size == 0:
        raise MetricInputError("cannot compute R@K over zero queries; the evaluation set is empty")
    if not 1 <= gallery <= num_videos or k < 1:
        raise MetricInputError(f"sub-gallery size must be in [1, {num_videos}] and K >= 1, got gallery={gallery}, K={k}")
    if ranks.min() < 1 or ranks.max() > num_videos:
        raise MetricInputError(f"ranks must lie in [1, {num_videos}], got [{ranks.min()}, {ranks.max()}]")
    others, drawn = num_videos - 1, gallery - 1
    total = math.comb(others, drawn)
    better, inverse = np.unique(ranks - 1, return_inverse=True)
    per_value = np.array([sum(math.comb(int(b), j) * math.comb(others - int(b), drawn - j)
                              for j in range(min(k, drawn + 1))) / total for b in better])
    return per_value[inverse.reshape(-1)]


def gallery_recall_at(ranks: np.ndarray, num_videos: int, gallery: int, k: int = 1) -> float:
    """Expected R@K (%) in random sub-galleries of `gallery` videos (`gallery_hit_probability`).
    Lets numbers on galleries of different sizes be compared (a 402-video test split against a
    120-video one); with the same number of captions per video it equals the mean R@K over
    random sub-galleries."""
    return float(100.0 * gallery_hit_probability(ranks, num_videos, gallery, k).mean())


def recall_metrics(ranks: np.ndarray, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``{"R@K": % for K in ks, "MdR": median rank, "MnR": mean rank}`` from 1-based ranks.

    MdR of an even number of ranks is the mean of the two middle ones (``np.median``), as in
    CLIP4Clip's ``np.median(ind) + 1`` on 0-based ranks.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    metrics = {f"R@{k}": recall_at(ranks, k) for k in ks}
    metrics["MdR"] = float(np.median(ranks))
    metrics["MnR"] = float(np.mean(ranks))
    return metrics


def _direction_metrics(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    metrics = recall_metrics(ranks, (1, 5, 10))
    metrics["RSum"] = metrics["R@1"] + metrics["R@5"] + metrics["R@10"]
    return {f"{prefix}.{name}": value for name, value in metrics.items()}


def retrieval_report(
    sim: np.ndarray, query_video: Sequence[int] | np.ndarray, ties: TieMode = "pessimistic"
) -> dict[str, float]:
    """The paper-table metrics of a text→video similarity matrix ``sim`` [num_queries, num_videos].

    ``query_video[q]`` is the index of query q's video. T2V ranks each query's video among all
    videos; V2T ranks, for each video, its best own caption among ALL queries (multi-caption
    protocol: every caption of the video is a positive). Returns a flat dict with
    ``t2v.{R@1,R@5,R@10,MdR,MnR,RSum}``, ``v2t.*`` likewise, ``SumR`` = t2v.RSum + v2t.RSum,
    ``num_queries`` and ``num_videos``.
    """
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise MetricInputError(f"similarity matrix must be 2-D [queries, videos], got shape {sim.shape}")
    num_queries, num_videos = sim.shape
    query_video = np.asarray(query_video, dtype=np.int64)
    if query_video.shape != (num_queries,):
        raise MetricInputError(
            f"query_video has {query_video.size} entries for {num_queries} queries; give one video index per query"
        )
    t2v_ranks = gt_ranks(sim, query_video, ties=ties)  # also validates the indices and NaN

    captions_of_video: list[list[int]] = [[] for _ in range(num_videos)]
    for query, video in enumerate(query_video.tolist()):
        captions_of_video[video].append(query)
    uncaptioned = [v for v, caps in enumerate(captions_of_video) if not caps]
    if uncaptioned:
        raise MetricInputError(
            f"{len(uncaptioned)} videos (first: index {uncaptioned[0]}) have no query; V2T needs at least "
            "one caption per video — drop those columns from the similarity matrix"
        )
    v2t_ranks = gt_ranks(sim.T, captions_of_video, ties=ties)

    report = _direction_metrics(t2v_ranks, "t2v") | _direction_metrics(v2t_ranks, "v2t")
    report["SumR"] = report["t2v.RSum"] + report["v2t.RSum"]
    report["num_queries"] = num_queries
    report["num_videos"] = num_videos
    return report


def dual_softmax(sim: np.ndarray, temperature: float = 100.0, axis: int = 0) -> np.ndarray:
    """Dual softmax (DSL, CAMoE; as in CLIP4Clip-style evaluation code): ``sim * softmax(sim * T, axis)``.

    With ``sim`` [queries, videos] and ``axis=0`` the softmax runs over queries, i.e. a video's
    score for a query is scaled by how much that query prefers it over the other queries. This
    uses the whole test set's queries at once, so METHODS.md allows it only as its own labelled
    row ("+ DSL"), never folded into a headline number. Numerically stable (max-subtracted).
    """
    sim = np.asarray(sim)
    if not np.issubdtype(sim.dtype, np.floating):
        sim = sim.astype(np.float64)
    if np.isnan(sim).any():
        raise MetricInputError("similarity matrix has NaN; DSL cannot renormalise it — fix the model outputs first")
    weights = sim * sim.dtype.type(temperature)
    weights -= weights.max(axis=axis, keepdims=True)
    np.exp(weights, out=weights)
    weights /= weights.sum(axis=axis, keepdims=True)
    weights *= sim
    return weights


# --- TRECVID inferred AP -------------------------------------------------------------------------


def average_precision(ranked: Sequence[str], relevant: Collection[str], depth: int = TREC_DEPTH) -> float:
    """Non-interpolated AP of a ranked list against a complete relevant set (trec_eval ``map``).

    Sum of precision at the rank of each retrieved relevant item, divided by |relevant|.
    """
    relevant = set(relevant)
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for k, item in enumerate(_checked_run(ranked, depth), start=1):
        if item in relevant:
            hits += 1
            total += hits / k
    return total / len(relevant)


def _checked_run(ranked: Sequence[str], depth: int) -> list[str]:
    run = list(ranked)[:depth]
    seen: set[str] = set()
    for item in run:
        if item in seen:
            raise MetricInputError(f"shot {item!r} appears twice in one topic's ranked list; list each shot once")
        seen.add(item)
    return run


def inferred_ap(
    ranked: Sequence[str],
    qrels: Mapping[str, int],
    strata: Mapping[str, Hashable] | None = None,
    depth: int = TREC_DEPTH,
    epsilon: float = INFAP_EPSILON,
) -> float:
    """Inferred AP of one topic's ranked shot list from sampled judgements.

    ``qrels`` holds every shot of the judgement pool: 1 (or more) = judged relevant, 0 = judged
    not relevant, -1 = in the pool but not sampled for judging. Shots absent from ``qrels`` were
    never pooled and count as not relevant. ``strata`` maps each pooled shot to its sampling
    stratum (TRECVID samples e.g. ranks 1–100 of the pool fully and deeper ranks at a few %); with
    ``None`` the whole pool is one uniformly sampled stratum. Each stratum's sampling rate is read
    off the qrels: p_s = judged_s / pooled_s.

    Estimator (Yilmaz & Aslam 2006, stratified form of Yilmaz, Kanoulas & Aslam 2008):
    for a relevant shot at rank k, the expected precision at k is

        E[P@k] = 1/k + (k-1)/k · Σ_s (n_s / (k-1)) · (r_s + ε) / (j_s + 2ε)        (E[P@1] = 1)

    where above rank k, n_s shots are pooled in stratum s, j_s of them judged, r_s judged
    relevant; unpooled shots above k count as non-relevant. Then, with Horvitz–Thompson weights,

        infAP = Σ_{judged relevant shot at rank k} E[P@k] / p_s(k)  /  Σ_s R_s / p_s

    (R_s = judged relevant shots of stratum s). With one stratum the 1/p weights cancel and this is
    trec_eval's ``infAP``; with every shot judged it equals average precision up to ε
    (exactly, for ``epsilon=0``, which uses the ε→0 limit 1/2 when nothing above k is judged).
    A topic without relevant shots scores 0.0, as in trec_eval.
    """
    run = _checked_run(ranked, depth)
    stratum_of = (lambda shot: None) if strata is None else strata.__getitem__

    pooled: dict[Hashable, int] = {}
    judged: dict[Hashable, int] = {}
    relevant: dict[Hashable, int] = {}
    for shot, rel in qrels.items():
        if strata is not None and shot not in strata:
            raise MetricInputError(f"pooled shot {shot!r} has no stratum; give every qrels shot a stratum")
        stratum = stratum_of(shot)
        pooled[stratum] = pooled.get(stratum, 0) + 1
        if rel >= 0:
            judged[stratum] = judged.get(stratum, 0) + 1
            if rel >= 1:
                relevant[stratum] = relevant.get(stratum, 0) + 1
    sampling_rate = {s: judged.get(s, 0) / pooled[s] for s in pooled}
    estimated_relevant = sum(count / sampling_rate[s] for s, count in relevant.items())
    if estimated_relevant == 0:
        return 0.0

    # Counts above the current rank, per stratum: pooled n_s, judged j_s, judged relevant r_s.
    pooled_above: dict[Hashable, int] = {}
    judged_above: dict[Hashable, int] = {}
    relevant_above: dict[Hashable, int] = {}
    total = 0.0
    for k, shot in enumerate(run, start=1):
        rel = qrels.get(shot)
        if rel is None:
            continue  # never pooled: not relevant, only lengthens k
        stratum = stratum_of(shot)
        if rel >= 1:
            if k == 1:
                expected_precision = 1.0
            else:
                expected_relevant_above = 0.0
                for s, n in pooled_above.items():
                    j, r = judged_above.get(s, 0), relevant_above.get(s, 0)
                    fraction = (r + epsilon) / (j + 2 * epsilon) if (j > 0 or epsilon > 0) else 0.5
                    expected_relevant_above += n * fraction
                expected_precision = 1.0 / k + ((k - 1) / k) * (expected_relevant_above / (k - 1))
            total += expected_precision / sampling_rate[stratum]
        pooled_above[stratum] = pooled_above.get(stratum, 0) + 1
        if rel >= 0:
            judged_above[stratum] = judged_above.get(stratum, 0) + 1
            if rel >= 1:
                relevant_above[stratum] = relevant_above.get(stratum, 0) + 1
    return total / estimated_relevant


def mean_inferred_ap(
    runs: Mapping[str, Sequence[str]],
    qrels: Mapping[str, Mapping[str, int]],
    strata: Mapping[str, Mapping[str, Hashable]] | None = None,
    depth: int = TREC_DEPTH,
    epsilon: float = INFAP_EPSILON,
) -> dict[str, float]:
    """infAP per topic of ``qrels`` plus their ``"mean"`` (TRECVID AVS mean xinfAP).

    ``runs[topic]`` is that topic's ranked shot list; ``qrels[topic]`` / ``strata[topic]`` as in
    `inferred_ap`. The mean is over the topics of the qrels: a topic the run skipped scores 0
    (so runs that answer fewer topics are not flattered); run topics without qrels are ignored.
    """
    if not qrels:
        raise MetricInputError("qrels hold no topics; load the topic judgements before computing infAP")
    per_topic: dict[str, float] = {}
    for topic in sorted(qrels, key=str):
        topic_strata = None if strata is None else strata.get(topic)
        per_topic[str(topic)] = inferred_ap(runs.get(topic, ()), qrels[topic], topic_strata, depth, epsilon)
    per_topic["mean"] = math.fsum(per_topic.values()) / len(per_topic)
    return per_topic


def read_sampled_qrels(path: str | Path) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]] | None]:
    """Read TRECVID / TREC sampled qrels: ``(qrels[topic][shot] = rel, strata[topic][shot] or None)``.

    Lines are ``topic iter shot rel`` (trec_eval infAP: one stratum, rel -1 = pooled, unjudged) or
    ``topic iter shot stratum rel`` (sample_eval xinfAP). All lines of a file use one layout.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"qrels file {path} not found; pass the topic judgements file (e.g. avs.qrels.tv19)")
    qrels: dict[str, dict[str, int]] = {}
    strata: dict[str, dict[str, int]] = {}
    width = None
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if width is None:
            width = len(fields)
        if len(fields) != width or width not in (4, 5):
            raise DatasetError(
                f"{path}:{line_number}: expected 'topic iter shot rel' or 'topic iter shot stratum rel' "
                f"on every line, got {len(fields)} fields"
            )
        try:
            rel = int(fields[-1])
            stratum = int(fields[3]) if width == 5 else 0
        except ValueError:
            raise DatasetError(f"{path}:{line_number}: relevance/stratum must be integers, got {line.strip()!r}") from None
        topic, shot = fields[0], fields[2]
        qrels.setdefault(topic, {})[shot] = rel
        strata.setdefault(topic, {})[shot] = stratum
    return qrels, (strata if width == 5 else None)
