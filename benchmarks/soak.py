"""Load held by `vidseek serve`: C clients × S seconds against a real server on 127.0.0.1.

The server is the real command (`python -m vidseek.cli serve INDEX --port 0`, its own process,
with the limits of `vidseek.serve.server`); the clients are threads of this process, each with
one keep-alive connection, sending a fixed mix of valid requests as fast as answers come back:

  search GET 55 %, search POST 15 %, /health 10 %, /videos with a random Range 15 %, /thumbnails 5 %.

Printed (markdown): requests, errors (a transport failure or any status other than the expected
2xx), throughput, p50 / p99 latency per request kind and overall, and the server's resident
memory (VmRSS) after a warm-up request of every kind, at the end, and its peak (VmHWM).
Latencies are wall-clock: on a shared machine they carry the other jobs' noise.

The index is built first with the real pipeline (`benchmarks/search.py`'s `build_real_index`:
24 synthetic clips, the `--model` recall checkpoint), or `--index` serves an existing one.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import numpy as np

from vidseek.utils import interrupt_then_kill

MIX = (("search GET", 55), ("search POST", 15), ("health", 10), ("video range", 15), ("thumbnail", 5))
STARTUP_TIMEOUT_S = 600.0


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS (now) and VmHWM (peak) of a process, in KiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


def start_server(index: Path) -> tuple[subprocess.Popen, int]:
    """`vidseek serve INDEX --port 0` in its own process; returns it and the port it announced."""
    command = [sys.executable, "-m", "vidseek.cli", "serve", str(index), "--port", "0"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    assert server.stdout is not None
    line = server.stdout.readline()  # "vidseek: serving IDX at http://127.0.0.1:PORT/ …"
    match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if match is None:
        server.kill()
        raise SystemExit(f"the server did not start: {line!r} {server.stderr.read() if server.stderr else ''}")
    port = int(match.group(1))
    while time.monotonic() < deadline:  # the announcement comes just before uvicorn starts accepting
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return server, port
        except OSError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("the server did not answer /health in time")


class Client(threading.Thread):
    """One keep-alive connection sending the request mix until `stop_at`."""

    def __init__(self, port: int, queries: Sequence[str], videos: Sequence[str], sizes: dict[str, int],
                 stop_at: float, seed: int):
        super().__init__(daemon=True)
        self.port, self.queries, self.videos, self.sizes = port, queries, videos, sizes
        self.stop_at = stop_at
        self.rng = random.Random(seed)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.error_examples: list[str] = []
        self.connection: http.client.HTTPConnection | None = None

    def request(self, kind: str) -> tuple[str, str, bytes | None, dict[str, str], int]:
        """(method, url, body, headers, expected status) of one request of `kind`."""
        query = self.rng.choice(self.queries)
        video = self.rng.choice(self.videos)
        if kind == "search GET":
            return "GET", f"/search?k=10&q={quote(query)}", None, {}, 200
        if kind == "search POST":
            body = json.dumps({"q": query, "k": 10}).encode()
            return "POST", "/search", body, {"Content-Type": "application/json"}, 200
        if kind == "health":
            return "GET", "/health", None, {}, 200
        if kind == "video range":
            first = self.rng.randrange(self.sizes[video])
            return "GET", f"/videos/{quote(video)}", None, {"Range": f"bytes={first}-{first + 65535}"}, 206
        return "GET", f"/thumbnails/{quote(video)}", None, {}, 200

    def run(self) -> None:
        kinds = [kind for kind, _ in MIX]
        weights = [weight for _, weight in MIX]
        while time.monotonic() < self.stop_at:
            kind = self.rng.choices(kinds, weights)[0]
            method, url, body, headers, expected = self.request(kind)
            began = time.perf_counter()
            try:
                if self.connection is None:
                    self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
                self.connection.request(method, url, body=body, headers=headers)
                response = self.connection.getresponse()
                response.read()
                ok = response.status == expected
                problem = f"{kind}: HTTP {response.status}"
            except (OSError, http.client.HTTPException) as err:
                ok, problem = False, f"{kind}: {type(err).__name__}: {err}"
                self.connection = None
            self.latencies[kind].append(time.perf_counter() - began)
            if not ok:
                self.errors[kind] += 1
                if len(self.error_examples) < 5:
                    self.error_examples.append(problem)


def percentiles_ms(seconds: Sequence[float]) -> str:
    if not seconds:
        return "–"
    values = np.asarray(seconds) * 1000.0
    return f"{np.percentile(values, 50):.1f} / {np.percentile(values, 99):.1f}"


def catalog(index: Path) -> tuple[list[str], dict[str, int]]:
    """The indexed video ids and their file sizes (read from the entry table)."""
    import sqlite3

    from vidseek.search.indexer import ENTRIES_FILE

    with sqlite3.connect(f"file:{index / ENTRIES_FILE}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT video_id, MIN(path) FROM entries WHERE ready = 1 GROUP BY video_id").fetchall()
    return [video for video, _ in rows], {video: os.path.getsize(path) for video, path in rows}


def run_soak(index: Path, queries: Sequence[str], clients: int, seconds: float, seed: int) -> dict[str, Any]:
    videos, sizes = catalog(index)
    server, port = start_server(index)
    try:
        warm = Client(port, queries, videos, sizes, stop_at=0.0, seed=seed)
        for kind, _ in MIX:  # one of each, so every code path is loaded before "before"
            method, url, body, headers, _ = warm.request(kind)
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            connection.request(method, url, body=body, headers=headers)
            connection.getresponse().read()
        before = rss_kib(server.pid)
        stop_at = time.monotonic() + seconds
        workers = [Client(port, queries, videos, sizes, stop_at, seed + n) for n in range(clients)]
        began = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=seconds + 120)
        elapsed = time.monotonic() - began
        after = rss_kib(server.pid)
    finally:
        interrupt_then_kill(server)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    examples: list[str] = []
    for worker in workers:
        for kind, values in worker.latencies.items():
            latencies[kind] += values
        for kind, count in worker.errors.items():
            errors[kind] += count
        examples += worker.error_examples
    return {"clients": clients, "seconds": elapsed, "latencies": latencies, "errors": errors,
            "examples": examples[:5], "rss_before": before["VmRSS"], "rss_after": after["VmRSS"],
            "rss_peak": after["VmHWM"]}


def markdown(result: dict[str, Any]) -> str:
    latencies, errors = result["latencies"], result["errors"]
    everything = [value for values in latencies.values() for value in values]
    lines = [f"{result['clients']} clients × {result['seconds']:.0f} s against `vidseek serve` on 127.0.0.1: "
             f"{len(everything)} requests ({len(everything) / result['seconds']:.1f}/s), "
             f"{sum(errors.values())} errors; server RSS {result['rss_before'] / 1024:.0f} MiB after warm-up → "
             f"{result['rss_after'] / 1024:.0f} MiB at the end (peak {result['rss_peak'] / 1024:.0f} MiB)",
             "", "| request | count | errors | p50 / p99 ms |", "|---|---:|---:|---:|"]
    for kind, _ in MIX:
        lines.append(f"| {kind} | {len(latencies[kind])} | {errors[kind]} | {percentiles_ms(latencies[kind])} |")
    lines.append(f"| all | {len(everything)} | {sum(errors.values())} | {percentiles_ms(everything)} |")
    if result["examples"]:
        lines += ["", "first errors: " + "; ".join(result["examples"])]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--index", type=Path, help="serve this index (default: build a 24-clip one in a temp folder)")
    parser.add_argument("--model", choices=("tiny", "b32"), default="tiny",
                        help="recall model of the built index (see benchmarks/search.py)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 3600:
        parser.error("--clients must be 1-256 and --seconds 0-3600")
    with tempfile.TemporaryDirectory(prefix="vidseek-soak-") as work:
        if args.index is None:
            sys.path.insert(0, str(Path(__file__).parent))
            from search import build_real_index

            index, queries = build_real_index(Path(work), args.model)
        else:
            index, queries = args.index, ["a red circle moves left", "a blue square grows", "something spins"]
        print(markdown(run_soak(index, queries, args.clients, args.seconds, args.seed)))


if __name__ == "__main__":
    main()
