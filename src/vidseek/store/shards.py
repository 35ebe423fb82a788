"""Feature store: append-only fp16 shards read via `np.memmap`, indexed by the SQLite catalog.

Shards: fixed-size rows of fp16 in flat files, read back via `np.memmap`.

A shard file `<name>-<shard>.bin` holds up to `rows_per_shard` rows of `row_shape` values with no
header, so row r of shard s lives at byte `r * row_bytes`; reading n rows touches only their pages
(no full load), which keeps a million-video store cheap to serve from.

Writes go through ordinary positional file writes and are `fdatasync`ed by `flush()`; the caller
commits the catalog rows only after that. Where the next row goes comes from the catalog's
committed high-water marks, not from the file size: rows written by a process that died before
committing are not referenced by anything and are overwritten by the next append.
"""
from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from vidseek.errors import ConfigError, DatasetError
from vidseek.store.catalog import STATUS_OK, Catalog, CatalogRow, OkEntry
from vidseek.utils import atomic_write_json, read_json_or_reason


def next_location(committed_rows: Mapping[int, int], rows_per_shard: int) -> tuple[int, int]:
    """(shard, row) right after the last committed row, given {shard: committed row count}."""
    if not committed_rows:
        return (0, 0)
    last = max(committed_rows)
    used = committed_rows[last]
    return (last + 1, 0) if used >= rows_per_shard else (last, used)


class FeatureShards:
    """One named array of rows (e.g. per-video frame features [T, D]) split over shard files."""

    def __init__(self, root: str | Path, name: str, row_shape: tuple[int, ...], rows_per_shard: int = 4096,
                 dtype: str = "float16", start: tuple[int, int] = (0, 0)):
        if rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
        self.root = Path(root)
        self.name = name
        self.row_shape = tuple(int(d) for d in row_shape)
        self.rows_per_shard = int(rows_per_shard)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self._next = start
        self._dirty: set[int] = set()
        self._write_fds: dict[int, int] = {}
        self._read_maps: dict[int, np.memmap] = {}

    def shard_path(self, shard: int) -> Path:
        return self.root / f"{self.name}-{shard:05d}.bin"

    @property
    def next_location(self) -> tuple[int, int]:
        return self._next

    def seek(self, location: tuple[int, int]) -> None:
        """Continue appending at `location` (e.g. after a rollback of uncommitted rows)."""
        self._next = location

    # --- writing ----------------------------------------------------------------------------

    def append(self, array: np.ndarray, flush: bool = True) -> tuple[int, int]:
        """Write one row (cast to the shard dtype) at the next free location; return (shard, row).

        With `flush=True` the data is on disk when this returns; pass False to append a batch and
        call `flush()` once before committing the batch's catalog rows.
        """
        row_values = np.ascontiguousarray(array, dtype=self.dtype)
        if row_values.shape != self.row_shape:
            raise ValueError(f"{self.name}: row shape {row_values.shape} != store row shape {self.row_shape}")
        shard, row = self._next
        fd = self._write_fd(shard)
        os.pwrite(fd, row_values.tobytes(), row * self.row_bytes)
        self._dirty.add(shard)
        self._next = (shard + 1, 0) if row + 1 >= self.rows_per_shard else (shard, row + 1)
        if flush:
            self.flush()
        return (shard, row)

    def append_rows(self, arrays: np.ndarray) -> list[tuple[int, int]]:
        """Append `arrays[i]` for each i, flush once, and return their locations."""
        locations = [self.append(a, flush=False) for a in arrays]
        self.flush()
        return locations

    def flush(self) -> None:
        """Force written rows to disk (fdatasync) so a committed catalog row never outlives them."""
        for shard in sorted(self._dirty):
            os.fdatasync(self._write_fds[shard])
        self._dirty.clear()

    def _write_fd(self, shard: int) -> int:
        if shard not in self._write_fds:
            self.root.mkdir(parents=True, exist_ok=True)
            # Only the newest shard is written to; close the older ones' descriptors.
            for old in [s for s in self._write_fds if s < shard]:
                if old in self._dirty:
                    os.fdatasync(self._write_fds[old])
                    self._dirty.discard(old)
                os.close(self._write_fds.pop(old))
            self._write_fds[shard] = os.open(self.shard_path(shard), os.O_RDWR | os.O_CREAT, 0o644)
        return self._write_fds[shard]

    def close(self) -> None:
        self.flush()
        for fd in self._write_fds.values():
            os.close(fd)
        self._write_fds.clear()
        self._read_maps.clear()

    # --- reading ----------------------------------------------------------------------------

    def read(self, locations: Sequence[tuple[int, int]]) -> np.ndarray:
        """float32 [n, *row_shape] for the given (shard, row) locations, in the given order."""
        out = np.empty((len(locations), *self.row_shape), dtype=np.float32)
        if not locations:
            return out
        shards = np.fromiter((s for s, _ in locations), dtype=np.int64, count=len(locations))
        rows = np.fromiter((r for _, r in locations), dtype=np.int64, count=len(locations))
        for shard in np.unique(shards):
            positions = np.nonzero(shards == shard)[0]
            wanted = rows[positions]
            mapped = self._read_map(int(shard), int(wanted.max()) + 1)
            out[positions] = mapped[wanted]
        return out

    def _read_map(self, shard: int, min_rows: int) -> np.memmap:
        mapped = self._read_maps.get(shard)
        if mapped is None or mapped.shape[0] < min_rows:
            path = self.shard_path(shard)
            available = path.stat().st_size // self.row_bytes if path.exists() else 0
            if available < min_rows:
                raise DatasetError(
                    f"feature shard {path} holds {available} rows but the catalog needs row {min_rows - 1}; "
                    f"the store is damaged, re-run `vidseek extract` into a new --out folder")
            mapped = np.memmap(path, dtype=self.dtype, mode="r", shape=(available, *self.row_shape))
            self._read_maps[shard] = mapped
        return mapped


