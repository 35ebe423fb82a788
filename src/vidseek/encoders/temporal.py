"""Temporal encoder over per-frame CLIP features (CLIP4Clip "seqTransf", Luo et al. 2022, §3.3).

Also the temporal encoder of X-CLIP and TC-MGC (paper 004, §3.2: "a temporal transformer with
4 layers"). frames [B,T,D] → + learned frame position embedding → CLIP-style residual attention
blocks (masked so padded frames are never attended to) → + the input (residual) → [B,T,D].

Initialisation: random without pretrained CLIP weights. With them, `init_from_text_tower` does
what the CLIP4Clip release does when it loads OpenAI weights (its "initialization trick", which
TC-MGC and X-CLIP inherit): block i starts as the CLIP text transformer's residual block i, and
the frame position embedding as the text positional embedding's first rows.
"""
from __future__ import annotations

import warnings

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

    @torch.no_grad()
    def init_from_text_tower(self, clip_model: nn.Module) -> bool:
        """Copy the open_clip text tower's first blocks and positional rows in (CLIP4Clip release).

        Blocks beyond the text tower's depth and frame positions beyond its context keep their
        random init (as in the release, which copies what exists). The head count stays this
        encoder's own (the release's width // 64, equal to the text tower's in OpenAI's CLIPs).
        Returns False, with a warning, when the widths differ so nothing can be copied (not the
        case for any OpenAI CLIP; our `tiny` config has text width 96 but joint width 64).
        """
        text_blocks = clip_model.transformer.resblocks
        width, own_width = clip_model.transformer.width, self.frame_position.embedding_dim
        if width != own_width:
            warnings.warn(f"temporal encoder ({own_width} wide) cannot start from the CLIP text tower "
                          f"({width} wide): it keeps its random initialisation", stacklevel=2)
            return False
        for block, text_block in zip(self.blocks, text_blocks):
            if not (isinstance(text_block.ls_1, nn.Identity) and isinstance(text_block.ls_2, nn.Identity)):
                raise ValueError("the CLIP text tower uses layer scale, which the temporal encoder's blocks lack")
            block.ln_1.load_state_dict(text_block.ln_1.state_dict())
            block.attn.load_state_dict(text_block.attn.state_dict())
            block.ln_2.load_state_dict(text_block.ln_2.state_dict())
            block.mlp[0].load_state_dict(text_block.mlp.c_fc.state_dict())
            block.mlp[2].load_state_dict(text_block.mlp.c_proj.state_dict())
        rows = min(self.frame_position.num_embeddings, clip_model.positional_embedding.shape[0])
        self.frame_position.weight[:rows].copy_(clip_model.positional_embedding[:rows])
        return True

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
