"""Which frames to take from a video: pure index arithmetic, no I/O.

Every function returns sorted, distinct frame indices in ``[0, total_frames - 1]``; decoding
(`vidseek.video.decode`) turns them into pixels. The strategies are the ones the seed methods use:

- uniform: CLIP4Clip / X-CLIP / TC-MGC evaluation sample T = 12 frames evenly over the clip
  (CLIP4Clip `RawVideoExtractor`, `np.linspace(0, n - 1, T)`); we round to the nearest frame
  instead of CLIP4Clip's truncation so the samples are symmetric about the clip's middle.
- fps: CLIP4Clip's training extractor takes one frame per second (``sample_fp``) and falls back
  to uniform when that gives more than ``max_frames``.
- jitter: TSN's segment-based sampling (Wang et al., ECCV 2016, section 3.2): cut the clip into T
  equal segments and draw one random frame in each, a training-time augmentation.
- segment_windows: fixed-length, optionally overlapping time windows for searching long videos
  (ActivityNet / DiDeMo-length footage) with a clip-level model.
"""
from __future__ import annotations

import math

import numpy as np

from vidseek.errors import ConfigError

# Float tolerance when mapping times to frame numbers: k / target_fps * video_fps is often an
# integer that floating point lands just below (3 * (25 / 3) == 24.999999999999996).
_TIME_EPS = 1e-9


def _check_total(total_frames: int) -> None:
    if total_frames <= 0:
        raise ValueError(f"total_frames must be positive, got {total_frames}")


def _check_num(num_frames: int) -> None:
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")


def uniform_indices(total_frames: int, num_frames: int) -> list[int]:
    """``num_frames`` indices spread evenly over ``[0, total_frames - 1]``, both ends included.

    ``np.linspace(0, total_frames - 1, num_frames)`` rounded half up (CLIP4Clip-style uniform
    sampling). A clip with ``total_frames <= num_frames`` gives every frame once; the caller pads
    and masks (`vidseek.video.preprocess.pad_frames`).
    """
    _check_total(total_frames)
    _check_num(num_frames)
    if total_frames <= num_frames:
        return list(range(total_frames))
    positions = np.linspace(0.0, total_frames - 1, num_frames)
    # floor(x + 0.5) instead of np.round: numpy rounds halves to even, which would make the
    # sample pattern depend on the parity of the neighbouring index.
    return [int(math.floor(p + 0.5)) for p in positions]


def fps_indices(
    total_frames: int, video_fps: float, target_fps: float, max_frames: int | None = None
) -> list[int]:
    """One frame every ``1 / target_fps`` seconds: the frame on screen at t = k / target_fps.

    Frame i is on screen during ``[i / video_fps, (i + 1) / video_fps)``, so the frame shown at
    time t is ``floor(t * video_fps)``. When this gives more than ``max_frames`` frames, take
    ``max_frames`` of them uniformly (CLIP4Clip's ``sample_fp`` extractor does the same).
    """
    _check_total(total_frames)
    if video_fps <= 0 or target_fps <= 0:
        raise ValueError(f"frame rates must be positive, got video_fps={video_fps}, target_fps={target_fps}")
    if max_frames is not None:
        _check_num(max_frames)
    frames_per_sample = video_fps / target_fps
    indices: list[int] = []
    k = 0
    while True:
        index = int(math.floor(k * frames_per_sample + _TIME_EPS))
        if index >= total_frames:
            break
        if not indices or index != indices[-1]:  # target_fps > video_fps repeats frames
            indices.append(index)
        k += 1
    if max_frames is not None and len(indices) > max_frames:
        indices = [indices[i] for i in uniform_indices(len(indices), max_frames)]
    return indices


def jitter_indices(total_frames: int, num_frames: int, rng: np.random.Generator) -> list[int]:
    """TSN segment sampling: ``num_frames`` equal segments, one uniformly random frame in each.

    Segment i holds frames ``[floor(i * n / T), floor((i + 1) * n / T))`` (integer arithmetic, so
    the segments tile the clip exactly). Results are sorted and distinct. A clip with
    ``total_frames <= num_frames`` gives every frame once, as `uniform_indices` does.
    """
    _check_total(total_frames)
    _check_num(num_frames)
    if total_frames <= num_frames:
        return list(range(total_frames))
    bounds = [(i * total_frames) // num_frames for i in range(num_frames + 1)]
    return [int(rng.integers(bounds[i], bounds[i + 1])) for i in range(num_frames)]


def segment_windows(
    duration: float, segment_seconds: float, overlap_seconds: float = 0.0
) -> list[tuple[float, float]]:
    """Time windows ``(start, end)`` that cover ``[0, duration]`` for long-video search.

    Windows are ``segment_seconds`` long and start every ``segment_seconds - overlap_seconds``;
    the last window is cut at ``duration`` (it may be shorter than the others). A video shorter
    than one segment gives the single window ``(0, duration)``.
    Example: 25 s, 10 s segments, 2 s overlap -> (0, 10), (8, 18), (16, 25).
    """
    if duration <= 0:
        raise ValueError(f"duration must be positive, got {duration}")
    if segment_seconds <= 0:
        raise ConfigError(f"segment length must be positive, got {segment_seconds} s; pass e.g. 10")
    if overlap_seconds < 0 or overlap_seconds >= segment_seconds:
        raise ConfigError(
            f"segment overlap {overlap_seconds} s must be in [0, segment length {segment_seconds} s); "
            "pass a smaller overlap"
        )
    stride = segment_seconds - overlap_seconds
    windows: list[tuple[float, float]] = []
    k = 0
    while True:
        start = k * stride  # multiply, not accumulate, so long videos do not drift
        end = start + segment_seconds
        if end >= duration - _TIME_EPS:
            windows.append((start, float(duration)))
            return windows
        windows.append((start, end))
        k += 1
