"""T2V recall measured through the product path: search a built index, not a score matrix.

`vidseek eval RUN --data DIR --index IDX` sends every caption of the split to `Searcher` (so the
index type — flat, IVF, PQ, GRDR's semantic IDs — and the cascade's `recall_k` all show up in the
numbers); `--http URL` sends the same queries to a running `vidseek serve` (`GET /search`).

Ranks from a truncated result list, tie-safe (the same pessimistic rule as
`vidseek.eval.metrics.gt_ranks`): with s = the ground-truth video's score among the k returned
hits, rank = 1 + #{other returned hits with score ≥ s}. When the ground truth is not returned,
or when its score equals the score of the last returned hit while the list was cut at k (a video
beyond the cut could tie with it, and a pessimistic tie ranks it first), the rank is unknown
beyond k and counts as a miss (one hit more than k is fetched, so this happens only on a real
tie at the cut). So R@K is measurable only for K ≤ k (or every K when k covers the whole index); others are
not reported.
On a flat index with k = every video this equals plain `vidseek eval` exactly.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from vidseek.errors import ConfigError, SearchIndexError

#: (video id, path, score) of each returned hit, best first.
HitRow = tuple[str, str, float]
#: A search function: query texts and k → per query its hits.
SearchFn = Callable[[Sequence[str], int], list[list[HitRow]]]

RECALL_KS = (1, 5, 10)


def truncated_rank(hits: Sequence[HitRow], positive: Callable[[HitRow], bool], k: int, gallery: int) -> float:
    """1-based pessimistic rank of the best positive among `hits` (≤ k of a `gallery`-video index),
    or inf when it is not returned or a tie with the cut-off leaves its rank unknown."""
    scores = [h[2] for h in hits]
    positives = [i for i, h in enumerate(hits) if positive(h)]
    if not positives:
        return float("inf")
    best = max(scores[i] for i in positives)
    others = [s for i, s in enumerate(scores) if i not in positives]
    truncated = len(hits) >= k and gallery > len(hits)
    if truncated and scores and best <= min(scores):
        return float("inf")
    return float(1 + sum(s >= best for s in others))


def recall_report(ranks: np.ndarray, k: int, gallery: int) -> dict[str, float]:
    """t2v.R@K (%) for the K that the returned k hits can measure, plus the counts behind them."""
    ks = [K for K in RECALL_KS if K <= k or k >= gallery]  # all K when the whole gallery was returned
    out = {f"t2v.R@{K}": 100.0 * float(np.mean(ranks <= K)) for K in ks}
    out.update({"num_queries": float(len(ranks)), "num_videos": float(gallery), "k": float(k),
                "returned_ground_truth": 100.0 * float(np.mean(np.isfinite(ranks)))})
    return out


def evaluate_through_search(queries: Sequence[tuple[str, str, str]], search: SearchFn, k: int, gallery: int,
                            batch_size: int = 32) -> tuple[dict[str, float], np.ndarray]:
    """`queries`: (caption, ground-truth video id, its file path). Returns the report and the
    per-query ranks (inf = not within the measurable top-k)."""
    if not queries:
        raise ConfigError("no queries to evaluate; the split has no captions")
    ranks = np.empty(len(queries), dtype=np.float64)
    # One hit more than reported: a ground truth at position k is then known to rank k unless the
    # next video ties with it (only then is its rank unknown).
    fetch = k + 1 if k < gallery else k
    for start in range(0, len(queries), batch_size):
        block = queries[start:start + batch_size]
        results = search([text for text, _, _ in block], fetch)
        for offset, ((_, video_id, path), hits) in enumerate(zip(block, results)):
            wanted_path = str(Path(path).resolve())

            def positive(hit: HitRow, video_id: str = video_id, wanted_path: str = wanted_path) -> bool:
                return hit[0] == video_id or (bool(hit[1]) and str(Path(hit[1]).resolve()) == wanted_path)

            ranks[start + offset] = truncated_rank(hits, positive, fetch, gallery)
    return recall_report(ranks, k, gallery), ranks


def searcher_search(index_dir: str | Path, recall_k: int, device: str = "cpu", beams: int | None = None
                    ) -> tuple[SearchFn, int, Callable[[], None]]:
    """(search function over `Searcher`, number of indexed videos, close)."""
    from vidseek.search.searcher import Searcher

    searcher = Searcher(index_dir, device=device, beams=beams)

    def search(texts: Sequence[str], k: int) -> list[list[HitRow]]:
        hits = searcher.search_batch(list(texts), k=k, recall_k=max(recall_k, k))
        return [[(h.video_id, h.path, h.score) for h in row] for row in hits]

    return search, int(searcher.stats()["counts"]["videos"]), searcher.close


def http_search(url: str, recall_k: int, timeout: float = 60.0) -> tuple[SearchFn, int]:
    """(search function over a running `vidseek serve` at `url`, number of indexed videos)."""
    base = url.rstrip("/")

    def get(path: str) -> dict:
        try:
            with urllib.request.urlopen(base + path, timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as err:
            raise SearchIndexError(f"{base}{path.split('?')[0]} answered HTTP {err.code}: "
                                   f"{err.read().decode('utf-8', 'replace')[:200]}") from err
        except (urllib.error.URLError, OSError) as err:
            raise SearchIndexError(f"cannot reach the search service at {base} ({err}); "
                                   "start it with `vidseek serve` or check --http") from err

    def search(texts: Sequence[str], k: int) -> list[list[HitRow]]:
        out = []
        for text in texts:
            query = urllib.parse.urlencode({"q": text, "k": k, "recall_k": max(recall_k, k)})
            body = get(f"/search?{query}")
            # the service keeps file paths to itself: match on video ids only
            out.append([(r["video_id"], "", float(r["score"])) for r in body["results"]])
        return out

    return search, int(get("/stats")["counts"]["videos"])


def dataset_queries(dataset) -> list[tuple[str, str, str]]:
    """(caption, video id, video path) for every caption of a `RetrievalDataset` split."""
    return [(text, dataset.records[v].video_id, str(dataset.records[v].path)) for text, v in dataset.queries()]


def run_eval_through_index(data: str | Path, preset, split: str, *, index: str | Path | None = None,
                           http: str | None = None, k: int = 10, recall_k: int = 100, device: str = "cpu",
                           beams: int | None = None) -> dict[str, float]:
    """Evaluate the split's captions against an index (in process) or a service (`http`)."""
    from vidseek.train.loop import load_split

    if (index is None) == (http is None):
        raise ConfigError("pass exactly one of --index IDX or --http URL")
    if k < 1:
        raise ConfigError(f"--k must be at least 1, got {k}")
    queries = dataset_queries(load_split(preset, data, split))
    if http is not None:
        search, gallery = http_search(http, recall_k)
        report, _ = evaluate_through_search(queries, search, min(k, 99), gallery)  # the service caps k at 100
        return report
    search, gallery, close = searcher_search(index, recall_k, device=device, beams=beams)
    try:
        report, _ = evaluate_through_search(queries, search, k, gallery)
    finally:
        close()
    return report


