"""Helpers of benchmarks/search.py: the synthetic entries that grow a real index, size parsing."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from vidseek.search.indexer import Entry

BENCH_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "search.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_search", BENCH_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


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