# --- the feature store: catalog + shards + config -------------------------------------------

STORE_CONFIG_FILE = "store.json"
CATALOG_FILE = "catalog.sqlite"
SHARDS_DIR = "shards"
WRITER_LOCK_FILE = ".writer.lock"
FRAMES_ARRAY = "frames"
PATCHES_ARRAY = "patches"
# Cap one shard file at ~1 GiB so patch-token stores stay in manageable files.
_MAX_SHARD_BYTES = 1 << 30
_DEFAULT_ROWS_PER_SHARD = 4096

# Settings that change what the stored features mean; reopening with another value is an error.
# "weights" (checked first) is the image tower's `provenance.weights_fingerprint`: the architecture name alone
# would let two checkpoints' features mix in one store (issue 12).
_IDENTITY_SETTINGS = ("encoder", "embed_dim", "frames", "image_size", "sampling", "patches", "grid",
                      "segment_seconds", "overlap_seconds")
_REQUIRED_SETTINGS = ("encoder", "embed_dim", "frames", "patches", "rows_per_shard")


def read_store_config(root: str | Path) -> dict:
    """The settings a store was created with (`root/store.json`)."""
    config_path = Path(root) / STORE_CONFIG_FILE
    if not config_path.is_file():
        raise DatasetError(f"no feature store at {root} (missing {STORE_CONFIG_FILE}); "
                           f"create one with `vidseek extract <videos> --out {root}`")
    config, reason = read_json_or_reason(config_path)
    if reason is None and (not isinstance(config, dict) or any(name not in config for name in _REQUIRED_SETTINGS)):
        reason = "its settings are missing"
    if reason:
        raise DatasetError(f"feature store config {config_path} is damaged ({reason}); run `vidseek verify` on its "
                           f"index, or re-extract into a new --out folder")
    return config


_LOCK_FDS_HELD: set[int] = set()
_FORK_HOOK_REGISTERED = False


def _forget_lock_in_forked_children(fd: int) -> None:
    """Close inherited writer-lock descriptors in forked children (e.g. DataLoader workers).

    An flock belongs to the open file, which a fork shares: a decode worker outliving a killed
    `extract` would otherwise keep the store locked until it notices its parent is gone.
    """
    global _FORK_HOOK_REGISTERED
    _LOCK_FDS_HELD.add(fd)
    if not _FORK_HOOK_REGISTERED:
        os.register_at_fork(after_in_child=_close_inherited_locks)
        _FORK_HOOK_REGISTERED = True