def eval_command(checkpoint: str | Path, data: str | Path, split: str, *, index: str | Path | None,
                 http: str | None, k: int, recall_k: int, device: str = "cpu",
                 json_out: str | Path | None = None) -> str:
    """`vidseek eval RUN --data DIR (--index IDX | --http URL)`: the run's preset names the dataset
    format; returns the lines to print (and writes the report as JSON when asked)."""
    from vidseek.models.registry import Preset
    from vidseek.train.checkpoint import read_checkpoint

    preset = Preset.from_dict(read_checkpoint(checkpoint)["preset"])
    report = run_eval_through_index(data, preset, split, index=index, http=http, k=k, recall_k=recall_k,
                                    device=device)
    where = f"index {index}" if index is not None else f"service {http}"
    lines = [f"T2V through {where} on {data} [{split}]: {int(report['num_queries'])} queries, "
             f"{int(report['num_videos'])} indexed videos, top-{int(report['k'])} returned, recall_k {recall_k}"]
    lines += [f"{key}: {value:.1f}" for key, value in report.items() if key.startswith("t2v.")]
    lines.append(f"ground truth returned within top-{int(report['k'])}: {report['returned_ground_truth']:.1f}%")
    if json_out is not None:
        from vidseek.utils import atomic_path

        with atomic_path(json_out) as tmp:
            Path(tmp).write_text(json.dumps({"metrics": report, "settings": {
                "checkpoint": str(checkpoint), "split": split, "index": None if index is None else str(index),
                "http": http, "k": k, "recall_k": recall_k}}, indent=2))
    return "\n".join(lines)
