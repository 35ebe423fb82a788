"""Shared test fixtures. Tests never touch the network: HF_HUB_OFFLINE is forced here too."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


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
