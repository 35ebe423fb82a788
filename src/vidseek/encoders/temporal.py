"""Temporal encoder over per-frame CLIP features (CLIP4Clip "seqTransf", Luo et al. 2022, §3.3).

Also the temporal encoder of X-CLIP and TC-MGC (paper 004, §3.2: "a temporal transformer with
4 layers"). frames [B,T,D] → + learned frame position embedding → CLIP-style residual attention
blocks (masked so padded frames are never attended to) → + the input (residual) → [B,T,D].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class QuickGELU(nn.Module):
    """CLIP's activation: x·σ(1.702x). Kept so the block matches the CLIP towers it sits on."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block as in CLIP: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), QuickGELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class TemporalTransformer(nn.Module):
    """seqTransf: position embedding + `layers` CLIP blocks + residual to the input frames.

    `mask` [B,T] is True at real frames. Padded frames are excluded as keys; their outputs are
    still computed (and should be ignored by the caller's masked pooling).
    """

    def __init__(self, width: int, layers: int = 4, heads: int | None = None, max_frames: int = 64):
        super().__init__()
        self.frame_position = nn.Embedding(max_frames, width)
        heads = heads or max(1, width // 64)
        self.blocks = nn.ModuleList(ResidualAttentionBlock(width, heads) for _ in range(layers))
        nn.init.normal_(self.frame_position.weight, std=0.01)

    def forward(self, frames: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, _ = frames.shape
        if t > self.frame_position.num_embeddings:
            raise ValueError(f"{t} frames exceed the temporal encoder's max_frames={self.frame_position.num_embeddings}")
        positions = torch.arange(t, device=frames.device)
        x = frames + self.frame_position(positions)[None]
        padding = None if mask is None else ~mask.bool()
        for block in self.blocks:
            x = block(x, key_padding_mask=padding)
        return x + frames


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over dim 1 of [B,T,D] counting only positions where mask [B,T] is True."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)
