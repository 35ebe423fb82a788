"""Shared test fixtures. Tests never touch the network: HF_HUB_OFFLINE is forced here too."""
from __future__ import annotations

import importlib.util
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread_for_shared_fixtures():
    # Session- and module-scoped fixtures are set up before the per-test fixture below, so without
    # this they would compute their references with the default thread count: GEMMs over a few
    # rows (a query encoded up to its EOT) round differently with 1 and 2 threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two cores shared by the whole suite: one intra-op thread keeps runs fast and results stable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    """A small synthetic benchmark (real H.264 clips + JSONL + MSR-VTT layout), built once."""
    from vidseek.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(out, SynthConfig(num_videos=40, seed=3, frames=8, size=32), progress=False)
    return out


@contextmanager
def imported_benchmark(name: str) -> Iterator[ModuleType]:
    """benchmarks/<name>.py imported as a module (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
