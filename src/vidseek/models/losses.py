"""Contrastive losses shared by the models (open_clip style: the loss in its own small module)."""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def symmetric_infonce(logits: Tensor) -> Tensor:
    """Symmetric cross-entropy over a [B, B] logit matrix whose diagonal holds the positive pairs.

    CLIP / CLIP4Clip: mean of the text→video and video→text cross-entropies.
    """
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class LogitScale(torch.nn.Module):
    """Learnable temperature: init ln(1/0.07), clamped to ≤ ln(100) (CLIP, CLIP4Clip)."""

    def __init__(self, init: float = 1 / 0.07, max_value: float = 100.0):
        super().__init__()
        self.log_scale = torch.nn.Parameter(torch.tensor(float(init)).log())
        self.max_log = float(torch.tensor(max_value).log())

    @torch.no_grad()
    def copy_from_clip(self, clip_model: torch.nn.Module) -> None:
        """Start from a loaded CLIP checkpoint's own (log) logit scale — 100 for OpenAI's — as
        CLIP4Clip, X-CLIP and TC-MGC do by scoring with `clip.logit_scale.exp()`."""
        self.log_scale.copy_(clip_model.logit_scale.detach().reshape(()))

    def forward(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log).exp()
