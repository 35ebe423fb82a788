"""Dense recall index at 10k / 100k / 1M videos: what `build_dense_index` chooses and what it costs.

One run prints one markdown table, one row per collection size, measured side by side:

* index type chosen by `choose_index_type` (default 4 GiB budget) and its calibrated nprobe;
* build time (train + add + nprobe calibration) and index size (bytes of the saved index files);
* recall@10 of that index vs exact search (`faiss.knn`) on held-out queries: the ANN choice
  against its ground truth, as LanceDB users expect (USERS.md);
* in-process single-query latency p50 / p99;
* HTTP latency p50 / p99 with 1 and 16 concurrent clients against a minimal FastAPI app serving
  the same index on 127.0.0.1 (uvicorn in a background thread, httpx clients, a bounded number
  of requests), the ratio HTTP p50 (1 client) / in-process p50, and the HTTP p50 of the same
  request to an endpoint that only parses it (what transport + JSON cost without the search).

Data: synthetic 512-d L2-normalised vectors drawn around √N centres (cosine to the centre ≈ 0.7),
the centres themselves grouped under ⁴√N topics; queries are drawn the same way with fresh
noise. Neighbours are structured, so ANN recall means something (uniform noise in 512-d has no
near neighbours at all).

`measure_http_latency(app, requests, concurrency)` takes any ASGI app, so the HTTP part can be
pointed at the real `vidseek serve` app: pass that app and its search requests, e.g.
``HttpRequest("GET", "/api/search", params={"q": "a dog"})``.

Build time is wall-clock with its process CPU seconds beside it (all threads; on a shared
machine the CPU figure is the stable one). Latencies are wall-clock: on a shared machine they carry other jobs' noise; the HTTP/in-process
ratio is measured in the same run. Client threads share the server's process (and GIL), as a
co-located client would.

Second table, the issue's target "HTTP p50 ≤ 1.2 × in-process p50 at 100k vectors", measured on
the REAL search path, one row per `--search-sizes` entry:

* in-process: `Searcher.search(text, k=10)` — text encoding with the recall model, dense recall
  of recall_k = 100 entries, their rows from the entry table, one hit per video (no rerank: the
  index has no reranker, see below);
* HTTP: the same query strings as ``GET /search?q=…&k=10`` to `vidseek.serve.app.create_app`
  (the app `vidseek serve` runs) under uvicorn, with 1 and 16 concurrent clients; the app is given
  the very Searcher the in-process column uses, so both columns search the same loaded index
  and the ratio is what the HTTP layer adds (the last column: the same in milliseconds). Measured
  in `--search-rounds` short interleaved rounds, so load drift on a shared machine hits all three
  columns alike; query encoding runs with `--torch-threads` (default 1) intra-op threads.

The index is built with the real pipeline: `vidseek.data.synth.generate` renders 24 clips of
32 px and `Indexer.add` extracts and indexes them with the `--search-model` recall checkpoint:

* ``b32`` (default): the product's backbone, the two-tower ViT-B/32 CLIP of `msrvtt9k-meanp-b32`
  (512-d) with 4 frames per clip, at RANDOM init saved as a vidseek checkpoint: no weights can be
  downloaded here, and random weights cost exactly the compute of trained ones (a ViT-B/32 text
  tower per query), which is all a latency table needs;
* ``tiny``: `synth-clip-tiny` (64-d) trained for 2 steps; its text tower is tiny, so the search is
  cheap and the HTTP/in-process ratio a pessimistic bound (the HTTP overhead is a fixed
  per-request cost that does not grow with the model).

The table states the model and the vector width. The index is then grown to N entries the way
`Indexer` adds entries (pending rows in the entry table → the recall backend's dense index
`add` → save → mark ready → index.json): the extra entries are SYNTHETIC — L2-normalised vectors
of the model's width drawn like the first table's data, each its own video id
("<real id>~synthetic<n>") pointing at one of the 24 real files. Once past 50k entries the dense
index retrains itself as IVF, exactly as a growing real index would. Rerank is left out because
the synthetic entries have no frames for a reranker to read; query texts are the synthetic
dataset's captions.

    .venv/bin/python benchmarks/search.py [--sizes 10000,100000,1000000] [--search-sizes 100000] [--search-model b32|tiny] [--quick]
"""
from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from pydantic import BaseModel

from vidseek.index import DenseIndex, build_dense_index

