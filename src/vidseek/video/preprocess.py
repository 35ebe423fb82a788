"""Frames -> CLIP image-tower input, and padding to a fixed frame count with a mask.

CLIP's image transform (Radford et al. 2021, released `clip.load` preprocess; CLIP4Clip reuses it
per frame): resize the shorter side to the input size with bicubic interpolation, centre crop,
scale to [0, 1], normalise with CLIP's channel mean and std. We run it batched on a tensor: the
antialiased bicubic resize in torch follows PIL's filter, and rounding to 8-bit after the resize
reproduces PIL's uint8 output, so the result matches the PIL pipeline to one grey level.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vidseek.video.decode import Clip, read_frames

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """Shorter side -> size, longer side scaled and truncated (torchvision `Resize(int)` rule)."""
    if height <= width:
        return size, int(size * width / height)
    return int(size * height / width), size


def preprocess_frames(frames: np.ndarray, size: int) -> torch.Tensor:
    """uint8 RGB ``[n, H, W, 3]`` -> float32 ``[n, 3, size, size]`` normalised CLIP input."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames [n, H, W, 3], got {frames.dtype} {frames.shape}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    n, height, width, _ = frames.shape
    if n == 0:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    new_h, new_w = _resized_size(height, width, size)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        x = x.clamp_(0.0, 255.0).round_()  # PIL returns an 8-bit image
    # Centre crop offsets as torchvision's CenterCrop computes them.
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    x = x[:, :, top : top + size, left : left + size]
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x / 255.0 - mean) / std).contiguous()


def pad_frames(x: torch.Tensor, num_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``[n, 3, S, S]`` at the end to ``num_frames``; mask is True for real frames.

    Short videos give fewer frames than T; models average only masked-in frames (CLIP4Clip's
    ``video_mask``), so the padding never reaches a video embedding.
    """
    n = x.shape[0]
    if n > num_frames:
        raise ValueError(f"got {n} frames, more than num_frames={num_frames}")
    padded = x.new_zeros((num_frames, *x.shape[1:]))
    padded[:n] = x
    mask = torch.zeros(num_frames, dtype=torch.bool)
    mask[:n] = True
    return padded, mask


def load_video_tensor(
    path: str | Path, num_frames: int, size: int, sampling: str = "uniform", **read_kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor, Clip]:
    """`read_frames` + `preprocess_frames` + `pad_frames`: ``([T, 3, S, S], mask [T], clip)``."""
    clip = read_frames(path, num_frames=num_frames, sampling=sampling, **read_kwargs)
    padded, mask = pad_frames(preprocess_frames(clip.frames, size), num_frames)
    return padded, mask, clip
