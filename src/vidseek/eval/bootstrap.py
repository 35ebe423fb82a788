"""Per-query bootstrap: 95% confidence intervals for retrieval metrics and paired differences.

Every metric vidseek reports per query is a *ratio of per-query sums*,

    metric = Σ_q num[q] / Σ_q den[q],

e.g. T2V R@K (num = 100·[rank_q ≤ K], den = 1), MnR (num = rank_q, den = 1) and a hard-negative
pair accuracy (num = 100·#pairs of q won, den = #pairs of q: a query's pairs stay together because
they share the query's text embedding and are not independent). The bootstrap (Efron & Tibshirani,
"An Introduction to the Bootstrap", 1993, ch. 13: percentile interval) resamples *queries* with
replacement; one replicate is a vector of resample counts w[q] and gives Σ w·num / Σ w·den, so
all metrics of a run are computed from the same replicates with one matrix product.

Paired comparison of two runs on the same queries uses the SAME replicates for both runs and
reports the percentile interval of the difference — the query-level correlation between the two
runs cancels, which is what makes small differences separable. Several seeds of one method are
pooled by averaging their per-query numerators (all seeds share the queries, hence `den`): the
interval then covers query sampling for those trained seeds; the spread between seeds is
reported separately (`seed_sd`) because three seeds are too few to resample.

Everything is seeded (`seed`) and deterministic; replicates are drawn in chunks so memory stays
bounded (`CHUNK_ELEMENTS` counts per chunk) for test sets of any size.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vidseek.errors import ConfigError
from vidseek.eval.metrics import SUB_GALLERY, gallery_hit_probability

__all__ = [
    "LEVEL",
    "RESAMPLES",
    "Interval",
    "QueryOutcomes",
    "bootstrap_ratios",
    "compare_runs",
    "metric_columns",
    "metric_intervals",
    "percentile_interval",
    "summarize_runs",
]

LEVEL = 0.95
RESAMPLES = 2000
SEED = 0
# Resample counts held at once (int64): 4M elements ≈ 32 MB, whatever the number of queries.
CHUNK_ELEMENTS = 1 << 22
RECALL_KS = (1, 5, 10)


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval (same units as the metric)."""

    value: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class QueryOutcomes:
    """What one evaluation did on each query: enough to recompute and resample every metric.

    `query_ids[q]` names query q stably across runs (``"<video_id>#<k>"`` for the k-th query of
    that video); `t2v_ranks[q]` is the 1-based rank of q's own video; `pairs[kind][query_id]`
    maps each hard-negative partner video id to whether q scored its own video strictly higher;
    `texts_sha1` fingerprints the query texts so runs on re-captioned data are not compared.
    """

    query_ids: tuple[str, ...]
    t2v_ranks: np.ndarray
    pairs: Mapping[str, Mapping[str, Mapping[str, bool]]] = field(default_factory=dict)
    texts_sha1: str = ""

    def __post_init__(self) -> None:
        ranks = np.asarray(self.t2v_ranks)
        if ranks.shape != (len(self.query_ids),):
            raise ConfigError(f"{ranks.size} ranks for {len(self.query_ids)} query ids; give one rank per query")
        if len(set(self.query_ids)) != len(self.query_ids):
            raise ConfigError("query ids repeat; each query needs a unique id to be paired across runs")
        object.__setattr__(self, "t2v_ranks", ranks)

    @classmethod
    def from_texts(cls, texts: Sequence[str], video_ids: Sequence[str], t2v_ranks: np.ndarray,
                   pairs: Mapping[str, Mapping[int, Mapping[str, bool]]] | None = None) -> "QueryOutcomes":
        """Outcomes of queries `texts` of videos `video_ids`, ids ``"<video_id>#<k>"`` (k counts that
        video's queries in order); `pairs[kind][q]` is keyed by query INDEX here."""
        seen: dict[str, int] = {}
        ids = []
        for video_id in video_ids:
            k = seen.get(video_id, 0)
            seen[video_id] = k + 1
            ids.append(f"{video_id}#{k}")
        by_id = {kind: {ids[q]: dict(per) for q, per in by_query.items()} for kind, by_query in (pairs or {}).items()}
        digest = hashlib.sha1("\n".join(texts).encode()).hexdigest()
        return cls(tuple(ids), np.asarray(t2v_ranks), by_id, digest)

    def to_json(self) -> dict[str, Any]:
        return {"query_ids": list(self.query_ids), "t2v_rank": [int(r) for r in self.t2v_ranks],
                "hardneg": {kind: {q: {p: bool(w) for p, w in per.items()} for q, per in by_query.items()}
                            for kind, by_query in self.pairs.items()},
                "texts_sha1": self.texts_sha1}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], where: str = "report") -> "QueryOutcomes":
        try:
            return cls(tuple(data["query_ids"]), np.asarray(data["t2v_rank"], dtype=np.int64),
                       {k: {q: dict(per) for q, per in v.items()} for k, v in data.get("hardneg", {}).items()},
                       data.get("texts_sha1", ""))
        except (KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{where} has malformed per-query outcomes ({err}); re-run `vidseek eval` to rewrite it") from None

    def same_queries_as(self, other: "QueryOutcomes") -> str | None:
        """None if `other` was evaluated on the same queries and pairs, else why not (one phrase)."""
        if set(self.query_ids) != set(other.query_ids):
            only = len(set(self.query_ids) - set(other.query_ids)) + len(set(other.query_ids) - set(self.query_ids))
            return f"{len(self.query_ids)} vs {len(other.query_ids)} queries, {only} not in both"
        if self.texts_sha1 and other.texts_sha1 and self.texts_sha1 != other.texts_sha1 \
                and self.query_ids == other.query_ids:
            return "the query texts differ"
        for kind in set(self.pairs) | set(other.pairs):
            mine = {q: set(p) for q, p in self.pairs.get(kind, {}).items()}
            theirs = {q: set(p) for q, p in other.pairs.get(kind, {}).items()}
            if mine != theirs:
                return f"the {kind} hard-negative pairs differ"
        return None

    def aligned_to(self, query_ids: Sequence[str]) -> "QueryOutcomes":
        """The same outcomes with queries in the order of `query_ids` (a permutation of ours)."""
        if tuple(query_ids) == self.query_ids:
            return self
        position = {q: i for i, q in enumerate(self.query_ids)}
        order = np.fromiter((position[q] for q in query_ids), dtype=np.int64, count=len(query_ids))
        return QueryOutcomes(tuple(query_ids), self.t2v_ranks[order], self.pairs, "")


def metric_columns(outcomes: QueryOutcomes) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metric name → (num [Q], den [Q]) with metric = Σ num / Σ den (names as in `retrieval_report`)."""
    ranks = outcomes.t2v_ranks.astype(np.float64)
    ones = np.ones_like(ranks)
    columns = {f"t2v.R@{k}": (100.0 * (ranks <= k), ones) for k in RECALL_KS}
    columns["t2v.MnR"] = (ranks, ones)
    num_videos = len({q.rsplit("#", 1)[0] for q in outcomes.query_ids})
    # Expected R@1 in random 120-video galleries, as `evaluate_model` reports (only when the
    # queried videos are the whole gallery, i.e. no rank exceeds their count).
    if num_videos > SUB_GALLERY and ranks.max() <= num_videos:
        hits = gallery_hit_probability(outcomes.t2v_ranks, num_videos, SUB_GALLERY)
        columns[f"t2v.R@1.gallery{SUB_GALLERY}"] = (100.0 * hits, ones)
    row = {q: i for i, q in enumerate(outcomes.query_ids)}
    for kind in sorted(outcomes.pairs):
        wins, count = np.zeros_like(ranks), np.zeros_like(ranks)
        for query_id, per_partner in outcomes.pairs[kind].items():
            i = row[query_id]
            wins[i] = sum(bool(w) for w in per_partner.values())
            count[i] = len(per_partner)
        if count.sum() == 0:
            continue
        columns[f"hardneg.{kind}.acc"] = (100.0 * wins, count)
        if kind == "order":  # R@1 among queries whose video has an order-swapped twin
            has_twin = (count > 0).astype(np.float64)
            columns["hardneg.order.t2v.R@1"] = (100.0 * (ranks <= 1) * has_twin, has_twin)
    return columns


def _replicate_counts(num_queries: int, resamples: int, seed: int):
    """Yield [chunk, Q] int64 resample counts (each row sums to Q), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(resamples, CHUNK_ELEMENTS // max(num_queries, 1)))
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        drawn = rng.integers(0, num_queries, size=(rows, num_queries))
        drawn += (np.arange(rows) * num_queries)[:, None]
        yield np.bincount(drawn.ravel(), minlength=rows * num_queries).reshape(rows, num_queries)


def bootstrap_ratios(num: np.ndarray, den: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples, M] replicates of Σ num / Σ den for M metrics, queries resampled jointly.

    `num` is [Q, M] (or [R, Q, M]: R runs scored on the same replicates, giving [R, resamples, M]);
    `den` is [Q, M], shared by the runs. A replicate whose denominator is 0 is NaN.
    """
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    stacked = num.ndim == 3
    runs = num if stacked else num[None]
    if runs.shape[1:] != den.shape or den.ndim != 2:
        raise ConfigError(f"numerators {num.shape} and denominators {den.shape} disagree; give [Q, M] each")
    num_queries = den.shape[0]
    if resamples < 1:
        raise ConfigError(f"resamples must be at least 1 (got {resamples}); 2000 is a good default")
    if num_queries == 0:
        raise ConfigError("cannot bootstrap over zero queries; the evaluation set is empty")
    out_num = [[] for _ in range(runs.shape[0])]
    out_den = []
    for counts in _replicate_counts(num_queries, resamples, seed):
        weights = counts.astype(np.float64)
        out_den.append(weights @ den)
        for r, run in enumerate(runs):
            out_num[r].append(weights @ run)
    den_total = np.concatenate(out_den)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratios = np.stack([np.where(den_total > 0, np.concatenate(n) / den_total, np.nan) for n in out_num])
    return ratios if stacked else ratios[0]


def percentile_interval(point: float, replicates: np.ndarray, level: float = LEVEL) -> Interval:
    """The central `level` percentile interval of bootstrap `replicates` (NaN replicates dropped)."""
    tail = 100.0 * (1.0 - level) / 2.0
    finite = replicates[~np.isnan(replicates)]
    if finite.size == 0:
        return Interval(point, math.nan, math.nan)
    low, high = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(float(point), float(low), float(high))


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level {level} must be between 0 and 1 (e.g. 0.95)")


def _stack(runs: Sequence[QueryOutcomes], query_ids: Sequence[str], side: str):
    """(names, num [R, Q, M], den [Q, M]) of runs aligned to `query_ids`; refuses mismatches."""
    if not runs:
        raise ConfigError(f"no runs given for {side}; pass at least one evaluation report")
    reference = runs[0]
    for run in runs[1:]:
        why = reference.same_queries_as(run)
        if why:
            raise ConfigError(f"runs of {side} were evaluated on different queries ({why}); compare runs on the same split")
    columns = [metric_columns(run.aligned_to(query_ids)) for run in runs]
    names = list(columns[0])
    num = np.stack([np.stack([c[name][0] for name in names], axis=1) for c in columns])
    den = np.stack([columns[0][name][1] for name in names], axis=1)
    return names, num, den


def summarize_runs(runs: Sequence[QueryOutcomes], level: float = LEVEL, resamples: int = RESAMPLES,
                   seed: int = SEED) -> dict[str, dict[str, float]]:
    """Mean over runs (seeds) of each metric with its 95% interval over queries.

    Returns ``{metric: {"mean", "low", "high", "seed_sd", "runs"}}``; with one run this is that
    run's metric and its interval (`seed_sd` is NaN below two runs).
    """
    _check_level(level)
    names, num, den = _stack(runs, runs[0].query_ids if runs else (), "the summary")
    pooled = num.mean(axis=0)
    replicates = bootstrap_ratios(pooled, den, resamples, seed)
    per_run = num.sum(axis=1) / den.sum(axis=0)
    out = {}
    for m, name in enumerate(names):
        interval = percentile_interval(pooled[:, m].sum() / den[:, m].sum(), replicates[:, m], level)
        sd = float(np.std(per_run[:, m], ddof=1)) if len(runs) > 1 else math.nan
        out[name] = {"mean": interval.value, "low": interval.low, "high": interval.high, "seed_sd": sd,
                     "runs": float(len(runs))}
    return out


def metric_intervals(outcomes: QueryOutcomes, level: float = LEVEL, resamples: int = RESAMPLES,
                     seed: int = SEED) -> dict[str, Interval]:
    """The interval of each metric of one evaluation (what `vidseek eval` reports as `<metric>_ci`)."""
    return {name: Interval(s["mean"], s["low"], s["high"])
            for name, s in summarize_runs([outcomes], level, resamples, seed).items()}


def compare_runs(a: Sequence[QueryOutcomes], b: Sequence[QueryOutcomes], level: float = LEVEL,
                 resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict[str, float]]:
    """Paired bootstrap of Δ = A − B for every metric both sides have.

    `a` and `b` are one or more runs each (e.g. seeds), all evaluated on the same queries (and
    hard-negative pairs) — otherwise `ConfigError`. Seeds are pooled per side by averaging their
    per-query numerators; queries are resampled jointly for both sides. Returns
    ``{metric: {"a", "b", "delta", "low", "high"}}``; Δ(B, A) is exactly −Δ(A, B), interval mirrored.
    """
    _check_level(level)
    if not a or not b:
        raise ConfigError("compare needs at least one run on each side")
    why = a[0].same_queries_as(b[0])
    if why:
        raise ConfigError(f"A and B were evaluated on different queries ({why}); compare runs on the same split and data")
    query_ids = sorted(a[0].query_ids)  # a canonical order, so compare(B, A) draws the same replicates
    names_a, num_a, den = _stack(a, query_ids, "A")
    names_b, num_b, _ = _stack(b, query_ids, "B")
    if names_a != names_b:
        raise ConfigError(f"A and B report different metrics ({names_a} vs {names_b}); evaluate both the same way")
    pooled = np.stack([num_a.mean(axis=0), num_b.mean(axis=0)])
    replicates = bootstrap_ratios(pooled, den, resamples, seed)
    diffs = replicates[0] - replicates[1]
    totals = den.sum(axis=0)
    out = {}
    for m, name in enumerate(names_a):
        value_a, value_b = pooled[0, :, m].sum() / totals[m], pooled[1, :, m].sum() / totals[m]
        interval = percentile_interval(value_a - value_b, diffs[:, m], level)
        out[name] = {"a": float(value_a), "b": float(value_b), "delta": interval.value,
                     "low": interval.low, "high": interval.high}
    return out
