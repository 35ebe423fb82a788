"""Serving more than one query at a time: dynamic batching (`QueryBatcher`) and `serve --workers`.

Batched results are compared with one-at-a-time searches: ids (and their order) exactly, scores
to 1e-5 — a batched GEMM may sum in another order than a single row's and move the last bits
(see `vidseek.search.batching`). Results of `--workers 2` are compared exactly: each worker
runs the same unbatched computation on its own copy of the index.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import imported_benchmark
from test_search import tiny_index
from vidseek.errors import ConfigError
from vidseek.search.batching import BatchSettings, QueryBatcher
from vidseek.search.searcher import Searcher

QUERIES = ["a small red circle moves to the left", "a blue square grows", "a green triangle rotates",
           "a yellow star blinks then stays", "two shapes move up", "a purple circle shrinks",
           "an orange square moves right then down", "a red triangle moves diagonally"]


# --- the batcher against a recording fake ------------------------------------------------------------

class RecordingSearcher:
    """search_batch returns, per text, [(text, k, recall_k, rerank)] and records each call; the
    first call blocks until released, so the queries sent meanwhile must pile up behind it."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int, int, bool]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def search_batch(self, texts, k=10, recall_k=100, rerank=True):
        self.entered.set()
        self.release.wait(timeout=30)
        self.calls.append((list(texts), k, recall_k, rerank))
        if "boom" in texts:
            raise ConfigError("boom is not a query")
        return [[(t, k, recall_k, rerank)] for t in texts]


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_concurrent_queries_are_batched_and_each_caller_gets_its_own_result():
    fake = RecordingSearcher()
    texts = [f"q{n}" for n in range(21)]
    with QueryBatcher(fake, BatchSettings(max_batch=8, wait_ms=1)) as batcher, ThreadPoolExecutor(22) as pool:
        first = pool.submit(batcher.search, "first", 5, 50, False)
        wait_for(fake.entered.is_set)  # the batcher is busy with "first" ...
        futures = [pool.submit(batcher.search, t, 5, 50, False) for t in texts]
        wait_for(lambda: batcher._queue.qsize() == len(texts))  # ... while 21 more queue up
        fake.release.set()
        assert first.result(timeout=30) == [("first", 5, 50, False)]
        assert [f.result(timeout=30) for f in futures] == [[(t, 5, 50, False)] for t in texts]
    assert [call[0] for call in fake.calls] == [["first"], texts[:8], texts[8:16], texts[16:]]


def test_different_options_are_separate_calls_and_errors_reach_every_caller_of_the_call():
    fake = RecordingSearcher()
    fake.release.set()
    with QueryBatcher(fake, BatchSettings(max_batch=16, wait_ms=200)) as batcher, ThreadPoolExecutor(4) as pool:
        a = pool.submit(batcher.search, "a", 10, 100, True)
        b = pool.submit(batcher.search, "b", 3, 100, True)
        boom = pool.submit(batcher.search, "boom", 10, 100, True)
        assert b.result(timeout=30) == [("b", 3, 100, True)]
        with pytest.raises(ConfigError, match="boom"):
            boom.result(timeout=30)
        with pytest.raises(ConfigError, match="boom"):  # a shared the failed call with boom
            a.result(timeout=30)
    assert sorted((tuple(sorted(texts)), k) for texts, k, _, _ in fake.calls) == [(("a", "boom"), 10), (("b",), 3)]


def test_batch_settings_are_checked():
    with pytest.raises(ConfigError, match="max_batch"):
        BatchSettings(max_batch=0)
    with pytest.raises(ConfigError, match="wait_ms"):
        BatchSettings(wait_ms=-1)


# --- the real search path ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder, _ = tiny_index(tmp_path_factory.mktemp("batching"), num_clips=10)
    return folder


