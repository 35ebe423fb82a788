"""AdamW with separate CLIP / new-module learning rates, no decay on biases and norms,
and linear warmup followed by cosine decay (CLIP4Clip / open_clip recipe)."""
from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, lr: float, clip_lr_coef: float, weight_decay: float) -> list[dict]:
    """Four groups: {CLIP backbone, new modules} × {decayed weights, biases/norms/embeddings-scalars}.

    CLIP4Clip fine-tunes the pretrained towers at lr·coef (coef 1e-3) so they are not destroyed
    by the much larger learning rate of the freshly initialised modules.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {(c, d): [] for c in (True, False) for d in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_clip = name.startswith("clip.")
        # Biases, LayerNorm gains/shifts and scalars (logit scale) have ndim < 2: not decayed.
        decay = param.ndim >= 2
        groups[(is_clip, decay)].append(param)
    out = []
    for (is_clip, decay), params in groups.items():
        if params:
            out.append(
                {
                    "params": params,
                    "lr": lr * (clip_lr_coef if is_clip else 1.0),
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"{'clip' if is_clip else 'new'}-{'decay' if decay else 'no_decay'}",
                }
            )
    return out


def build_optimizer(model: nn.Module, lr: float, clip_lr_coef: float, weight_decay: float) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, lr, clip_lr_coef, weight_decay), betas=(0.9, 0.98), eps=1e-6)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Multiplier for LambdaLR: linear 0→1 over warmup, then cosine 1→0 at total_steps."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, int(total_steps * warmup_fraction)))