DIM = 512
K = 10


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------
def cluster_centres(count: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    """√count unit centres (≥ 16) in two levels: each is a perturbed copy of one of ⁴√count
    topic centres (cos ≈ 0.7 to its topic), so neighbouring clusters overlap, as related topics do
    in an embedding space, and IVF cells do not line up with clean islands."""
    def unit(rows: np.ndarray) -> np.ndarray:
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)

    topics = unit(rng.standard_normal((max(4, int(round(count ** 0.25))), dim), dtype=np.float32))
    centre_count = max(16, int(round(np.sqrt(count))))
    noise = rng.standard_normal((centre_count, dim), dtype=np.float32) / np.sqrt(dim)
    return unit(topics[rng.integers(0, topics.shape[0], centre_count)] + noise)


def clustered_unit_vectors(count: int, centres: np.ndarray, rng: np.random.Generator,
                           spread: float = 1.0, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors = normalise(centre + noise), |noise| ≈ spread, so cos(x, centre) ≈ 1/√(1+spread²)."""
    dim = centres.shape[1]
    out = np.empty((count, dim), np.float32)
    for start in range(0, count, chunk):
        stop = min(count, start + chunk)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block *= spread / np.sqrt(dim)
        block += centres[rng.integers(0, centres.shape[0], stop - start)]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start:stop] = block
    return out


# ------------------------------------------------------------------------------------------------
# HTTP serving and measurement (any ASGI app)
# ------------------------------------------------------------------------------------------------
class SearchRequest(BaseModel):
    """Module level: FastAPI resolves the (string) annotation of the endpoint from module globals."""

    vector: list[float]
    k: int = K


def make_search_app(index: DenseIndex) -> Any:
    """Minimal FastAPI app: POST /search {"vector": [...], "k": 10} → {"ids": [...], "scores": [...]};
    POST /parse-only takes the same body and skips the search (the HTTP + JSON share of a request)."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.post("/search")
    def search(request: SearchRequest) -> dict[str, list]:  # sync: FastAPI runs it in its threadpool
        scores, ids = index.search(np.asarray([request.vector], np.float32), request.k)
        return {"ids": ids[0].tolist(), "scores": scores[0].tolist()}

    @app.post("/parse-only")
    def parse_only(request: SearchRequest) -> dict[str, list]:  # transport + JSON cost, no search
        return {"ids": [-1] * request.k, "scores": [0.0] * request.k}

    return app


@dataclass
class HttpRequest:
    method: str
    path: str
    json: Any = None
    params: dict[str, Any] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def serve_in_background(app: Any, startup_timeout_s: float = 30.0) -> Iterator[str]:
    """Run `app` under uvicorn on a free 127.0.0.1 port in a daemon thread; yield its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="bench-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"uvicorn did not start on 127.0.0.1:{port}")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _run_client(base_url: str, requests: Sequence[HttpRequest], start: threading.Barrier,
                latencies: list[float]) -> None:
    import httpx

    with httpx.Client(base_url=base_url, timeout=60.0) as client:  # keep-alive, like a real client
        start.wait()
        for request in requests:
            began = time.perf_counter()
            response = client.request(request.method, request.path, json=request.json, params=request.params)
            latencies.append(time.perf_counter() - began)
            response.raise_for_status()


def http_latencies(base_url: str, requests: Sequence[HttpRequest], concurrency: int) -> np.ndarray:
    """Per-request wall latencies (s) of `requests` spread over `concurrency` client threads,
    each with its own keep-alive connection, all starting together."""
    per_client = [list(requests[offset::concurrency]) for offset in range(concurrency)]
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    start = threading.Barrier(concurrency)
    threads = [threading.Thread(target=_run_client, args=(base_url, mine, start, out))
               for mine, out in zip(per_client, latencies)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return np.array([value for client in latencies for value in client])


def measure_http_latency(app: Any, requests: Sequence[HttpRequest], concurrency: int,
                         warmup: int = 5) -> np.ndarray:
    """Serve `app` (any ASGI app) on 127.0.0.1, send `warmup` requests, then time `requests` with
    `concurrency` clients: the entry point for pointing this benchmark at `vidseek serve`."""
    with serve_in_background(app) as base_url:
        http_latencies(base_url, requests[:warmup], 1)
        return http_latencies(base_url, requests, concurrency)


def p50_p99_ms(seconds: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(seconds, 50) * 1e3), float(np.percentile(seconds, 99) * 1e3)


# ------------------------------------------------------------------------------------------------
# One size
# ------------------------------------------------------------------------------------------------
def bench_size(count: int, args: argparse.Namespace) -> dict[str, Any]:
    import faiss

    rng = np.random.default_rng(args.seed)
    centres = cluster_centres(count, DIM, rng)
    vectors = clustered_unit_vectors(count, centres, rng)
    queries = clustered_unit_vectors(max(args.queries, args.http_requests), centres, rng)

    index = build_dense_index(DIM, expected_count=count)
    began, began_cpu = time.perf_counter(), time.process_time()
    index.add(np.arange(count, dtype=np.int64), vectors)
    build_s, build_cpu_s = time.perf_counter() - began, time.process_time() - began_cpu

    folder = Path(tempfile.mkdtemp(prefix="vidseek-bench-index-"))
    try:
        index.save(folder)
        index_bytes = sum(path.stat().st_size for path in folder.iterdir() if path.name != "dense.json")
    finally:
        shutil.rmtree(folder)

    recall_queries = queries[:args.queries]
    _, exact_ids = faiss.knn(recall_queries, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
    _, found_ids = index.search(recall_queries, K)
    recall = float(np.mean([np.intersect1d(f, e).size / K for f, e in zip(found_ids, exact_ids)]))
    del vectors  # the index holds its own copy; free the source before the latency runs

    # single-query searches run with one OpenMP thread inside FaissDenseIndex.search itself
    return _measure_latencies(index, queries, args) | {
        "count": count, "index_type": index.index_type, "nprobe": index.search_effort,
        "build_s": build_s, "build_cpu_s": build_cpu_s, "index_bytes": index_bytes, "recall": recall,
    }


def _measure_latencies(index: DenseIndex, queries: np.ndarray, args: argparse.Namespace) -> dict[str, Any]:
    """In-process, HTTP (1 and 16 clients) and parse-only HTTP latencies, measured in interleaved
    rounds so that load drift on a shared machine hits every column alike."""
    def in_process(batch: np.ndarray) -> np.ndarray:
        seconds = []
        for query in batch:
            began = time.perf_counter()
            index.search(query[None], K)
            seconds.append(time.perf_counter() - began)
        return np.array(seconds)

    search = [HttpRequest("POST", "/search", json={"vector": query.tolist(), "k": K})
              for query in queries[:args.http_requests]]
    parse_only = [HttpRequest("POST", "/parse-only", json=request.json) for request in search]
    samples: dict[str, list[np.ndarray]] = {"in": [], "http1": [], "http16": [], "parse_only": []}
    with serve_in_background(make_search_app(index)) as base_url:
        in_process(queries[:5])
        http_latencies(base_url, search[:5], 1)
        for round_index in range(args.rounds):
            samples["in"].append(in_process(queries[round_index:args.queries:args.rounds]))
            samples["http1"].append(http_latencies(base_url, search[round_index::args.rounds], 1))
            samples["http16"].append(http_latencies(base_url, search[round_index::args.rounds], 16))
            samples["parse_only"].append(http_latencies(base_url, parse_only[round_index::args.rounds], 1))
    pooled = {name: p50_p99_ms(np.concatenate(parts)) for name, parts in samples.items()}
    return {
        "in_p50": pooled["in"][0], "in_p99": pooled["in"][1], "http1": pooled["http1"], "http16": pooled["http16"],
        "ratio": pooled["http1"][0] / pooled["in"][0], "parse_only_p50": pooled["parse_only"][0],
    }


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| vectors (512-d) | index type | nprobe | build s (CPU s) | index MB | recall@10 vs exact | "
        "in-process p50 / p99 ms | HTTP 1 client p50 / p99 ms | HTTP 16 clients p50 / p99 ms | "
        "HTTP p50 / in-process p50 | HTTP p50 without search (1 client) ms |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['count']:,} | {row['index_type']} | {row['nprobe'] or '—'} | {row['build_s']:.1f} ({row['build_cpu_s']:.0f}) | "
            f"{row['index_bytes'] / 1e6:.1f} | {row['recall']:.3f} | {row['in_p50']:.2f} / {row['in_p99']:.2f} | "
            f"{row['http1'][0]:.2f} / {row['http1'][1]:.2f} | {row['http16'][0]:.2f} / {row['http16'][1]:.2f} | "
            f"{row['ratio']:.1f}× | {row['parse_only_p50']:.2f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The real search path: Searcher vs `vidseek serve` over a real index grown with synthetic entries
# ------------------------------------------------------------------------------------------------
SYNTHETIC_MARK = "~synthetic"


def synthetic_entry_rows(real_entries: Sequence[Any], count: int) -> list[tuple[str, str, str, float, float | None]]:
    """`count` entry-table rows (key, video_id, path, start, end) for synthetic entries: row n
    points at the file and window of real entry n mod len(real_entries) under its own video id
    ``"<real video id>~synthetic<n>"`` (= its key), so collapsing by video keeps each one."""
    if not real_entries:
        raise ValueError("synthetic entries need at least one real entry to point at")
    rows = []
    for n in range(count):
        real = real_entries[n % len(real_entries)]
        video_id = f"{real.video_id}{SYNTHETIC_MARK}{n}"
        rows.append((video_id, video_id, real.path, float(real.start), real.end))
    return rows


SEARCH_MODELS = ("tiny", "b32")
B32_PRESET = "msrvtt9k-meanp-b32"
SEARCH_MODEL_LABELS = {"tiny": "synth-clip-tiny", "b32": f"ViT-B/32 two-tower ({B32_PRESET}, random init)"}
B32_FRAMES = 4  # fewer frames than the paper's 12: keeps indexing the 24 real clips cheap, query cost unchanged


def recall_checkpoint(search_model: str, data: Path, root: Path) -> Path:
    """The recall checkpoint the real index is built with.

    * ``"tiny"``: synth-clip-tiny (64-d) trained for 2 steps on `data`;
    * ``"b32"``: the two-tower ViT-B/32 CLIP of `msrvtt9k-meanp-b32` (512-d, the product's
      backbone) at RANDOM init with `B32_FRAMES` frames, saved as a vidseek checkpoint — no
      weights can be downloaded here, and random weights cost the same compute as trained ones.
    """
    import dataclasses

    from vidseek.models.registry import create_model, get_preset
    from vidseek.train.checkpoint import load_model, save_checkpoint
    from vidseek.train.loop import train

    if search_model == "tiny":
        preset = get_preset("synth-clip-tiny").with_overrides(batch_size=8, max_steps=2, eval_every=2)
        return train(preset, data, root / "run", device="cpu", progress=False).run_dir / "last.pt"
    if search_model == "b32":
        preset = dataclasses.replace(get_preset(B32_PRESET), frames=B32_FRAMES)
        path = root / "b32-random-init.pt"
        save_checkpoint(path, model=create_model(preset), preset=preset.to_dict(), step=0, epoch=0, batch_in_epoch=0)
        load_model(path)  # fails loudly here if the checkpoint does not round-trip
        return path
    raise ValueError(f"unknown search model {search_model!r}: choose one of {', '.join(SEARCH_MODELS)}")


def build_real_index(root: Path, search_model: str = "b32", clips: int = 24) -> tuple[Path, list[str]]:
    """Render `clips` synthetic clips, index them with `Indexer` under the `search_model` recall
    checkpoint (see `recall_checkpoint`); returns the index folder and the dataset's captions (the
    query texts)."""
    import json

    from vidseek.data.synth import SynthConfig, generate
    from vidseek.search.indexer import build_index

    data = root / "synth"
    generate(data, SynthConfig(num_videos=clips, seed=0, frames=8, size=32), progress=False)
    checkpoint = recall_checkpoint(search_model, data, root)
    build_index(data, root / "index", recall=str(checkpoint), workers=0, progress=False)
    records = [json.loads(line) for line in (data / "annotations.jsonl").read_text(encoding="utf-8").splitlines()]
    return root / "index", [caption for record in records for caption in record["captions"]]


def grow_index(index_dir: Path, total: int, seed: int, chunk: int = 50_000) -> None:
    """Add synthetic entries until the index holds `total`, through the steps `Indexer` itself
    takes for new entries (pending rows → dense index add → save → mark ready → index.json)."""
    from vidseek.search.indexer import Indexer

    with Indexer(index_dir, progress=False) as indexer:
        real_count = indexer.entries.counts()["keys"]
        real_entries = list(indexer.entries.get_many(range(1, real_count + 1)).values())  # a fresh index: ids 1..n
        if len(real_entries) != real_count:
            raise RuntimeError(f"expected entry ids 1..{real_count} in a fresh index, found {len(real_entries)}")
        dense = indexer.recall.index
        rng = np.random.default_rng(seed)
        centres = cluster_centres(total, dense.dim, rng)
        rows = synthetic_entry_rows(real_entries, total - real_count)
        new_ids = []
        for start in range(0, len(rows), chunk):
            new_ids += indexer.entries.add_pending(rows[start:start + chunk])
        # one add: the dense index retrains once, on all its vectors, as the type rule says
        dense.add(np.asarray(new_ids, np.int64), clustered_unit_vectors(len(new_ids), centres, rng))
        indexer.recall.save()
        indexer.entries.mark_ready(new_ids)
        indexer._write_meta()


def bench_search_size(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """In-process `Searcher.search` vs HTTP ``GET /search`` (1 and 16 clients) at `count` entries."""
    from vidseek.search.searcher import Searcher
    from vidseek.serve.app import create_app

    root = Path(tempfile.mkdtemp(prefix="vidseek-bench-search-"))
    try:
        began, began_cpu = time.perf_counter(), time.process_time()
        index_dir, captions = build_real_index(root, args.search_model)
        real_s = time.perf_counter() - began
        grow_index(index_dir, count, args.seed)
        build_s, build_cpu_s = time.perf_counter() - began, time.process_time() - began_cpu
        texts = [captions[n % len(captions)] for n in range(args.search_requests)]
        with Searcher(index_dir) as searcher:
            stats = searcher.stats()
            dense = searcher.recall.index
            row = _measure_search_latencies(searcher, create_app(index_dir, searcher=searcher), texts, args)
        return row | {"count": stats["counts"]["keys"], "index_type": stats["index_type"], "dim": dense.dim,
                      "model": args.search_model,
                      "nprobe": dense.search_effort,
                      "real_build_s": real_s, "build_s": build_s, "build_cpu_s": build_cpu_s}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _measure_search_latencies(searcher: Any, app: Any, texts: Sequence[str], args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved rounds of in-process searches, HTTP with 1 client and HTTP with 16 clients."""
    def in_process(batch: Sequence[str]) -> np.ndarray:
        seconds = []
        for text in batch:
            began = time.perf_counter()
            searcher.search(text, k=K)
            seconds.append(time.perf_counter() - began)
        return np.array(seconds)

    requests = [HttpRequest("GET", "/search", params={"q": text, "k": K}) for text in texts]
    samples: dict[str, list[np.ndarray]] = {"in": [], "http1": [], "http16": []}
    with serve_in_background(app) as base_url:
        in_process(texts[:5])
        http_latencies(base_url, requests[:5], 1)
        _check_same_results(searcher, base_url, texts[0])
        rounds = args.search_rounds
        for round_index in range(rounds):
            samples["in"].append(in_process(texts[round_index::rounds]))
            samples["http1"].append(http_latencies(base_url, requests[round_index::rounds], 1))
            samples["http16"].append(http_latencies(base_url, requests[round_index::rounds], 16))
    pooled = {name: p50_p99_ms(np.concatenate(parts)) for name, parts in samples.items()}
    return {"in": pooled["in"], "http1": pooled["http1"], "http16": pooled["http16"],
            "ratio": pooled["http1"][0] / pooled["in"][0], "requests": len(texts)}


