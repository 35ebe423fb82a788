"""Training/evaluation inputs: where a video's frames or frame features come from, and batches.

Two video sources share one small interface (`features(model, indices) -> FrameFeatures`):
- `FrameCache`: decoded + preprocessed frames of every video of a split, decoded ONCE into a
  float16 memory-mapped file (resumable, failures recorded), so end-to-end training does not
  re-decode each epoch. The image tower runs in the model (`model.encode_frames`).
- `StoreSource`: frame features written by `vidseek extract` (frozen image tower; the fast path).

`EpochBatches` draws each epoch's batches deterministically from (seed, epoch): every video
once per epoch with one of its captions, optionally placing each clip's hard-negative partners
right after it so they share its batch (order is learned only that way — DESIGN.md, synthetic
benchmark). Partners come from a source (`vidseek.data.hard_negatives.partners_for`): the
dataset's groups, or mined from the captions.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
import torch

from vidseek.errors import DatasetError, VidseekError
from vidseek.models.base import FrameFeatures, RetrievalModel
from vidseek.utils import atomic_write_json


@dataclass
class RawFrames:
    """Decoded frames travelling through the training step (sliceable/concatenable like features)."""

    pixels: torch.Tensor  # [B, T, 3, S, S] CLIP-normalised
    mask: torch.Tensor  # [B, T] bool


class VideoSource(Protocol):
    @property
    def usable(self) -> list[int]: ...

    def features(self, model: RetrievalModel, indices: Sequence[int]) -> FrameFeatures: ...

    def train_inputs(self, indices: Sequence[int], device: str) -> RawFrames | FrameFeatures: ...


class FrameCache:
    """float16 [N, T, 3, S, S] CLIP-normalised frames + bool mask [N, T] for a list of videos.

    Built in `root` (a folder of the run or cache); resumes after a kill: rows already decoded
    are kept (a `done` flag per row is flushed after the row's data). A video that cannot be
    decoded is recorded in `failures.json` and excluded — never replaced by zero frames.
    """

    def __init__(self, root: str | Path, paths: Sequence[str | Path], num_frames: int, size: int,
                 starts: Sequence[float | None] | None = None, ends: Sequence[float | None] | None = None):
        self.root = Path(root)
        self.paths = [str(p) for p in paths]
        self.num_frames = num_frames
        self.size = size
        self.starts = list(starts) if starts is not None else [None] * len(self.paths)
        self.ends = list(ends) if ends is not None else [None] * len(self.paths)
        n = len(self.paths)
        self.root.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha1(json.dumps([self.paths, self.starts, self.ends, num_frames, size]).encode()).hexdigest()[:12]
        self.frames_path = self.root / f"frames-{key}.f16"
        self.mask_path = self.root / f"mask-{key}.u8"
        self.done_path = self.root / f"done-{key}.u8"
        self.failures_path = self.root / f"failures-{key}.json"
        shape = (max(n, 1), num_frames, 3, size, size)
        mode = "r+" if self.frames_path.exists() else "w+"
        self.frames = np.memmap(self.frames_path, dtype=np.float16, mode=mode, shape=shape)
        self.mask = np.memmap(self.mask_path, dtype=np.uint8, mode=mode, shape=(max(n, 1), num_frames))
        self.done = np.memmap(self.done_path, dtype=np.uint8, mode=mode, shape=(max(n, 1),))
        self.failures: dict[int, str] = {}
        if self.failures_path.exists():
            self.failures = {int(k): v for k, v in json.loads(self.failures_path.read_text()).items()}

    def build(self, threads: int = 2, progress: bool = True) -> "FrameCache":
        """Decode every row not yet done (bounded threads; PyAV releases the GIL while decoding)."""
        from vidseek.video import load_video_tensor

        todo = [i for i in range(len(self.paths)) if not self.done[i] and i not in self.failures]
        if not todo:
            return self

        def work(i: int):
            try:
                x, m, _ = load_video_tensor(self.paths[i], self.num_frames, self.size, start=self.starts[i], end=self.ends[i])
                return i, x, m, None
            except VidseekError as err:
                return i, None, None, str(err)

        from rich.progress import Progress

        with Progress(disable=not progress, transient=True) as bar, ThreadPoolExecutor(max_workers=threads) as pool:
            task = bar.add_task(f"decoding {len(todo)} videos", total=len(todo))
            for i, x, m, err in pool.map(work, todo):
                if err is not None:
                    self.failures[i] = err
                    atomic_write_json(self.failures_path, {str(k): v for k, v in self.failures.items()})
                else:
                    self.frames[i] = x.numpy().astype(np.float16)
                    self.mask[i] = m.numpy().astype(np.uint8)
                    self.frames.flush()
                    self.mask.flush()
                    self.done[i] = 1
                    self.done.flush()
                bar.advance(task)
        return self

    @property
    def usable(self) -> list[int]:
        return [i for i in range(len(self.paths)) if self.done[i]]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices)
        frames = torch.from_numpy(np.asarray(self.frames[idx], dtype=np.float32))
        mask = torch.from_numpy(np.asarray(self.mask[idx]).astype(bool))
        return frames, mask

    def train_inputs(self, indices: Sequence[int], device: str) -> RawFrames:
        frames, mask = self.batch(indices)
        return RawFrames(frames.to(device), mask.to(device))

    def features(self, model: RetrievalModel, indices: Sequence[int]) -> FrameFeatures:
        raw = self.train_inputs(indices, model.device)
        return model.encode_frames(raw.pixels, raw.mask)


class StoreSource:
    """Frame features from a `vidseek extract` feature store, addressed by the records' keys."""

    def __init__(self, store, keys: Sequence[str], patches: bool = False):
        self.store = store
        self.keys = list(keys)
        self.patches = patches
        present = set(r.key for r in store.rows())
        self.missing = [k for k in self.keys if k not in present]

    @property
    def usable(self) -> list[int]:
        missing = set(self.missing)
        return [i for i, k in enumerate(self.keys) if k not in missing]

    def train_inputs(self, indices: Sequence[int], device: str) -> FrameFeatures:
        keys = [self.keys[i] for i in indices]
        feats, mask = self.store.frame_features(keys)
        patches = torch.from_numpy(self.store.patch_features(keys)).to(device) if self.patches else None
        return FrameFeatures(frames=torch.from_numpy(feats).to(device), mask=torch.from_numpy(mask).to(device),
                             patches=patches)

    def features(self, model: RetrievalModel, indices: Sequence[int]) -> FrameFeatures:
        return self.train_inputs(indices, model.device)


def _partner_index(partner: Any) -> int:
    return int(getattr(partner, "index", partner))


def _stable_int(*parts: object) -> int:
    return zlib.crc32("/".join(map(str, parts)).encode())


@dataclass
class EpochBatches:
    """Deterministic batches of record indices for each epoch (drop the last partial batch so
    every step has the full contrastive batch, and every rank the same shapes).

    With `partners` (per record index, a list of `Partner`s or record indices), clips are drawn in
    a seeded random order and each drawn clip is followed by its partners not yet placed this
    epoch, so a clip and its hard negatives land in one batch (unless cut at a batch boundary).
    Every usable clip still appears exactly once per epoch.

    With `twin_pairs` > 0 (twin-heavy batches, docs/synthetic-recipe.md run D), every batch
    instead opens with that many disjoint partner pairs of kind `twin_kind` at positions
    (0, 1), (2, 3), … — where `partner_infonce` expects them — and the remaining slots take the
    other clips in a seeded random order, each once per epoch. Pairs are shuffled each epoch and
    cycle when they run out, so a twin clip can recur across batches but never within one.
    """

    usable: Sequence[int]
    batch_size: int
    seed: int
    partners: Sequence[Sequence[Any]] | None = None
    twin_pairs: int = 0
    twin_kind: str = "any"

    def twin_pair_list(self) -> list[tuple[int, int]]:
        """Disjoint (clip, partner) pairs of `twin_kind`, greedy in clip order (deterministic)."""
        usable, placed, pairs = set(int(i) for i in self.usable), set(), []
        for clip in sorted(usable):
            for partner in self.partners[clip] if self.partners is not None else ():
                other = _partner_index(partner)
                kind_ok = self.twin_kind == "any" or getattr(partner, "kind", None) == self.twin_kind
                if kind_ok and other in usable and clip not in placed and other not in placed:
                    pairs.append((clip, other))
                    placed.update((clip, other))
        return pairs

    def for_epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        if self.twin_pairs:
            return self._twin_batches(rng)
        drawn = [int(i) for i in rng.permutation(np.asarray(self.usable))]
        if self.partners is None:
            order = drawn
        else:
            usable, placed, order = set(drawn), set(), []
            for clip in drawn:
                if clip in placed:
                    continue
                cluster = [clip] + [p for p in map(_partner_index, self.partners[clip]) if p in usable and p not in placed]
                placed.update(cluster)
                order.extend(cluster)
        n = len(order) // self.batch_size
        return [order[b * self.batch_size:(b + 1) * self.batch_size] for b in range(n)]

    def _twin_batches(self, rng: np.random.Generator) -> list[list[int]]:
        pairs = self.twin_pair_list()
        if len(pairs) < self.twin_pairs:
            raise DatasetError(f"twin_share asks for {self.twin_pairs} partner pairs per batch but the training clips "
                               f"have only {len(pairs)} disjoint pairs of kind {self.twin_kind!r}: lower --twin-share, "
                               f"or use --twin-kind any / --hard-negatives mined")
        in_pairs = {clip for pair in pairs for clip in pair}
        others = [int(i) for i in rng.permutation(sorted(set(int(i) for i in self.usable) - in_pairs))]
        pairs = [pairs[k] for k in rng.permutation(len(pairs))]
        random_slots = self.batch_size - 2 * self.twin_pairs
        batches, next_pair = [], 0
        for b in range(len(others) // random_slots):
            batch = []
            for _ in range(self.twin_pairs):
                batch.extend(pairs[next_pair % len(pairs)])
                next_pair += 1
            batches.append(batch + others[b * random_slots:(b + 1) * random_slots])
        return batches

    def caption_choice(self, epoch: int, index: int, num_captions: int) -> int:
        """Which caption of video `index` is used in `epoch` (independent of the global RNG)."""
        return _stable_int(self.seed, epoch, index) % num_captions
