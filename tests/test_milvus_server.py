"""The Milvus backend against a real Milvus 2.3.5 standalone server (not milvus-lite).

The server runs in a loopback-only network namespace (`milvus_server.LoopbackMilvusServer`);
the test asserts that namespace has no interface but `lo`. If the server cannot start, the test
fails with the reason: `make install` provides it (.tools/milvus), so a missing server is a
broken set-up, not something to skip.

One flow, each step compared with FAISS flat on the same operations: index → search → add →
remove → a second index on the same server (separate; it can neither take the first one's
collection nor touch its vectors through the shared id space) → the first index opened through a
second address of the same server (`--milvus-uri`, as another host would; its folder unchanged)
→ restart the server → search both again from their saved folders.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from milvus_server import PROXY_PORT, LoopbackMilvusServer, NamespaceBridge
from vidseek.errors import SearchIndexError
from vidseek.index import build_dense_index, load_dense_index

DIM = 32
K = 10


def unit_vectors(count: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    milvus = LoopbackMilvusServer(tmp_path_factory.mktemp("milvus-server") / "data")
    try:
        milvus.start()  # RuntimeError with the reason (missing install, no root, server log tail)
        yield milvus
    finally:
        milvus.close()


def assert_same_top_k(index, reference, queries: np.ndarray) -> None:
    """Same ids in the same order as FAISS flat, same scores (both are exact inner products).
    Searched twice: the first search after a write catches up (Strong), the second is Bounded."""
    assert len(index) == len(reference)
    ref_scores, ref_ids = reference.search(queries, K)
    for _ in range(2):
        scores, ids = index.search(queries, K)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_two_indexes_on_one_server_match_faiss_flat_across_updates_and_a_restart(server, tmp_path):
    assert server.interfaces() == ["lo"]  # the server can reach nothing but its own loopback
    queries = unit_vectors(40, seed=1)
    folder_a, folder_b = tmp_path / "a" / "recall", tmp_path / "b" / "recall"
    for folder in (folder_a, folder_b):
        folder.mkdir(parents=True)

    # index → search
    vectors_a = unit_vectors(3000, seed=2)
    index_a = build_dense_index(DIM, index_type="flat", backend="milvus", milvus_uri=server.uri, folder=folder_a)
    faiss_a = build_dense_index(DIM, index_type="flat")
    for index in (index_a, faiss_a):
        index.add(np.arange(1, 2001), vectors_a[:2000])
    index_a.save(folder_a)
    meta_a = json.loads((folder_a / "dense.json").read_text())
    assert meta_a["collection"] == index_a.collection and meta_a["collection"].startswith("vidseek_a_recall_")
    assert meta_a["count"] == 2000 and meta_a["uri"] == server.uri
    assert_same_top_k(index_a, faiss_a, queries)
    index_a.close()
    index_a = load_dense_index(folder_a)  # a new client, as `vidseek search` would open it
    assert_same_top_k(index_a, faiss_a, queries)

    # add (new ids and replaced ones) → remove (present and absent ids)
    for index in (index_a, faiss_a):
        index.add(np.arange(1501, 2501), vectors_a[2000:3000])
    assert len(index_a) == 2500
    assert_same_top_k(index_a, faiss_a, queries)
    doomed = np.concatenate([np.arange(1, 400), [10**9]])
    assert index_a.remove(doomed) == faiss_a.remove(doomed) == 399
    assert_same_top_k(index_a, faiss_a, queries)
    index_a.save(folder_a)

    # a second index on the same server: its own collection, the same id space
    vectors_b = unit_vectors(1500, seed=3)
    index_b = build_dense_index(DIM, index_type="flat", backend="milvus", milvus_uri=server.uri, folder=folder_b)
    faiss_b = build_dense_index(DIM, index_type="flat")
    for index in (index_b, faiss_b):
        index.add(np.arange(1, 1501), vectors_b)
        assert index.remove(np.arange(400, 900)) == 500  # ids index A holds too
    index_b.save(folder_b)
    assert index_b.collection != index_a.collection
    assert_same_top_k(index_b, faiss_b, queries)
    assert_same_top_k(index_a, faiss_a, queries)  # untouched by B's adds and removes

    # B cannot take A's collection: not when built with its name, not by editing dense.json
    with pytest.raises(SearchIndexError, match=f"{index_a.collection}' .* already exists .*owned by the vidseek "
                                               f"index at {folder_a}.*another --milvus-collection"):
        build_dense_index(DIM, backend="milvus", milvus_uri=server.uri, collection=index_a.collection,
                          folder=tmp_path / "c")
    hijacked = tmp_path / "hijack"
    hijacked.mkdir()
    meta_b = json.loads((folder_b / "dense.json").read_text())
    (hijacked / "dense.json").write_text(json.dumps({**meta_b, "collection": index_a.collection}))
    with pytest.raises(SearchIndexError, match=f"{index_a.collection}' .* belongs to another index"):
        load_dense_index(hijacked)
    for index in (index_a, index_b):
        index.close()

    # the same server at a second address (another host's name for it): --milvus-uri opens the
    # index there, and saving keeps the address dense.json was built with
    second_address = NamespaceBridge(PROXY_PORT)
    try:
        second_address.retarget(server.namespace_path)
        second_uri = f"http://127.0.0.1:{second_address.port}"
        recorded = (folder_a / "dense.json").read_bytes()
        elsewhere = load_dense_index(folder_a, milvus_uri=second_uri)
        assert elsewhere.uri == second_uri
        assert_same_top_k(elsewhere, faiss_a, queries)
        elsewhere.save(folder_a)
        assert (folder_a / "dense.json").read_bytes() == recorded
        elsewhere.close()
    finally:
        second_address.close()

    # restart the server → both indexes reopen from their folders with the same results
    server.restart()
    assert server.interfaces() == ["lo"]
    for folder, reference in ((folder_a, faiss_a), (folder_b, faiss_b)):
        reopened = load_dense_index(folder)
        assert_same_top_k(reopened, reference, queries)
        reopened.close()

    # a server that is down: the error names the server, not milvus-lite
    reopened = load_dense_index(folder_a)
    server.stop()
    try:
        with pytest.raises(SearchIndexError) as caught:
            reopened.search(queries[:1], K)
    finally:
        reopened.close()  # an open client to a dead server would hold up interpreter exit
    message = str(caught.value)
    assert message.startswith(f"Milvus server at {server.uri} failed while searching")
    assert "milvus-lite" not in message and "\n" not in message