def _check_same_results(searcher: Any, base_url: str, text: str) -> None:
    """Both columns must time the same work: K hits, the same videos in the same order."""
    import httpx

    local = [hit.video_id for hit in searcher.search(text, k=K)]
    served = [hit["video_id"] for hit in httpx.get(f"{base_url}/search", params={"q": text, "k": K}).json()["results"]]
    if len(local) != K or served != local:
        raise RuntimeError(f"HTTP and in-process results differ for {text!r}: {served} vs {local}")


def search_markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| entries (24 real + synthetic) | recall model | dim | index type | nprobe | build s (CPU s) | requests per column | "
        "in-process Searcher.search p50 / p99 ms | HTTP GET /search 1 client p50 / p99 ms | "
        "HTTP 16 clients p50 / p99 ms | HTTP p50 (1 client) / in-process p50 | HTTP p50 − in-process p50 ms |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['count']:,} | {SEARCH_MODEL_LABELS[row['model']]} | {row['dim']} | {row['index_type']} | {row['nprobe'] or '—'} | "
            f"{row['build_s']:.0f} ({row['build_cpu_s']:.0f}) | "
            f"{row['requests']} | {row['in'][0]:.2f} / {row['in'][1]:.2f} | "
            f"{row['http1'][0]:.2f} / {row['http1'][1]:.2f} | {row['http16'][0]:.2f} / {row['http16'][1]:.2f} | "
            f"{row['ratio']:.2f}× | {row['http1'][0] - row['in'][0]:.2f} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# `vidseek serve` on a Milvus server vs on FAISS (same entries, same vectors)
