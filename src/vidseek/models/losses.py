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


def partner_infonce(logits: Tensor, num_pairs: int) -> Tensor:
    """2-way cross-entropy between each query and its hard-negative partner.

    Rows/columns (2i, 2i+1), i < `num_pairs`, of the [B, B] scaled logit matrix are partner
    pairs (a, b) (`EpochBatches` twin batches). Mean of four 2-way cross-entropies per pair:
    text a over videos {a, b}, text b over {b, a}, video a over texts {a, b}, video b over
    {b, a} — a loss that only separating the twins can lower, however easy the rest of the
    batch is (docs/synthetic-recipe.md, run D).
    """
    a = torch.arange(0, 2 * num_pairs, 2, device=logits.device)
    b = a + 1
    own_a, own_b = logits[a, a], logits[b, b]
    two_way = torch.stack([
        torch.stack([own_a, logits[a, b]], 1),  # text a: its video vs the partner's
        torch.stack([own_b, logits[b, a]], 1),  # text b
        torch.stack([own_a, logits[b, a]], 1),  # video a: its text vs the partner's
        torch.stack([own_b, logits[a, b]], 1),  # video b
    ])  # [4, P, 2], the correct choice in column 0
    target = torch.zeros(4 * num_pairs, dtype=torch.long, device=logits.device)
    return F.cross_entropy(two_way.reshape(-1, 2), target)


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