def assert_same_hits(batched, single, exact: bool) -> None:
    assert [[h["video_id"] for h in hits] for hits in batched] == [[h["video_id"] for h in hits] for hits in single]
    for key in ("recall_score", "rerank_score", "score"):
        got = np.array([[h[key] for h in hits] for hits in batched], dtype=np.float64)
        want = np.array([[h[key] for h in hits] for hits in single], dtype=np.float64)
        if exact:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_batched_searches_equal_one_at_a_time(index):
    with Searcher(index) as searcher:
        single = [[h.to_dict() for h in searcher.search(q, k=5)] for q in QUERIES]
        single_no_rerank = [[h.to_dict() for h in searcher.search(q, k=5, rerank=False)] for q in QUERIES]
        calls = []
        real = searcher.search_batch

        def counting(texts, **kwargs):
            calls.append(len(texts))
            return real(texts, **kwargs)

        searcher.search_batch = counting
        with QueryBatcher(searcher, BatchSettings(max_batch=16, wait_ms=50)) as batcher, \
                ThreadPoolExecutor(len(QUERIES) * 2) as pool:
            reranked = [pool.submit(batcher.search, q, 5, 100, True) for q in QUERIES]
            recall_only = [pool.submit(batcher.search, q, 5, 100, False) for q in QUERIES]
            batched = [[h.to_dict() for h in f.result(timeout=120)] for f in reranked]
            batched_no_rerank = [[h.to_dict() for h in f.result(timeout=120)] for f in recall_only]
    assert max(calls) > 1  # queries really went through the model together
    assert_same_hits(batched, single, exact=False)
    assert_same_hits(batched_no_rerank, single_no_rerank, exact=False)


def test_http_app_with_batching_answers_like_the_searcher(index):
    from fastapi.testclient import TestClient

    from vidseek.serve.app import create_app

    with Searcher(index) as searcher:
        single = [[h.to_dict() for h in searcher.search(q, k=5)] for q in QUERIES]
        with TestClient(create_app(index, searcher=searcher, batching=BatchSettings(8, 5.0))) as client, \
                ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda q: client.get("/search", params={"q": q, "k": 5}), QUERIES))
            assert client.get("/search", params={"q": "   "}).status_code == 422  # checked before queueing
    assert all(r.status_code == 200 for r in responses)
    assert_same_hits([r.json()["results"] for r in responses], single, exact=False)


# --- several server processes ----------------------------------------------------------------------

def test_serve_workers_each_load_the_index_and_answer_identically(index):
    import httpx

    with Searcher(index) as searcher:
        expected = {q: [h.to_dict() for h in searcher.search(q, k=5)] for q in QUERIES}
    seen: set[str] = set()
    with imported_benchmark("search") as bench, \
            bench.serve_subprocess(index, ["--workers", "2", "--max-batch", "1"], threads=1) as base:

        def ask(query: str) -> tuple[str, str, list]:
            with httpx.Client(base_url=base, timeout=120) as client:  # a new connection: any worker may take it
                response = client.get("/search", params={"q": query, "k": 5})
                response.raise_for_status()
                return query, response.headers["X-Vidseek-Worker"], response.json()["results"]

        # Until both workers have answered, bounded in rounds and time: on a busy machine the
        # second worker can still be loading its index while the first answers many rounds.
        deadline = time.monotonic() + 180
        with ThreadPoolExecutor(8) as pool:
            for _ in range(500):
                if time.monotonic() > deadline:
                    break
                for query, worker, results in pool.map(ask, QUERIES):
                    seen.add(worker)
                    single = [{k: v for k, v in hit.items() if k != "path"} for hit in expected[query]]
                    assert [{k: v for k, v in hit.items() if k in single[0]} for hit in results] == single
                if len(seen) == 2:
                    break
    assert len(seen) == 2  # two processes answered, each from the index it opened itself


def test_serve_workers_split_the_cores_unless_the_user_chose_threads():
    from vidseek.serve.workers import threads_per_worker

    assert threads_per_worker(2, 16, {}) == 8
    assert threads_per_worker(3, 16, {}) == 5
    assert threads_per_worker(4, 2, {}) == 1  # never zero threads
    assert threads_per_worker(2, None, {}) == 1
    assert threads_per_worker(2, 16, {"OMP_NUM_THREADS": "3"}) is None