# ------------------------------------------------------------------------------------------------
def exact_copy(index_dir: Path, copy_dir: Path, backend: str, milvus_uri: str | None = None) -> Path:
    """A copy of the index folder whose dense index holds the same ids and vectors, exact (flat),
    in `backend`: both columns then return identical results, so they time the same work."""
    from vidseek.index import load_dense_index

    shutil.copytree(index_dir, copy_dir)
    state = copy_dir / "recall"
    ids, vectors = load_dense_index(index_dir / "recall")._export()
    for stale in state.glob("dense*"):
        stale.unlink()
    dense = build_dense_index(vectors.shape[1], index_type="flat", backend=backend, milvus_uri=milvus_uri,
                              folder=state if backend == "milvus" else None)
    for start in range(0, ids.size, 20_000):
        dense.add(ids[start:start + 20_000], vectors[start:start + 20_000])
    dense.save(state)
    rewrite_manifest(copy_dir)
    return copy_dir


def rewrite_manifest(index_dir: Path) -> None:
    """Record the files of an index folder whose dense index was rebuilt here (not by `vidseek
    index`) in its manifest, after checking everything else, as `vidseek verify --write-manifest`."""
    import json

    from vidseek.search.integrity import MANIFEST_KEY, verify_index
    from vidseek.utils import atomic_write_json

    meta = json.loads((index_dir / "index.json").read_text())
    meta.pop(MANIFEST_KEY, None)
    atomic_write_json(index_dir / "index.json", meta)
    problems, _ = verify_index(index_dir, write_manifest=True)
    if problems:
        raise RuntimeError(f"{index_dir} does not verify after the rebuild: {problems[0]}")


