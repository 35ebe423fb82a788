"""Dynamic batching of concurrent queries: many clients, one pass through the text tower.

A search service answers each request on its own thread; one query at a time through a CLIP
text tower leaves most of a CPU's (or GPU's) matrix throughput unused, and every query pays the
per-call overheads (tokenizer, FAISS call, SQLite lookups) alone. `QueryBatcher` queues the
requests, and one background thread takes the first waiting request, waits at most `wait_ms`
(a few milliseconds) for more, up to `max_batch`, and runs them as ONE `search_batch` call —
text encoding, recall and the entry lookups are batched; reranking stays per query. Requests
with different `k` / `recall_k` / `rerank` go in separate calls of the same round.

Results equal one-at-a-time searches in ids and order; scores agree to float rounding (≈1e-7):
a batched matrix product may sum in another order than a single row's (other GEMM blocking),
which can move the last bits of a score. An exact tie between two scores could in principle
then swap order; the tests compare ids exactly and scores to 1e-5.
"""
from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

from vidseek.errors import ConfigError

DEFAULT_MAX_BATCH = 16
DEFAULT_WAIT_MS = 2.0


class BatchSearcher(Protocol):
    def search_batch(self, texts: Sequence[str], k: int = 10, recall_k: int = 100,
                     rerank: bool = True) -> list[list[Any]]: ...


@dataclass(frozen=True)
class BatchSettings:
    """`max_batch` queries per pass at most; wait up to `wait_ms` after the first for company."""

    max_batch: int = DEFAULT_MAX_BATCH
    wait_ms: float = DEFAULT_WAIT_MS

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.wait_ms < 0:
            raise ConfigError(f"query batching needs max_batch >= 1 and wait_ms >= 0 (got {self.max_batch}, "
                              f"{self.wait_ms}); e.g. --max-batch 16 --batch-wait-ms 2")


@dataclass
class _Request:
    text: str
    options: tuple[int, int, bool]  # k, recall_k, rerank: requests batch together only when equal
    result: Future = field(default_factory=Future)


class QueryBatcher:
    """Thread-safe front of a searcher: `search()` from any number of threads, batched behind."""

    def __init__(self, searcher: BatchSearcher, settings: BatchSettings = BatchSettings()):
        self.searcher = searcher
        self.settings = settings
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="vidseek-query-batcher", daemon=True)
        self._thread.start()

    def search(self, text: str, k: int = 10, recall_k: int = 100, rerank: bool = True) -> list[Any]:
        """What `searcher.search(text, ...)` returns, computed in a batch with concurrent callers."""
        if self._closed:
            raise ConfigError("the query batcher is closed; open a new one")
        request = _Request(text, (k, recall_k, rerank))
        self._queue.put(request)
        return request.result.result()

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._collect(first)
            self._run(batch)
            if stop:
                break
        while True:  # a caller that raced close() gets an answer, not a hang
            try:
                late = self._queue.get_nowait()
            except queue.Empty:
                return
            if late is not None:
                late.result.set_exception(ConfigError("the query batcher was closed; open a new one"))

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        batch = [first]
        deadline = time.monotonic() + self.settings.wait_ms / 1000.0
        while len(batch) < self.settings.max_batch:
            remaining = deadline - time.monotonic()
            try:
                # Past the window, still take what is already queued (no waiting).
                nxt = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _run(self, batch: list[_Request]) -> None:
        groups: dict[tuple[int, int, bool], list[_Request]] = {}
        for request in batch:
            groups.setdefault(request.options, []).append(request)
        for (k, recall_k, rerank), requests in groups.items():
            try:
                results = self.searcher.search_batch([r.text for r in requests], k=k, recall_k=recall_k,
                                                     rerank=rerank)
            except BaseException as err:  # noqa: BLE001 - every caller of the failed call gets the error
                for request in requests:
                    request.result.set_exception(err)
                continue
            for request, hits in zip(requests, results):
                request.result.set_result(hits)

    def close(self) -> None:
        """Answer what is queued, then stop the background thread."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()

    def __enter__(self) -> "QueryBatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
