"""The Python API users of every research repo ask for (USERS.md, pain point 2)::

    import vidseek
    m = vidseek.load("runs/synth-seqtransf")          # a trained checkpoint (or run folder)
    m.encode_text(["a dog catches a frisbee"])         # [B, D] float32, L2-normalised
    m.encode_video("clip.mp4")                         # [1, D]; a list of paths of any lengths → [N, D]
    m.score(["a dog"], ["a.mp4", "b.mp4"])             # [B_t, B_v] with the model's own scorer

    enc = vidseek.load_encoder("ViT-B-32", weights="ViT-B-32.pt")   # zero-shot CLIP (mean of frames)
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from vidseek.errors import ConfigError
from vidseek.models.base import RetrievalModel, tree_cat
from vidseek.utils import default_device


class VideoTextModel:
    """A loaded model plus the frame/word settings it was trained with."""

    def __init__(self, model: RetrievalModel, frames: int, words: int):
        self.model = model.eval()
        self.frames = frames
        self.words = words

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.no_grad()
    def _text(self, texts: Sequence[str]):
        if isinstance(texts, str):
            texts = [texts]
        if not texts or any(not t.strip() for t in texts):
            raise ConfigError("empty query text: pass one or more non-empty strings")
        tokens = self.model.clip.tokenize(list(texts), context_length=self.words).to(self.device)
        return self.model.encode_text(tokens)

    @torch.no_grad()
    def _videos(self, paths: str | Path | Sequence[str | Path], batch_size: int = 8):
        from vidseek.train.data import RawFrames
        from vidseek.video import load_video_tensor

        if isinstance(paths, (str, Path)):
            paths = [paths]
        parts = []
        for i in range(0, len(paths), batch_size):
            loaded = [load_video_tensor(p, self.frames, self.model.clip.image_size)[:2] for p in paths[i:i + batch_size]]
            raw = RawFrames(torch.stack([x for x, _ in loaded]).to(self.device), torch.stack([m for _, m in loaded]).to(self.device))
            parts.append(self.model.encode_video_features(self.model.encode_frames(raw.pixels, raw.mask)))
        return tree_cat(parts)

    def encode_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """Query vectors [B, D] (L2-normalised) — what the dense index is searched with."""
        return self.model.index_text(self._text(texts)).cpu().numpy()

    def encode_video(self, paths: str | Path | Sequence[str | Path], batch_size: int = 8) -> np.ndarray:
        """One L2-normalised vector per video [N, D]; clips of any length (sampled to `frames`)."""
        with torch.no_grad():
            return self.model.index_video(self._videos(paths, batch_size)).cpu().numpy()

    def score(self, texts: str | Sequence[str], paths: str | Path | Sequence[str | Path]) -> np.ndarray:
        """[B_t, B_v] similarities with the model's own pairwise scorer (rerankers included)."""
        with torch.no_grad():
            return self.model.score(self._text(texts), self._videos(paths)).cpu().numpy()


def load(checkpoint: str | Path, device: str | None = None) -> VideoTextModel:
    """Load a trained vidseek checkpoint (file or run folder) for inference."""
    from vidseek.models.registry import Preset
    from vidseek.train.checkpoint import load_model

    model, payload = load_model(checkpoint, device=device or default_device())
    preset = Preset.from_dict(payload["preset"])
    return VideoTextModel(model, preset.frames, preset.words)


def load_encoder(name: str = "ViT-B-32", weights: str | Path | None = None, frames: int = 12, words: int = 32,
                 device: str | None = None) -> VideoTextModel:
    """Zero-shot CLIP as a video–text encoder: frame CLS features mean-pooled (CLIP4Clip meanP
    without training). `weights` is a local file; without it the towers are randomly initialised."""
    from vidseek.encoders import build_clip
    from vidseek.models.twotower import TwoTower, TwoTowerConfig

    clip = build_clip(name, weights=weights, context_length=words)
    model = TwoTower(clip, TwoTowerConfig(pooling="meanP")).to(device or default_device())
    return VideoTextModel(model, frames, words)
