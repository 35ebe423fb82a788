"""DDP with all-gathered negatives: 2 gloo processes on the CPU give the same loss and the same
gradients as one process on the same global batch (with and without gradient caching)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vidseek.models.registry import create_model, get_preset
from vidseek.train.data import RawFrames
from vidseek.train.distributed import DistInfo, average_gradients
from vidseek.train.loop import train_step

GLOBAL_BATCH = 8


def make_model_and_batch():
    torch.manual_seed(0)
    model = create_model(get_preset("synth-seqtransf-tiny"))
    captions = [f"a {c} circle moves {d}" for c in ("red", "blue", "green", "white") for d in ("left", "up")]
    tokens = model.clip.tokenize(captions, context_length=32)
    g = torch.Generator().manual_seed(1)
    frames = RawFrames(torch.randn(GLOBAL_BATCH, 3, 3, 48, 48, generator=g), torch.ones(GLOBAL_BATCH, 3, dtype=torch.bool))
    return model, tokens, frames


def grads_of(model):
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def worker(rank: int, world: int, rendezvous: str, out_dir: str, micro: int | None) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        model, tokens, frames = make_model_and_batch()
        per = GLOBAL_BATCH // world
        sl = slice(rank * per, (rank + 1) * per)
        local = RawFrames(frames.pixels[sl], frames.mask[sl])
        info = DistInfo(rank=rank, world_size=world)
        out = train_step(model, tokens[sl], local, micro, info)
        average_gradients(model, info)
        torch.save({"loss": float(out.loss.detach()), "grads": grads_of(model)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("micro", [None, 2])
def test_two_process_gloo_equals_single_process(tmp_path, micro):
    model, tokens, frames = make_model_and_batch()
    reference = train_step(model, tokens, frames, None, DistInfo())
    ref_grads = grads_of(model)

    mp.start_processes(worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), micro), nprocs=2, join=True,
                       start_method="spawn")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["loss"] == pytest.approx(float(reference.loss.detach()), abs=1e-5)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-3, atol=1e-6, msg=name)
