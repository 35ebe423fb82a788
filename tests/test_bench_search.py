"""Helpers of benchmarks/search.py: the synthetic entries that grow a real index, size parsing."""
from __future__ import annotations

import pytest

from conftest import imported_benchmark
from vidseek.search.indexer import Entry

@pytest.fixture(scope="module")
def bench():
    with imported_benchmark("search") as module:
        yield module


def test_synthetic_rows_cycle_over_real_files_with_unique_ids(bench):
    real = [Entry(1, "a", "a", "/v/a.mp4", 0.0, 2.0), Entry(2, "b#1", "b", "/v/b.mp4", 10.0, None)]
    rows = bench.synthetic_entry_rows(real, 5)
    assert rows == [
        ("a~synthetic0", "a~synthetic0", "/v/a.mp4", 0.0, 2.0),
        ("b~synthetic1", "b~synthetic1", "/v/b.mp4", 10.0, None),
        ("a~synthetic2", "a~synthetic2", "/v/a.mp4", 0.0, 2.0),
        ("b~synthetic3", "b~synthetic3", "/v/b.mp4", 10.0, None),
        ("a~synthetic4", "a~synthetic4", "/v/a.mp4", 0.0, 2.0),
    ]


def test_synthetic_rows_need_a_real_entry(bench):
    assert bench.synthetic_entry_rows([Entry(1, "a", "a", "/v/a.mp4", 0.0, 2.0)], 0) == []
    with pytest.raises(ValueError, match="at least one real entry"):
        bench.synthetic_entry_rows([], 3)


def test_parse_sizes(bench):
    assert bench.parse_sizes("10000, 100000,") == [10000, 100000]
    assert bench.parse_sizes("") == []


def test_recall_checkpoint_rejects_unknown_model(bench, tmp_path):
    with pytest.raises(ValueError, match="unknown search model 'b16': choose one of tiny, b32"):
        bench.recall_checkpoint("b16", tmp_path, tmp_path)


def test_search_table_states_model_and_dim(bench):
    row = {"count": 100_000, "model": "b32", "dim": 512, "index_type": "ivf", "nprobe": 8, "build_s": 61.4,
           "build_cpu_s": 90.2, "requests": 480, "in": (40.0, 55.5), "http1": (44.0, 60.0),
           "http16": (300.0, 420.25), "ratio": 1.1}
    lines = bench.search_markdown_table([row]).splitlines()
    assert lines[0].startswith("| entries (24 real + synthetic) | recall model | dim | index type |")
    assert lines[2] == ("| 100,000 | ViT-B/32 two-tower (msrvtt9k-meanp-b32, random init) | 512 | ivf | 8 | 61 (90) | 480 | "
                        "40.00 / 55.50 | 44.00 / 60.00 | 300.00 / 420.25 | 1.10× | 4.00 |")
    assert len(lines[1].split("|")) == len(lines[0].split("|")) == len(lines[2].split("|"))
