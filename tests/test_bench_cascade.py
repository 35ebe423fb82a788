"""Machinery of benchmarks/cascade.py on planted inputs: retention, hit rates, the equal-bytes PQ
index, padding, the best-cascade choice and the format of the final lines."""
from __future__ import annotations

import re

import numpy as np
import pytest

from conftest import imported_benchmark
from vidseek.models.grdr import GRDRConfig


@pytest.fixture(scope="module")
def bench():
    with imported_benchmark("cascade") as module:
        yield module


def planted():
    """4 queries × 5 videos; ground truth video q for query q. Full-corpus ranks of the truth:
    q0 1st, q1 1st, q2 2nd (video 4 scores higher), q3 1st → full R@1 = 75 %."""
    full = np.array([
        [0.9, 0.1, 0.2, 0.3, 0.0],
        [0.1, 0.8, 0.2, 0.3, 0.4],
        [0.1, 0.2, 0.5, 0.3, 0.7],
        [0.1, 0.2, 0.3, 0.6, 0.5],
    ])
    return full, [0, 1, 2, 3]


def test_retention_by_hand(bench):
    full, truth = planted()
    # q0 keeps its truth (1st); q1 does not recall it (a miss at every K); q2 does not recall
    # video 4, so its truth rises to 1st; q3 recalls its truth and video 4, which scores lower.
    candidates = [[3, 0], [2, 3], [2, 1], [4, 3]]
    ranks = bench.rerank_ranks(full, candidates, truth)
    assert ranks.tolist() == [1, np.inf, 1, 1]
    cascade = bench.recall_row(ranks)
    assert cascade == {"R@1": 75.0, "R@5": 75.0, "R@10": 75.0}
    from vidseek.eval.metrics import gt_ranks

    full_r1 = bench.recall_row(gt_ranks(full, truth))["R@1"]
    assert full_r1 == 75.0
    assert bench.retention(cascade["R@1"], full_r1) == pytest.approx(100.0)
    # a cascade that recalls only q0's and q1's truths: R@1 50 % → 2/3 of the full-corpus R@1
    worse = bench.recall_row(bench.rerank_ranks(full, [[0], [1], [4], [4]], truth))
    assert worse["R@1"] == 50.0
    assert bench.retention(worse["R@1"], full_r1) == pytest.approx(200.0 / 3)
    assert bench.hit_rate([[0], [1], [4], [4]], truth) == 50.0
    assert np.isnan(bench.retention(10.0, 0.0))


@pytest.mark.parametrize("opq", [False, True])
@pytest.mark.parametrize("nlist", [0, 4])
def test_pq_index_holds_as_many_bytes_per_video_as_grdr(bench, opq, nlist, monkeypatch):
    monkeypatch.setattr(bench, "OPQ_ITERATIONS", 2)  # the rotation's quality is not under test: keep it fast
    grdr_bytes = bench.semantic_id_bytes(GRDRConfig(embed_dim=64, num_views=4, levels=3, codebook_size=24))
    assert grdr_bytes == 12  # 4 views × 3 levels × uint8 (K = 24)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 64)).astype(np.float32)
    index = bench.build_pq(vectors, 64, grdr_bytes, opq, nlist, vectors)
    assert bench.pq_code_bytes(index) == grdr_bytes
    assert index.ntotal == 600 and index.d == 72  # zero-padded: 12 sub-quantisers of 6 dims
    bench.set_nprobe(index, nlist)  # all lists: the search is exhaustive over the codes
    ids = bench.pq_search(index, vectors[:5], 10)
    assert ids.shape == (5, 10) and (ids >= 0).all()
    

def test_padding_keeps_inner_products(bench):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((3, 64)).astype(np.float32), rng.standard_normal((4, 64)).astype(np.float32)
    assert bench.padded_dim(64, 24) == 72 and bench.padded_dim(512, 32) == 512 and bench.padded_dim(512, 24) == 528
    px, py = bench.pad(x, 72), bench.pad(y, 72)
    assert px.shape == (3, 72) and not px[:, 64:].any()
    np.testing.assert_allclose(px @ py.T, x @ y.T, rtol=1e-6)
    assert bench.pq_factory(512, 24, True, 1024) == "OPQ24,IVF1024,PQ24np"
    assert bench.pq_factory(64, 32, False, 0) == "PQ32np"


def test_same_size_candidates_drop_padding(bench):
    ids = np.array([[5, 2, 9, -1], [1, -1, -1, -1]])
    assert bench.top_same_size(ids, [3, 4]) == [[5, 2, 9], [1]]


def rows(bench):
    make = bench.Row
    return [make("dense", "(a) dense", False, ms={100_000: 60.0}, quality={"R@1": 20.0, "retention": 80.0}),
            make("dense20", "(b) dense top-20", True, ms={100_000: 70.0}, quality={"retention": 96.0}),
            make("dense50", "(b) dense top-50", True, ms={100_000: 75.0}, quality={"retention": 99.0}),
            make("grdr", "(c) GRDR", True, ms={100_000: 90.0}, quality={"retention": 100.5}),
            make("full", "(e) full", True, full=True, ms={100_000: 9000.0}, quality={"retention": 100.0})]


def test_best_cascade_is_the_fastest_that_keeps_the_target(bench):
    table = rows(bench)
    assert bench.pick_best(table, 98.0).key == "dense50"
    assert bench.pick_best(table, 101.0).key == "grdr"  # none reaches it: the most faithful


def test_final_lines_format(bench):
    lines = bench.final_lines(rows(bench), 100_000, 98.0)
    assert lines[0].startswith("best cascade: (b) dense top-50")
    assert lines[1] == "cascade speed-up vs full TC-MGC at 100k: 120.0x"
    assert lines[2] == "cascade R@1 retention: 99.0%"
    assert re.fullmatch(r"cascade speed-up vs full TC-MGC at 100k: \d+\.\dx", lines[1])
    assert re.fullmatch(r"cascade R@1 retention: \d+\.\d%", lines[2])
    assert bench.size_label(1_000_000) == "1M" and bench.size_label(100_000) == "100k"
