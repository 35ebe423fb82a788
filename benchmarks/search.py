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

    .venv/bin/python benchmarks/search.py [--sizes 10000,100000,1000000] [--quick]
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated collection sizes")
    parser.add_argument("--quick", action="store_true", help="10k only")
    parser.add_argument("--queries", type=int, default=200, help="queries for recall and in-process latency")
    parser.add_argument("--http-requests", type=int, default=192, help="requests per HTTP concurrency level")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved measurement rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = [10_000] if args.quick else [int(size) for size in args.sizes.split(",") if size.strip()]
    rows = []
    for count in sizes:
        began = time.perf_counter()
        rows.append(bench_size(count, args))
        print(f"[{count:,} vectors done in {time.perf_counter() - began:.0f} s]", flush=True)
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
