"""torch.distributed helpers for `torchrun` (NCCL on GPUs, gloo on CPU).

Contrastive negatives: every rank all-gathers the whole batch's representations *with
gradient* (`torch.distributed.nn.functional.all_gather`, whose backward sums each rank's
gradient back to the owner), so the loss every rank computes is the global-batch loss. Gradients
are then averaged across ranks by hand after backward (instead of DDP's hooks, which do not fit
gradient caching's several backward passes per step): the result equals single-process training
on the same global batch (tested with 2 gloo processes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vidseek.models.base import tree_map


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    info = DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        torch.cuda.set_device(info.local_rank)
    return info


def all_gather_tree(tree: Any, info: DistInfo) -> Any:
    """Concatenate every rank's tensors along dim 0, differentiably (all ranks same shapes)."""
    if not info.enabled:
        return tree
    from torch.distributed.nn.functional import all_gather

    return tree_map(lambda t: torch.cat(all_gather(t.contiguous()), dim=0), tree)


def average_gradients(model: nn.Module, info: DistInfo) -> None:
    """Mean of each parameter's gradient over ranks (a missing gradient counts as zero)."""
    if not info.enabled:
        return
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(info.world_size)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def broadcast_object(obj: Any, info: DistInfo) -> Any:
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
