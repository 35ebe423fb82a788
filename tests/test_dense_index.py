"""Dense index: exactness of flat, ANN recall vs exact, add/remove/re-add, save/load, the
index-type rule at its thresholds, errors, and Milvus-lite == FAISS flat."""
from __future__ import annotations

import json

import numpy as np
import pytest

from vidseek.errors import ConfigError, SearchIndexError
from vidseek.index import DenseIndex, FaissDenseIndex, build_dense_index, choose_index_type, load_dense_index


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread():
    """The test machine's 2 cores are shared: OpenMP spinning on both only slows tiny indexes."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit_vectors(count: int, dim: int, seed: int) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def brute_force_top_k(queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int):
    scores = queries @ vectors.T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(f, t).size / t.size for f, t in zip(found, truth)]))


# ------------------------------------------------------------------------------------------------
def test_flat_equals_brute_force_numpy_top_k():
    vectors, queries = unit_vectors(600, 16, seed=1), unit_vectors(25, 16, seed=2)
    ids = np.arange(600, dtype=np.int64) * 7 + 3  # the caller's keys, not positions
    index = build_dense_index(16, index_type="flat")
    index.add(ids, vectors)
    scores, found = index.search(queries, 10)
    expected_scores, expected_ids = brute_force_top_k(queries, vectors, ids, 10)
    assert isinstance(index, DenseIndex) and index.backend == "faiss" and index.index_type == "flat"
    assert found.dtype == np.int64 and scores.dtype == np.float32 and found.shape == (25, 10)
    np.testing.assert_array_equal(found, expected_ids)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-5)


def test_search_pads_with_minus_one_and_minus_inf():
    index = build_dense_index(4, index_type="flat")
    scores, ids = index.search(unit_vectors(2, 4, seed=0), 3)  # empty index
    assert ids.tolist() == [[-1, -1, -1]] * 2 and np.isneginf(scores).all()
    index.add(np.array([5, 9]), unit_vectors(2, 4, seed=1))
    scores, ids = index.search(unit_vectors(1, 4, seed=2), 4)
    assert sorted(ids[0, :2].tolist()) == [5, 9] and ids[0, 2:].tolist() == [-1, -1]
    assert np.isfinite(scores[0, :2]).all() and np.isneginf(scores[0, 2:]).all()


@pytest.mark.parametrize("index_type, most_effort", [("ivf64,flat", 64), ("hnsw32", 1024)])
def test_ann_recall_at_10_vs_flat_on_random_unit_vectors(index_type, most_effort):
    vectors, queries = unit_vectors(5000, 32, seed=3), unit_vectors(300, 32, seed=4)
    ids = np.arange(5000, dtype=np.int64)
    exact = build_dense_index(32, index_type="flat")
    exact.add(ids, vectors)
    approximate = build_dense_index(32, index_type=index_type)
    approximate.add(ids, vectors)
    assert approximate.index_type == index_type
    # calibrated to 0.97 on held-out vectors, and cheaper than an exhaustive scan
    assert approximate.calibrated_recall >= 0.97 and 0 < approximate.search_effort < most_effort
    _, exact_ids = exact.search(queries, 10)
    _, approximate_ids = approximate.search(queries, 10)
    assert recall(approximate_ids, exact_ids) >= 0.95


@pytest.mark.parametrize("index_type", ["flat", "ivf16,flat", "hnsw16"])
def test_add_remove_re_add_semantics(index_type):
    vectors = unit_vectors(1000, 16, seed=5)
    index = build_dense_index(16, index_type=index_type)
    index.add(np.arange(1000), vectors)
    assert len(index) == 1000 and index.index_type == index_type

    assert index.remove(np.array([3, 5, 5, 12345])) == 2  # duplicates and absent ids do not count
    assert len(index) == 998 and index.remove(np.array([3])) == 0
    _, ids = index.search(vectors[[3, 5]], 5)
    assert 3 not in ids and 5 not in ids

    index.add(np.array([7]), vectors[[3]])  # id 7 now holds vector 3: replaced, not duplicated
    assert len(index) == 998
    scores, ids = index.search(vectors[[3]], 998)
    assert ids[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert np.count_nonzero(ids[0] == 7) == 1

    fresh = unit_vectors(2, 16, seed=55)
    index.add(np.array([3, 8, 8]), np.stack([vectors[3], fresh[0], fresh[1]]))  # within one call the last row wins
    assert len(index) == 999
    scores, ids = index.search(fresh, 1)
    assert ids[1, 0] == 8 and scores[1, 0] == pytest.approx(1.0, abs=1e-5)
    assert scores[0, 0] < 0.99  # fresh[0] was overwritten: nothing identical to it is indexed


def test_trained_type_falls_back_to_flat_then_trains_and_retrains_at_8x():
    vectors = unit_vectors(5700, 16, seed=6)
    index = build_dense_index(16, index_type="ivf16,flat")  # needs 39·16 = 624 training vectors
    index.add(np.arange(500), vectors[:500])
    assert index.index_type == "flat" and "624" in index.note and index.trained_count == 500
    index.add(np.arange(500, 700), vectors[500:700])
    assert index.index_type == "ivf16,flat" and index.note is None and index.trained_count == 700
    _, ids = index.search(vectors[:700], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(700))

    effort = index.search_effort
    index.add(np.arange(700, 5600), vectors[700:5600])  # 5600 = 8 × 700: appended, not retrained
    assert len(index) == 5600 and index.trained_count == 700 and index.search_effort == effort
    index.add(np.arange(5600, 5700), vectors[5600:5700])  # past 8×: retrained on everything
    assert len(index) == 5700 and index.trained_count == 5700
    _, ids = index.search(vectors[::57], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(0, 5700, 57))


def test_auto_index_is_flat_when_small_and_follows_expected_count():
    small = build_dense_index(8)
    small.add(np.arange(100), unit_vectors(100, 8, seed=7))
    assert small.index_type == "flat" and small.requested_index_type == "auto"
    planned = build_dense_index(512, expected_count=100_000)
    assert planned.index_type == "ivf1024,flat"  # the plan before the first add


@pytest.mark.parametrize("index_type", ["flat", "ivf16,flat", "hnsw16"])
def test_save_load_round_trip_gives_identical_results(tmp_path, index_type):
    vectors, queries = unit_vectors(1200, 16, seed=8), unit_vectors(30, 16, seed=9)
    index = build_dense_index(16, index_type=index_type)
    index.add(np.arange(1200) * 2, vectors)
    index.remove(np.arange(0, 200, 2))  # hnsw: tombstones must survive the round trip
    before = index.search(queries, 10)
    index.save(tmp_path)
    index.save(tmp_path)  # a second save supersedes the first: one index file remains
    expected_files = [".faiss", ".json", ".npy"] if index_type == "hnsw16" else [".faiss", ".json"]
    assert sorted(p.suffix for p in tmp_path.iterdir()) == expected_files

    loaded = load_dense_index(tmp_path)
    assert isinstance(loaded, FaissDenseIndex) and len(loaded) == 1100
    assert (loaded.index_type, loaded.search_effort, loaded.trained_count) == (
        index.index_type, index.search_effort, index.trained_count)
    after = loaded.search(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def test_save_load_empty_index(tmp_path):
    build_dense_index(8, index_type="hnsw8").save(tmp_path)
    loaded = load_dense_index(tmp_path)
    assert len(loaded) == 0 and loaded.index_type == "hnsw8" and loaded.dim == 8


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("count, dim, budget, expected", [
    (0, 512, 4 << 30, "flat"),
    (50_000, 512, 4 << 30, "flat"),                    # the flat threshold itself
    (50_001, 512, 4 << 30, "ivf512,flat"),             # 4·√50001 = 894.4 → 512
    (100_000, 512, 4 << 30, "ivf1024,flat"),           # 4·√1e5 = 1264.9 → 1024
    (1_000_000, 512, 4 << 30, "ivf2048,flat"),         # 4·√1e6 = 4000 → 2048; 2.06 GB fits
    (50_000, 512, 50_000 * 2056, "flat"),              # exactly fits
    (50_000, 512, 50_000 * 2056 - 1, "ivf512,pq128"),  # one byte short: codes 6.8 MB fit
    (1_000_000, 512, 1 << 30, "ivf2048,pq128"),        # 2.06 GB flat > 1 GiB; 136 MB + 5.2 MB codebooks
    (1_000_000, 512, 100_000_000, "ivf2048,pq64"),     # pq128 needs 140.7 MB; pq64 76.7 MB
    (1_000_000, 48, 20_000_000, "ivf2048,pq8"),        # 48-d: pq16 has 3 dims/sub-vector (< 4)
])
def test_choose_index_type_at_the_thresholds(count, dim, budget, expected):
    assert choose_index_type(count, dim, budget) == expected


def test_choose_index_type_budget_too_small():
    with pytest.raises(ConfigError, match="raise memory_budget_bytes to at least 16718592"):
        choose_index_type(1_000_000, 512, 10_000_000)  # 1e6·(4 + 8) + 2048·512·4 + 256·512·4


# ------------------------------------------------------------------------------------------------
def test_errors_are_one_line_and_name_the_fix(tmp_path):
    index = build_dense_index(8, index_type="flat")
    index.add(np.arange(3), unit_vectors(3, 8, seed=0))
    problems = []
    for call, error_type, text in [
        (lambda: index.add(np.arange(2), unit_vectors(2, 16, seed=0)), SearchIndexError, "dimension mismatch"),
        (lambda: index.search(unit_vectors(1, 4, seed=0), 2), SearchIndexError, "dimension mismatch"),
        (lambda: index.add(np.arange(2), unit_vectors(3, 8, seed=0)), SearchIndexError, "one id per vector"),
        (lambda: index.add(np.array([-1]), unit_vectors(1, 8, seed=0)), SearchIndexError, "≥ 0"),
        (lambda: index.search(unit_vectors(1, 8, seed=0), 0), ConfigError, "positive integer"),
        (lambda: load_dense_index(tmp_path), SearchIndexError, "dense.json is missing"),
        (lambda: build_dense_index(8, index_type="ivf,flat"), ConfigError, "unknown dense index type"),
        (lambda: build_dense_index(8, index_type="ivf4,pq3"), ConfigError, "must divide"),
        (lambda: build_dense_index(8, backend="annoy"), ConfigError, "'faiss' or 'milvus'"),
        (lambda: build_dense_index(8, backend="milvus"), ConfigError, "milvus_uri"),
    ]:
        with pytest.raises(error_type, match=text) as caught:
            call()
        problems.append(str(caught.value))
    assert all("\n" not in message for message in problems)
    (tmp_path / "dense.json").write_text('{"format": "something-else"}')
    with pytest.raises(SearchIndexError, match="rebuild the index"):
        load_dense_index(tmp_path)


# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def milvus_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("milvus_index")


def open_milvus_or_skip(folder, dim: int):
    try:
        return build_dense_index(dim, index_type="flat", backend="milvus", milvus_uri=str(folder / "dense.db"),
                                 collection="test_vectors")
    except SearchIndexError as err:
        pytest.skip(f"milvus-lite cannot start in this sandbox: {err}")


def test_milvus_lite_and_faiss_flat_return_the_same_top_k(milvus_folder):
    vectors, queries = unit_vectors(400, 16, seed=10), unit_vectors(12, 16, seed=11)
    ids = np.arange(400, dtype=np.int64) * 3 + 1
    milvus = open_milvus_or_skip(milvus_folder, 16)
    faiss_flat = build_dense_index(16, index_type="flat")
    for index in (milvus, faiss_flat):
        index.add(ids, vectors)
        assert index.remove(np.array([1, 4, 999_999])) == 2
        index.add(np.array([7]), vectors[[5]])  # re-add: replaces id 7's vector
    assert milvus.backend == "milvus" and len(milvus) == len(faiss_flat) == 398
    milvus_scores, milvus_ids = milvus.search(queries, 10)
    faiss_scores, faiss_ids = faiss_flat.search(queries, 10)
    np.testing.assert_array_equal(milvus_ids, faiss_ids)
    np.testing.assert_allclose(milvus_scores, faiss_scores, atol=1e-5)

    milvus.save(milvus_folder)
    meta = json.loads((milvus_folder / "dense.json").read_text())
    assert (meta["backend"], meta["uri"], meta["collection"], meta["count"]) == ("milvus", "dense.db", "test_vectors", 398)
    assert meta["owner"] == milvus.owner and len(meta["owner"]) == 16
    milvus.close()
    reopened = load_dense_index(milvus_folder)
    assert reopened.backend == "milvus" and len(reopened) == 398
    np.testing.assert_array_equal(reopened.search(queries, 10)[1], faiss_ids)
    # A new index never attaches to an existing collection (it would overwrite the other's vectors).
    with pytest.raises(SearchIndexError, match="'test_vectors' .* already exists .*another --milvus-collection"):
        build_dense_index(32, backend="milvus", milvus_uri=str(milvus_folder / "dense.db"), collection="test_vectors")
    reopened.close()


def test_auto_index_under_a_small_budget_grows_from_flat_into_ivf_pq():
    vectors = unit_vectors(12_000, 16, seed=12)
    index = build_dense_index(16, memory_budget_bytes=200_000)
    index.add(np.arange(1000), vectors[:1000])  # 1000·(64 + 8) = 72 kB fits: exact
    assert index.index_type == "flat"
    index.add(np.arange(1000, 12_000), vectors[1000:])
    # 12000·72 B > 200 kB → nlist 256 (4·√12000 = 438); pq4: 144,000 + 2·16,384 = 176,768 B fits
    assert index.index_type == "ivf256,pq4" and len(index) == 12_000 and index.trained_count == 12_000
    assert index.remove(np.arange(0, 12_000, 2)) == 6000
    live_ids, decoded = index._export()  # what a retrain would start from: PQ reconstructions
    np.testing.assert_array_equal(np.sort(live_ids), np.arange(1, 12_000, 2))
    errors = np.linalg.norm(decoded - vectors[live_ids], axis=1)
    assert errors.mean() < 0.3  # 4 dims per 8-bit code on unit vectors
    _, found = index.search(vectors[1:2000:2], 10)
    assert np.mean([row_id in row for row_id, row in zip(range(1, 2000, 2), found)]) >= 0.9


def test_hnsw_tombstones_are_compacted_once_half_the_graph_is_dead():
    vectors = unit_vectors(200, 8, seed=13)
    index = build_dense_index(8, index_type="hnsw8")
    index.add(np.arange(200), vectors)
    assert index.remove(np.arange(100)) == 100 and index.trained_count == 200  # 50 % dead: kept
    assert index.remove(np.array([100])) == 1 and index.trained_count == 99  # > 50 %: rebuilt
    scores, ids = index.search(vectors, 99)
    assert set(ids[0].tolist()) == set(range(101, 200)) and np.isfinite(scores).all()
    index.add(np.array([5]), vectors[[5]])
    assert len(index) == 100 and index.search(vectors[[5]], 1)[1][0, 0] == 5


def test_exact_top_k_rows_matches_a_full_sort_across_chunks_and_exclusions():
    from vidseek.index.dense import exact_top_k_rows

    vectors, queries = unit_vectors(1000, 8, seed=14), unit_vectors(6, 8, seed=15)
    excluded = np.array([0, 17, 333, 999])
    scores = queries @ vectors.T
    scores[:, excluded] = -np.inf
    expected = np.argsort(-scores, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(exact_top_k_rows(queries, vectors, 7, excluded, chunk_rows=128), expected)


def test_searches_running_alongside_adds_always_see_a_consistent_index():
    import threading

    vectors = unit_vectors(3000, 8, seed=16)
    index = build_dense_index(8, index_type="flat")
    index.add(np.arange(1000), vectors[:1000])
    failures: list[str] = []

    def search_repeatedly():
        for _ in range(200):
            scores, ids = index.search(vectors[:4], 3)
            if not (ids[:, 0] == np.arange(4)).all() or not np.allclose(scores[:, 0], 1.0, atol=1e-5):
                failures.append(f"ids {ids[:, 0].tolist()}")

    readers = [threading.Thread(target=search_repeatedly) for _ in range(3)]
    for reader in readers:
        reader.start()
    for start in range(1000, 3000, 200):
        index.add(np.arange(start, start + 200), vectors[start:start + 200])
    for reader in readers:
        reader.join()
    assert failures == [] and len(index) == 3000


def test_single_query_search_leaves_the_callers_openmp_thread_count_alone():
    import faiss

    index = build_dense_index(8, index_type="flat")
    index.add(np.arange(50), unit_vectors(50, 8, seed=17))
    faiss.omp_set_num_threads(2)
    try:
        assert index.search(unit_vectors(1, 8, seed=18), 3)[1].shape == (1, 3)
        assert faiss.omp_get_max_threads() == 2
    finally:
        faiss.omp_set_num_threads(1)


def test_corrupt_faiss_file_is_a_one_line_search_index_error(tmp_path):
    index = build_dense_index(8, index_type="flat")
    index.add(np.arange(20), unit_vectors(20, 8, seed=19))
    index.save(tmp_path)
    (index_file,) = tmp_path.glob("*.faiss")
    index_file.write_bytes(index_file.read_bytes()[:40])  # truncated by a full disk, say
    with pytest.raises(SearchIndexError, match="is not a readable FAISS index") as caught:
        load_dense_index(tmp_path)
    assert "\n" not in str(caught.value) and "rebuild the index" in str(caught.value)