@contextmanager
def serve_in_namespace(index_dir: Path, server: Any, port: int, options: Sequence[str] = (),
                       startup_timeout_s: float = 300.0) -> Iterator[str]:
    """`vidseek serve INDEX [options]` as its own process inside the Milvus server's loopback-only
    network namespace, reached from here through a `NamespaceBridge`; yields the bridged base URL."""
    import subprocess
    import sys

    import httpx

    from milvus_server import NamespaceBridge

    bridge = NamespaceBridge(port)
    bridge.retarget(server.namespace_path)
    # A file, not a pipe: gRPC logs to stderr, and an unread pipe that fills up blocks the server.
    log_path = index_dir.parent / f"{index_dir.name}-serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(["setpriv", "--pdeathsig", "KILL", "nsenter", f"--net={server.namespace_path}",
                                    sys.executable, "-m", "vidseek.cli",
                                    "serve", str(index_dir), "--host", "127.0.0.1", "--port", str(port), *options],
                                   stdout=subprocess.DEVNULL, stderr=log)
    base_url = f"http://127.0.0.1:{bridge.port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"vidseek serve {index_dir} exited: {log_path.read_text(errors='replace')[-500:]}")
            try:
                if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vidseek serve {index_dir} did not answer within {startup_timeout_s:.0f} s")
            time.sleep(0.5)
        yield base_url
    finally:
        process.terminate()
        process.wait(timeout=30)
        bridge.close()