def _close_inherited_locks() -> None:
    for fd in _LOCK_FDS_HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _LOCK_FDS_HELD.clear()


def _short(fingerprint: str | None) -> str:
    return "weights not recorded" if fingerprint is None else f"weights {fingerprint[:12]}"


@dataclass(frozen=True)
class StoredItem:
    """Identity of one stored row: `key` is `video_id`, or `f"{video_id}#{k}"` for window k."""

    key: str
    video_id: str
    path: str
    start: float | None = None
    end: float | None = None
    duration: float | None = None


class FeatureStore:
    """`root/catalog.sqlite` + `root/store.json` + `root/shards/` (DESIGN.md, data flow "store/").

    Open an existing store for reading with `FeatureStore(root)`; `FeatureStore.create(...)`
    creates one (or reopens it after checking the settings) for writing.
    """

    def __init__(self, root: str | Path, *, _writer: bool = False):
        self.root = Path(root)
        self.config: dict = read_store_config(self.root)
        self._lock_fd: int | None = self._acquire_writer_lock() if _writer else None
        self.catalog = Catalog(self.root / CATALOG_FILE)
        start = next_location(self.catalog.committed_rows(), self.rows_per_shard)
        frames, dim = int(self.config["frames"]), int(self.config["embed_dim"])
        shards_dir = self.root / SHARDS_DIR
        self._frames = FeatureShards(shards_dir, FRAMES_ARRAY, (frames, dim), self.rows_per_shard, start=start)
        self._patches: FeatureShards | None = None
        if self.config["patches"]:
            grid = int(self.config["grid"])
            self._patches = FeatureShards(shards_dir, PATCHES_ARRAY, (frames, grid * grid, dim),
                                          self.rows_per_shard, start=start)

    @classmethod
    def create(cls, root: str | Path, *, encoder: str, embed_dim: int, frames: int, image_size: int,
               patches: bool, grid: int | None, segment_seconds: float | None, overlap_seconds: float,
               sampling: str = "uniform", weights: str | None = None) -> "FeatureStore":
        """Create a store for writing, or reopen one whose settings match exactly.

        Raises `ConfigError` naming the first differing setting, since mixing features of two
        encoders / weights / frame counts / sizes in one store would silently corrupt retrieval.
        `weights` identifies the encoder's weights (`provenance.weights_fingerprint`).
        """
        from vidseek.version import __version__

        root = Path(root)
        if patches and not grid:
            raise ConfigError("patch features need the encoder's patch grid size; pass grid=<patches per side>")
        wanted = {
            "encoder": encoder, "weights": weights, "embed_dim": int(embed_dim), "frames": int(frames), "image_size": int(image_size),
            "sampling": sampling, "patches": bool(patches), "grid": int(grid) if grid else None,
            "segment_seconds": float(segment_seconds) if segment_seconds else None,
            "overlap_seconds": float(overlap_seconds) if segment_seconds else 0.0,
        }
        config_path = root / STORE_CONFIG_FILE
        if config_path.is_file():
            existing = read_store_config(root)
            if existing.get("weights") != weights:
                raise ConfigError(
                    f"feature store {root} holds features of other {encoder} weights "
                    f"({_short(existing.get('weights'))}, these are {_short(weights)}); mixing them would rank "
                    f"wrongly: use the weights it was extracted with, or another --out folder")
            for name in _IDENTITY_SETTINGS:
                if existing.get(name) != wanted[name]:
                    raise ConfigError(
                        f"feature store {root} was extracted with {name}={existing.get(name)!r}, not "
                        f"{wanted[name]!r}; use another --out folder or the store's original settings")
        else:
            frame_row_bytes = frames * embed_dim * 2
            largest_row = frame_row_bytes * (grid * grid if patches else 1)
            rows_per_shard = max(1, min(_DEFAULT_ROWS_PER_SHARD, _MAX_SHARD_BYTES // largest_row))
            atomic_write_json(config_path, {**wanted, "rows_per_shard": rows_per_shard,
                                            "dtype": "float16", "vidseek_version": __version__})
        return cls(root, _writer=True)

    def _acquire_writer_lock(self) -> int:
        # flock is released by the kernel when the holder dies, so kill -9 never leaves it stale.
        fd = os.open(self.root / WRITER_LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"another process is writing to feature store {self.root}; "
                              f"wait for it to finish or use another --out folder") from None
        _forget_lock_in_forked_children(fd)
        return fd

    # --- settings ---------------------------------------------------------------------------

    @property
    def rows_per_shard(self) -> int:
        return int(self.config["rows_per_shard"])

    @property
    def frames(self) -> int:
        return int(self.config["frames"])

    @property
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

    @property
    def has_patches(self) -> bool:
        return bool(self.config["patches"])

    # --- writing ----------------------------------------------------------------------------

    def add(self, items: Sequence[StoredItem], frames: np.ndarray, masks: np.ndarray,
            patches: np.ndarray | None = None) -> None:
        """Store a batch: frame features [n,T,D], masks bool [n,T], patches [n,T,P,D] if the store has them.

        Order matters for crash safety: features are written and fdatasynced first, then the
        catalog rows and the shards' high-water mark are committed in one transaction.
        """
        if self._lock_fd is None:
            raise ConfigError(f"feature store {self.root} was opened read-only; open it with FeatureStore.create")
        if (patches is None) == self.has_patches:
            raise ConfigError(f"feature store {self.root} has patches={self.has_patches}; "
                              f"pass patch features exactly when the store was created with patches")
        if not (len(items) == len(frames) == len(masks)) or (patches is not None and len(patches) != len(items)):
            raise ValueError("add(): items, frames, masks (and patches) must have the same length")
        if not items:
            return
        start = self._frames.next_location
        locations = self._frames.append_rows(frames)
        if self._patches is not None:
            self._patches.seek(start)  # both arrays share the catalog's (shard, row)
            self._patches.append_rows(patches)
        entries = []
        for item, mask, (shard, row) in zip(items, np.asarray(masks, dtype=bool), locations):
            entries.append(OkEntry(
                key=item.key, video_id=item.video_id, path=str(item.path), start=item.start, end=item.end,
                duration=item.duration, num_frames=int(mask.sum()), frame_mask="".join("1" if m else "0" for m in mask),
                shard=shard, row=row))
        self.catalog.mark_ok(entries)

    def mark_failed(self, item: StoredItem, error: str) -> None:
        self.catalog.mark_failed(item.key, item.video_id, item.path, error, start=item.start, end=item.end)

    # --- reading ----------------------------------------------------------------------------

    def _ok_rows(self, keys: Sequence[str]) -> list[CatalogRow]:
        found = self.catalog.get_many(list(keys))
        missing = [k for k in keys if k not in found or found[k].status != STATUS_OK]
        if missing:
            raise DatasetError(f"{len(missing)} key(s) have no features in store {self.root} "
                               f"(first: {missing[0]!r}); run `vidseek extract` for them")
        return [found[k] for k in keys]

    def frame_features(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(float32 [n,T,D] per-frame CLS features, bool [n,T] real-frame mask) for `keys`, in order."""
        rows = self._ok_rows(keys)
        features = self._frames.read([r.location for r in rows])
        masks = np.array([[c == "1" for c in r.frame_mask] for r in rows], dtype=bool).reshape(len(rows), self.frames)
        return features, masks

    def patch_features(self, keys: Sequence[str]) -> np.ndarray:
        """float32 [n,T,P,D] patch-token features (store created with patches=True)."""
        if self._patches is None:
            raise ConfigError(f"feature store {self.root} has no patch features; "
                              f"re-run `vidseek extract --patches` into a new --out folder")
        rows = self._ok_rows(keys)
        return self._patches.read([r.location for r in rows])

    def rows(self) -> list[CatalogRow]:
        """'ok' catalog rows, in storage order."""
        return self.catalog.rows(STATUS_OK)

    def keys(self) -> list[str]:
        return [r.key for r in self.rows()]

    def __len__(self) -> int:
        return len(self.catalog)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        row = self.catalog.get(key)
        return row is not None and row.status == STATUS_OK

    def close(self) -> None:
        self._frames.close()
        if self._patches is not None:
            self._patches.close()
        self.catalog.close()
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            _LOCK_FDS_HELD.discard(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
