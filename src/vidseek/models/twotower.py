"""CLIP4Clip two-tower baseline: meanP and seqTransf (Luo et al., "CLIP4Clip", 2022, §3.2–3.3).

Text  = the CLIP text tower's EOT feature.
Video = per-frame CLIP CLS features (optionally plus a pooled patch grid, `patch_grid`, ours),
        optionally through the seqTransf temporal encoder
        (learned frame position embedding + 4 CLIP-style blocks + residual), then a masked mean.
Score = cosine similarity; training loss = symmetric InfoNCE on cosine × a learnable logit scale
        (clamped ≤ 100) — CLIP4Clip Eq. 8–10. It starts as the release does: from the loaded
        CLIP checkpoint's own logit scale (100 for OpenAI weights), or 1/0.07 from random init.

With pretrained weights the seqTransf encoder starts from the text tower's first layers and
positional rows (CLIP4Clip's release; `TemporalTransformer.init_from_text_tower`).

The L2-normalised mean-pooled video vector is also the dense index vector (`index_video`), so
this model is a recall stage of the search cascade.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import Tensor, nn
from torch.nn import functional as F

from vidseek.encoders.temporal import TemporalTransformer, masked_mean
from vidseek.models.base import FrameFeatures, LossOutput, RetrievalModel, TextFeatures
from vidseek.models.losses import LogitScale, symmetric_infonce


@dataclass
class TwoTowerConfig:
    """`pooling="meanP"`: parameter-free masked mean; `"seqTransf"`: temporal transformer first."""

    pooling: Literal["meanP", "seqTransf"] = "meanP"
    temporal_layers: int = 4  # CLIP4Clip uses 4 layers for seqTransf
    max_frames: int = 64
    logit_scale_init: float | None = None  # None: the loaded checkpoint's (release), 1/0.07 from random init
    # Not in CLIP4Clip: k > 0 adds each frame's patch tokens, mean-pooled to a k × k grid, to its
    # CLS feature through a zero-initialised linear map (training starts as CLS-only), before the
    # temporal encoder. A small CLIP's CLS can drop where things are (docs/synthetic-recipe.md,
    # Round 3: on the synthetic benchmark's tower, position R² 0 from the CLS, 0.55 from a 3 × 3
    # grid, and a supervised probe orders events 77 % from the CLS, 94 % with the grid).
    patch_grid: int = 0


class TwoTower(RetrievalModel):
    name: ClassVar[str] = "twotower"

    def __init__(self, clip: nn.Module, config: TwoTowerConfig | None = None):
        super().__init__(clip)
        self.config = config or TwoTowerConfig()
        if self.config.pooling not in ("meanP", "seqTransf"):
            from vidseek.errors import ConfigError

            raise ConfigError(f"unknown two-tower pooling {self.config.pooling!r}: use 'meanP' or 'seqTransf'")
        if self.config.patch_grid < 0:
            from vidseek.errors import ConfigError

            raise ConfigError(f"two-tower patch_grid must be 0 (off) or a grid side >= 1, got {self.config.patch_grid}")
        width = clip.embed_dim
        self.grid_proj: nn.Linear | None = None
        if self.config.patch_grid:
            self.needs_patches = True  # extraction stores patch tokens, training loads them
            self.grid_proj = nn.Linear(self.config.patch_grid ** 2 * width, width)
            nn.init.zeros_(self.grid_proj.weight)
            nn.init.zeros_(self.grid_proj.bias)
        self.temporal = (
            TemporalTransformer(width, layers=self.config.temporal_layers, max_frames=self.config.max_frames)
            if self.config.pooling == "seqTransf"
            else None
        )
        self.logit_scale = LogitScale(init=self.config.logit_scale_init or 1 / 0.07)

    def start_from_pretrained_clip(self) -> None:
        if self.temporal is not None:
            self.temporal.init_from_text_tower(self.clip.model)
        if self.config.logit_scale_init is None:
            self.logit_scale.copy_from_clip(self.clip.model)

    def encode_video_features(self, feats: FrameFeatures) -> Tensor:
        """[B,T,D] frame features → L2-normalised video vector [B,D] (CLIP4Clip's `get_video_avg`)."""
        frames = feats.frames
        if self.grid_proj is not None:
            frames = frames + self.grid_proj(self._pooled_grid(feats))
        if self.temporal is not None:
            frames = self.temporal(frames, feats.mask)
        frames = F.normalize(frames, dim=-1)  # CLIP4Clip normalises each frame before pooling
        return F.normalize(masked_mean(frames, feats.mask), dim=-1)

    def _pooled_grid(self, feats: FrameFeatures) -> Tensor:
        if feats.patches is None:
            from vidseek.errors import ConfigError

            raise ConfigError("two-tower patch_grid needs patch tokens: extract features with patches "
                              "(the model sets needs_patches) or train in mode 'frames'")
        return pool_patch_grid(feats.patches, self.config.patch_grid)

    def score(self, text: TextFeatures, video: Tensor) -> Tensor:
        return F.normalize(text.sentence, dim=-1) @ video.t()

    def loss(self, text: TextFeatures, video: Tensor) -> LossOutput:
        scale = self.logit_scale()
        logits = scale * self.score(text, video)
        loss = symmetric_infonce(logits)
        return LossOutput(loss, {"infonce": float(loss.detach()), "logit_scale": float(scale.detach())}, logits)

    def index_video(self, video: Tensor) -> Tensor:
        return video


def pool_patch_grid(patches: Tensor, cells: int) -> Tensor:
    """[B,T,P,D] patch tokens of a square grid → [B,T,cells²·D]: means over a cells × cells grid
    of blocks (adaptive average pooling), row-major."""
    b, t, p, d = patches.shape
    side = math.isqrt(p)
    if side * side != p or side < cells:
        raise ValueError(f"{p} patch tokens per frame are not a square grid of side >= {cells}")
    grid = patches.reshape(b * t, side, side, d).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(grid, cells).permute(0, 2, 3, 1).reshape(b, t, cells * cells * d)