def bench_milvus_serving(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Requests/s of `vidseek serve` at `args.milvus_clients` concurrent clients, the index's
    vectors in a real Milvus standalone server vs in FAISS, interleaved rounds of the same queries.

    The Milvus server (tests/milvus_server.py: `make install` puts it in .tools/milvus) and both
    `vidseek serve` processes run in one loopback-only network namespace; the benchmark's clients
    reach both servers through the same bridge, so transport costs the two columns alike.
    """
    import sys

    import httpx

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from milvus_server import PROXY_PORT, LoopbackMilvusServer

    root = Path(tempfile.mkdtemp(prefix="vidseek-bench-milvus-"))
    server = LoopbackMilvusServer(root / "milvus")
    try:
        server.start()
        index_dir, captions = build_real_index(root / "real", args.search_model)
        grow_index(index_dir, count, args.seed)
        faiss_dir = exact_copy(index_dir, root / "faiss", "faiss")
        milvus_dir = exact_copy(index_dir, root / "milvus-index", "milvus", server.uri)
        texts = [captions[n % len(captions)] for n in range(args.milvus_requests)]
        requests = [HttpRequest("GET", "/search", params={"q": text, "k": K}) for text in texts]
        seconds = {"faiss": 0.0, "milvus": 0.0}
        with serve_in_namespace(faiss_dir, server, 8001) as faiss_url, \
                serve_in_namespace(milvus_dir, server, 8002,
                                   # in the namespace Milvus answers at its own port, not at the bridge's
                                   ["--milvus-uri", f"http://127.0.0.1:{PROXY_PORT}"]) as milvus_url:
            urls = {"faiss": faiss_url, "milvus": milvus_url}
            for text in texts[:3]:  # warm-up, and both columns must do the same work
                hits = {name: [h["video_id"] for h in httpx.get(f"{url}/search", params={"q": text, "k": K},
                                                                timeout=300).json()["results"]]
                        for name, url in urls.items()}
                if hits["faiss"] != hits["milvus"] or len(hits["faiss"]) != K:
                    raise RuntimeError(f"FAISS and Milvus results differ for {text!r}: {hits}")
            rounds = args.search_rounds
            for round_index in range(rounds):
                for name, url in urls.items():
                    batch = requests[round_index::rounds]
                    began = time.perf_counter()
                    http_latencies(url, batch, args.milvus_clients)
                    seconds[name] += time.perf_counter() - began
        per_second = {name: len(requests) / spent for name, spent in seconds.items()}
        return {"count": count, "model": args.search_model, "clients": args.milvus_clients,
                "requests": len(requests), "faiss_rps": per_second["faiss"], "milvus_rps": per_second["milvus"],
                "ratio": per_second["milvus"] / per_second["faiss"]}
    finally:
        server.close()
        shutil.rmtree(root, ignore_errors=True)


def milvus_markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| entries (24 real + synthetic) | recall model | clients | requests per column | "
        "`vidseek serve` on FAISS flat req/s | on Milvus server (FLAT) req/s | Milvus / FAISS |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['count']:,} | {SEARCH_MODEL_LABELS[row['model']]} | {row['clients']} | {row['requests']} | "
                     f"{row['faiss_rps']:.1f} | {row['milvus_rps']:.1f} | {row['ratio']:.2f}× |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Throughput at 16 clients: `vidseek serve` as one process (before) vs --workers 2 vs batching
# ------------------------------------------------------------------------------------------------
#: label -> `vidseek serve` options. Every configuration gets the same CPU budget (--serve-cores
#: torch threads in all, split over its processes), so the rows compare ways of using it.
SERVE_CONFIGS = {
    "1 process, one query at a time (before)": ["--workers", "1", "--max-batch", "1"],
    "--workers 2": ["--workers", "2", "--max-batch", "1"],
    "batching (max 16, 2 ms)": ["--workers", "1", "--max-batch", "16", "--batch-wait-ms", "2"],
    "--workers 2 + batching": ["--workers", "2", "--max-batch", "16", "--batch-wait-ms", "2"],
}


@contextmanager
def serve_subprocess(index_dir: Path, options: Sequence[str], threads: int, timeout_s: float = 300.0) -> Iterator[str]:
    """`vidseek serve INDEX` on a free 127.0.0.1 port in a child process; yields its base URL."""
    import os
    import subprocess
    import sys

    import httpx

    from vidseek.utils import interrupt_then_kill

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "-m", "vidseek.cli", "serve", str(index_dir), "--host", "127.0.0.1",
                               "--port", str(port), *options], env=env, stdout=subprocess.DEVNULL)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`vidseek serve {' '.join(options)}` did not come up on port {port}")
            try:
                if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield base_url
    finally:
        interrupt_then_kill(server)


def _check_served_results(base_url: str, expected: dict[str, list[Any]]) -> None:
    """Same videos in the same order as one in-process query at a time; scores to 1e-5 (batched
    GEMMs and other thread counts may round differently in the last bits)."""
    import httpx

    from concurrent.futures import ThreadPoolExecutor

    def ask(text: str) -> list[dict[str, Any]]:
        return httpx.get(f"{base_url}/search", params={"q": text, "k": K}, timeout=120).json()["results"]

    with ThreadPoolExecutor(16) as pool:  # concurrently, so batching really batches them
        served = dict(zip(expected, pool.map(ask, list(expected))))
    for text, hits in expected.items():
        got = served[text]
        if [h["video_id"] for h in got] != [h.video_id for h in hits] or not np.allclose(
                [h["score"] for h in got], [h.score for h in hits], rtol=0, atol=1e-5):
            raise RuntimeError(f"served results differ from the in-process search for {text!r}")


def bench_serve_throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Requests/s of `vidseek serve` with 16 keep-alive clients per SERVE_CONFIGS row, servers
    started one after another in interleaved rounds, each checked against in-process results."""
    from vidseek.search.searcher import Searcher

    root = Path(tempfile.mkdtemp(prefix="vidseek-bench-throughput-"))
    try:
        index_dir, captions = build_real_index(root, "b32")
        grow_index(index_dir, args.throughput_size, args.seed)
        texts = [captions[n % len(captions)] for n in range(args.throughput_requests)]
        with Searcher(index_dir) as searcher:
            expected = {text: searcher.search(text, k=K) for text in dict.fromkeys(texts[:32])}
        requests = [HttpRequest("GET", "/search", params={"q": text, "k": K}) for text in texts]
        samples: dict[str, list[tuple[float, np.ndarray]]] = {label: [] for label in SERVE_CONFIGS}
        for _ in range(args.throughput_rounds):
            for label, options in SERVE_CONFIGS.items():
                workers = int(options[options.index("--workers") + 1])
                with serve_subprocess(index_dir, options, threads=max(1, args.serve_cores // workers)) as base_url:
                    _check_served_results(base_url, expected)
                    http_latencies(base_url, requests[:16], 16)  # warm every worker (16 at once reach both)
                    began = time.perf_counter()
                    latencies = http_latencies(base_url, requests, 16)
                    samples[label].append((len(requests) / (time.perf_counter() - began), latencies))
        rows = []
        for label, runs in samples.items():
            rows.append({"label": label, "qps": [qps for qps, _ in runs],
                         "latency": p50_p99_ms(np.concatenate([lat for _, lat in runs]))})
        return rows
    finally:
        shutil.rmtree(root, ignore_errors=True)


def throughput_markdown_table(rows: Sequence[dict[str, Any]], args: argparse.Namespace) -> str:
    before = float(np.median(rows[0]["qps"]))
    lines = [f"`vidseek serve`, ViT-B/32 text tower (random init), {args.throughput_size:,} entries, 16 clients, "
             f"{args.throughput_requests} requests × {args.throughput_rounds} interleaved rounds, "
             f"{args.serve_cores} torch threads per configuration; results checked against in-process searches",
             "",
             "| configuration | requests/s (median; each round) | × before | latency p50 / p99 ms |",
             "|---|---:|---:|---:|"]
    for row in rows:
        qps = float(np.median(row["qps"]))
        lines.append(f"| {row['label']} | {qps:.1f} ({', '.join(f'{q:.1f}' for q in row['qps'])}) | "
                     f"{qps / before:.2f}× | {row['latency'][0]:.0f} / {row['latency'][1]:.0f} |")
    return "\n".join(lines)




def parse_sizes(text: str) -> list[int]:
    """'10000, 100000' → [10000, 100000]; '' → [] (skip that table)."""
    return [int(size) for size in text.split(",") if size.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="comma-separated collection sizes for the dense-index table ('' skips it)")
    parser.add_argument("--search-sizes", default="100000",
                        help="comma-separated entry counts for the Searcher vs `vidseek serve` table ('' skips it)")
    parser.add_argument("--quick", action="store_true", help="10k only, in both tables")
    parser.add_argument("--queries", type=int, default=200, help="queries for recall and in-process latency")
    parser.add_argument("--http-requests", type=int, default=192, help="requests per HTTP concurrency level")
    parser.add_argument("--search-requests", type=int, default=480,
                        help="queries per column of the Searcher vs `vidseek serve` table")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved measurement rounds")
    parser.add_argument("--search-rounds", type=int, default=10,
                        help="interleaved rounds of the Searcher vs `vidseek serve` table (short rounds: load drift hits all columns)")
    parser.add_argument("--search-model", choices=SEARCH_MODELS, default="b32",
                        help="recall model of the Searcher vs `vidseek serve` table: b32 = random-init ViT-B/32 "
                             "two-tower (the product's cost), tiny = synth-clip-tiny")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch intra-op threads for query encoding (1: a fair share of a small shared machine)")
    parser.add_argument("--milvus-sizes", default="",
                        help="entry counts for the `vidseek serve` on Milvus server vs FAISS table, e.g. 100000 "
                             "('' skips it; needs root for the loopback-only network namespace)")
    parser.add_argument("--milvus-clients", type=int, default=8, help="concurrent clients of the Milvus table")
    parser.add_argument("--milvus-requests", type=int, default=320, help="requests per column of the Milvus table")
    parser.add_argument("--throughput-requests", type=int, default=320,
                        help="requests per configuration and round of the `vidseek serve` throughput table (0 skips it)")
    parser.add_argument("--throughput-size", type=int, default=10_000, help="entries of the throughput table's index")
    parser.add_argument("--throughput-rounds", type=int, default=2, help="interleaved rounds of the throughput table")
    parser.add_argument("--serve-cores", type=int, default=2,
                        help="torch threads per served configuration, split over its worker processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [10_000] if args.quick else parse_sizes(args.sizes)
    search_sizes = [10_000] if args.quick else parse_sizes(args.search_sizes)
    import torch

    torch.set_num_threads(args.torch_threads)
    rows = []
    for count in sizes:
        began = time.perf_counter()
        rows.append(bench_size(count, args))
        print(f"[{count:,} vectors done in {time.perf_counter() - began:.0f} s]", flush=True)
    search_rows = []
    for count in search_sizes:
        began = time.perf_counter()
        search_rows.append(bench_search_size(count, args))
        print(f"[search at {count:,} entries done in {time.perf_counter() - began:.0f} s; "
              f"real 24-clip index built in {search_rows[-1]['real_build_s']:.0f} s]", flush=True)
    milvus_rows = []
    for count in parse_sizes(args.milvus_sizes):
        began = time.perf_counter()
        milvus_rows.append(bench_milvus_serving(count, args))
        print(f"[vidseek serve on Milvus vs FAISS at {count:,} entries done in {time.perf_counter() - began:.0f} s]",
              flush=True)
    if rows:
        print()
        print(markdown_table(rows))
    if search_rows:
        print()
        print(search_markdown_table(search_rows))
    if milvus_rows:
        print()
        print(milvus_markdown_table(milvus_rows))
    if args.throughput_requests:
        print()
        print(throughput_markdown_table(bench_serve_throughput(args), args))


if __name__ == "__main__":
    main()
