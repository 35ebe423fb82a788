"""Index a video collection for text search — the ingest half of the recall → rerank cascade.

DESIGN.md data flow: videos ─► store/ (per-frame features from the RECALL model's own image
tower) ─► `index_video(encode_video_features(...))` ─► index/ (dense ANN). A reranker whose image
tower or frame count differs gets its own feature store, so reranking reads exactly the features
its model was trained on.

An index folder holds::

    index.json         models (checkpoint paths + sha256), segment settings, counts, version
    entries.sqlite     the searchable entries: integer id (the dense index id) ↔ key, video id,
                       file, start, end. The server resolves ids here and never joins a request
                       string to a path.
    features/          FeatureStore of the recall model's image tower
    features-rerank/   FeatureStore of the reranker, only when its tower/frames differ
    recall/            the recall backend's state (dense: the saved DenseIndex)
    thumbnails/        poster JPEGs, cached by the server

Models that embed decoded frames (`needs_video_frames`, e.g. PIG with the CLIP-ViP-style "vip"
video ViT, METHODS.md "PIG") cannot start from stored per-frame features. For such a recall model
the store is extracted with one frame per item: it then serves only as the catalog of items and
windows (and of decoding failures); the vectors come from `decode_and_encode_frames` — each
entry's window decoded with `load_video_tensor`, batched, `encode_frames` →
`encode_video_features` → `index_video`. Such a reranker gets no store at all: the searcher
decodes the recalled candidates at query time (`searcher.Reranker`), because its video
representation (`encode_frames` output: frame CLS, global and selected patch tokens) is
model-specific and several times larger than a frame-feature row; decoding `recall_k` clips per
query is the price of keeping reranking exact without a second, model-specific store.

Incremental: running `Indexer.add` again extracts only videos the stores lack and adds only keys
the entry table lacks. Crash safety: new entries are written 'pending' first, then added to the
recall backend and saved, then marked ready in one transaction; pending entries found on the next
run are removed from the backend and added again, so a kill at any point leaves no duplicate.
"""
from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from vidseek.errors import CheckpointError, ConfigError, SearchIndexError, VidseekError

INDEX_FILE = "index.json"
ENTRIES_FILE = "entries.sqlite"
RECALL_STORE_DIR = "features"
RERANK_STORE_DIR = "features-rerank"
RECALL_STATE_DIR = "recall"
THUMBNAIL_DIR = "thumbnails"
INDEX_FORMAT = 1
# Keys encoded per recall-embedding batch (bounds memory; each batch is one catalog transaction).
EMBED_BATCH = 256
# How many per-video failures index.json keeps (the store catalogs keep all of them).
FAILURES_KEPT = 100


# --- the entry table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One searchable item: a whole video or one window of a long one."""

    id: int  # the dense index id
    key: str  # feature-store key: video_id, or "video_id#k" for window k
    video_id: str
    path: str
    start: float  # seconds in the file
    end: float | None  # None when the file's duration is unknown

_ENTRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT NOT NULL UNIQUE,
    video_id  TEXT NOT NULL,
    path      TEXT NOT NULL,
    start     REAL NOT NULL,
    "end"     REAL,
    ready     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS entries_video ON entries (video_id);
"""
_ENTRY_COLUMNS = 'id, key, video_id, path, start, "end"'


class EntryCatalog:
    """SQLite table of searchable entries; safe to share between threads (one lock)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_ENTRY_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return list(self._db.execute(sql, args))

    def add_pending(self, rows: Sequence[tuple[str, str, str, float, float | None]]) -> list[int]:
        """Insert (key, video_id, path, start, end) rows as not yet searchable; their new ids, in order."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [int(self._db.execute('INSERT INTO entries (key, video_id, path, start, "end", ready) '
                                            "VALUES (?,?,?,?,?,0)", row).lastrowid) for row in rows]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return ids

    def mark_ready(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("UPDATE entries SET ready = 1 WHERE id = ?", [(int(i),) for i in ids])
            self._db.execute("COMMIT")

    def pending(self) -> list[Entry]:
        return [Entry(*r) for r in self._query(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE ready = 0 ORDER BY id")]

    def keys(self) -> set[str]:
        return {k for (k,) in self._query("SELECT key FROM entries")}

    def get_many(self, ids: Sequence[int]) -> dict[int, Entry]:
        """Ready entries for the ids that exist (unknown ids are simply absent)."""
        found: dict[int, Entry] = {}
        ids = [int(i) for i in ids]
        for begin in range(0, len(ids), 500):
            chunk = ids[begin:begin + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._query(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE ready = 1 AND id IN ({marks})", chunk):
                found[row[0]] = Entry(*row)
        return found

    def video_entries(self, video_id: str) -> list[Entry]:
        """Ready entries of one video, in time order ([] for an unknown id)."""
        rows = self._query(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE ready = 1 AND video_id = ? ORDER BY start, id",
                           (video_id,))
        return [Entry(*r) for r in rows]

    def entries_of(self, video_ids: Sequence[str]) -> list[Entry]:
        found: list[Entry] = []
        for begin in range(0, len(video_ids), 500):
            chunk = list(video_ids[begin:begin + 500])
            marks = ",".join("?" * len(chunk))
            found += [Entry(*r) for r in self._query(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE video_id IN ({marks}) ORDER BY id", chunk)]
        return found

    def delete(self, ids: Iterable[int]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM entries WHERE id = ?", [(int(i),) for i in ids])
            self._db.execute("COMMIT")

    def counts(self) -> dict[str, int]:
        """{'keys': ready entries, 'videos': distinct videos among them}."""
        ((keys, videos),) = self._query("SELECT COUNT(*), COUNT(DISTINCT video_id) FROM entries WHERE ready = 1")
        return {"keys": int(keys), "videos": int(videos)}


# --- checkpoints -----------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def image_tower_fingerprint(model: Any) -> str:
    """sha256 over the image tower's architecture name and weights: equal ⇒ identical frame features."""
    digest = hashlib.sha256(str(getattr(model.clip, "name", "")).encode())
    for name, tensor in sorted(model.clip.model.visual.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class LoadedModel:
    """A checkpoint loaded for indexing or search, with what the index records about it."""

    model: Any  # RetrievalModel
    checkpoint: str  # resolved checkpoint file
    sha256: str
    preset: str
    frames: int
    words: int

    def describe(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "sha256": self.sha256, "model": self.model.name,
                "preset": self.preset, "frames": self.frames, "words": self.words}


def load_checkpoint_model(checkpoint: str | Path, device: str = "cpu", expected_sha256: str | None = None) -> LoadedModel:
    """Load a vidseek checkpoint; with `expected_sha256`, refuse a file that changed since indexing."""
    from vidseek.models.registry import Preset
    from vidseek.train.checkpoint import load_model

    path = Path(checkpoint).expanduser()
    if expected_sha256 is not None:
        if not path.is_file():
            raise SearchIndexError(f"the index was built with checkpoint {path}, which no longer exists; "
                                   f"restore it or rebuild the index with `vidseek index`")
        if file_sha256(path) != expected_sha256:
            raise SearchIndexError(f"checkpoint {path} changed since the index was built (sha256 differs); "
                                   f"restore the original file or rebuild the index with `vidseek index`")
    model, payload = load_model(path, device=device)
    resolved = Path(payload["path"])  # a run folder means its best.pt / last.pt
    preset = Preset.from_dict(payload["preset"])
    return LoadedModel(model=model, checkpoint=str(resolved.absolute()), sha256=expected_sha256 or file_sha256(resolved),
                       preset=preset.name, frames=int(preset.frames), words=int(preset.words))


# --- models that embed decoded frames ------------------------------------------------------------

def needs_video_frames(model: Any) -> bool:
    """True for a model whose `encode_frames` must see decoded pixels (PIG "vip")."""
    return bool(getattr(model, "needs_video_frames", False))


def decode_and_encode_frames(model: Any, windows: Sequence[tuple[str, float | None, float | None]], frames: int,
                             batch_size: int) -> tuple[list[tuple[list[int], Any]], list[tuple[int, str]]]:
    """Decode each (path, start, end) window with `load_video_tensor` and run `model.encode_frames`
    on batches of `batch_size` → ([(positions in `windows`, FrameFeatures of those)], [(position,
    error)] for windows that could not be decoded — skipped, like extraction failures)."""
    import torch

    from vidseek.video import load_video_tensor

    size = int(model.clip.image_size)
    batches: list[tuple[list[int], Any]] = []
    failures: list[tuple[int, str]] = []
    for begin in range(0, len(windows), batch_size):
        positions, pixels, masks = [], [], []
        for position in range(begin, min(begin + batch_size, len(windows))):
            path, start, end = windows[position]
            try:
                clip_pixels, mask, _ = load_video_tensor(path, frames, size, start=start, end=end)
            except Exception as err:  # noqa: BLE001 - a per-file failure is recorded, not fatal
                # vidseek's decode errors already name the file.
                failures.append((position, str(err) if isinstance(err, VidseekError) else
                                 f"cannot process video {path}: {type(err).__name__}: {err}"))
                continue
            positions.append(position)
            pixels.append(clip_pixels)
            masks.append(mask)
        if positions:
            with torch.no_grad():
                feats = model.encode_frames(torch.stack(pixels).to(model.device), torch.stack(masks).to(model.device))
            batches.append((positions, feats))
    return batches, failures


# --- index settings --------------------------------------------------------------------------------

def read_index_json(index_dir: str | Path) -> dict[str, Any]:
    import json

    path = Path(index_dir) / INDEX_FILE
    if not path.is_file():
        raise SearchIndexError(f"no search index at {index_dir} (missing {INDEX_FILE}); "
                               f"build one with `vidseek index <videos> --recall CKPT --out {index_dir}`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SearchIndexError(f"{path} is not valid JSON ({err.msg}); rebuild the index with `vidseek index`") from None
    if meta.get("format") != INDEX_FORMAT:
        raise SearchIndexError(f"{path} has index format {meta.get('format')!r}, this vidseek reads {INDEX_FORMAT}; "
                               f"rebuild the index with `vidseek index`")
    return meta


def parse_memory(text: str) -> int:
    """'4G', '512M', '1.5GiB', '1000000' → bytes (binary multiples)."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned and cleaned[-1] in units else (cleaned, "")
    try:
        value = float(number) * units[unit]
    except ValueError:
        raise ConfigError(f"cannot read memory size {text!r}: write e.g. 4G, 512M or a number of bytes") from None
    if value <= 0:
        raise ConfigError(f"memory size {text!r} must be positive; write e.g. 4G")
    return int(value)


@dataclass
class IndexSummary:
    """What one `Indexer.add` call did."""

    processed: int  # videos / windows newly extracted
    skipped_existing: int  # already in the feature store
    failed: int  # videos that could not be decoded (skipped, listed in failures)
    added: int  # entries newly made searchable
    total_keys: int
    total_videos: int
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, error)
    seconds: float = 0.0


# --- the indexer -----------------------------------------------------------------------------------

class Indexer:
    """Builds and updates one index folder. Models come from the arguments on the first run and
    from index.json afterwards (passing a different checkpoint to an existing index is an error)."""

    def __init__(self, index_dir: str | Path, *, recall: str | None = None, rerank: str | None = None,
                 segment_seconds: float | None = None, overlap_seconds: float = 0.0, index_type: str = "auto",
                 backend: str = "faiss", milvus_uri: str | None = None, memory_budget_bytes: int = 4 << 30,
                 device: str = "cpu", batch_size: int = 8, workers: int = 2, progress: bool = True,
                 beams: int | None = None, ray: str | None = None):
        """`ray`: extract on the Ray cluster at this address (`vidseek.store.ray_ingest.RayRunner`)."""
        from vidseek.search.searcher import RecallOptions, open_recall, parse_recall_spec
        from vidseek.store.ray_ingest import runner_for

        self.index_dir = Path(index_dir)
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        self.runner = runner_for(ray)
        existing = read_index_json(self.index_dir) if (self.index_dir / INDEX_FILE).is_file() else None
        if existing is None:
            if recall is None:
                raise ConfigError(f"{self.index_dir} holds no index yet: pass --recall CKPT (a two-tower checkpoint) to build one")
            if segment_seconds is not None and segment_seconds <= 0:
                raise ConfigError(f"--segment-seconds must be positive (got {segment_seconds}); pass e.g. 10")
            self.meta: dict[str, Any] = {
                "format": INDEX_FORMAT, "segment_seconds": segment_seconds,
                "overlap_seconds": overlap_seconds if segment_seconds else 0.0,
                "created_at": time.time(), "failures": [],
            }
            backend_name, recall_checkpoint = parse_recall_spec(recall)
            recall_sha = None
        else:
            self.meta = existing
            backend_name = existing["recall"]["backend"]
            recall_checkpoint, recall_sha = existing["recall"]["checkpoint"], existing["recall"]["sha256"]
            self._check_same(existing, recall, rerank, segment_seconds, overlap_seconds)
        options = RecallOptions(index_type=index_type, backend=backend, milvus_uri=milvus_uri,
                                memory_budget_bytes=memory_budget_bytes, beams=beams)
        self.recall = open_recall(backend_name, recall_checkpoint, self.index_dir / RECALL_STATE_DIR, options,
                                  device=device, expected_sha256=recall_sha)
        # The recall model's video side (a GRDR run's dense model); decoded frames when it needs them.
        self.recall_from_frames = needs_video_frames(getattr(self.recall, "video_model", None))
        self.reranker: LoadedModel | None = None
        if existing is not None and existing.get("rerank"):
            self.reranker = load_checkpoint_model(existing["rerank"]["checkpoint"], device,
                                                  expected_sha256=existing["rerank"]["sha256"])
        elif existing is None and rerank is not None:
            self.reranker = load_checkpoint_model(rerank, device)
        self.rerank_store_dir = self._rerank_store_dir()
        self.entries = EntryCatalog(self._entries_path())

    def _entries_path(self) -> Path:
        self.index_dir.mkdir(parents=True, exist_ok=True)
        return self.index_dir / ENTRIES_FILE

    def _check_same(self, meta: dict[str, Any], recall: str | None, rerank: str | None,
                    segment_seconds: float | None, overlap_seconds: float) -> None:
        """An existing index keeps its models and windows; a different request is a user error."""
        from vidseek.search.searcher import parse_recall_spec

        if recall is not None:
            backend_name, checkpoint = parse_recall_spec(recall)
            if backend_name != meta["recall"]["backend"] or not _same_checkpoint(checkpoint, meta["recall"]):
                raise SearchIndexError(f"index {self.index_dir} was built with recall model {meta['recall']['checkpoint']}; "
                                       f"use that checkpoint or a new --out folder")
        if rerank is not None and (not meta.get("rerank") or not _same_checkpoint(rerank, meta["rerank"])):
            built = meta["rerank"]["checkpoint"] if meta.get("rerank") else "no reranker"
            raise SearchIndexError(f"index {self.index_dir} was built with {built}; "
                                   f"use a new --out folder for another reranker")
        if segment_seconds is not None and (segment_seconds != meta["segment_seconds"]
                                            or overlap_seconds != meta["overlap_seconds"]):
            raise SearchIndexError(f"index {self.index_dir} uses segments of {meta['segment_seconds']} s with "
                                   f"{meta['overlap_seconds']} s overlap; keep those or use a new --out folder")

    def _rerank_store_dir(self) -> str | None:
        """Share the recall store when the reranker would extract the very same features; none
        for a reranker that embeds decoded frames (the searcher decodes its candidates)."""
        if self.reranker is None or needs_video_frames(self.reranker.model):
            return None
        if self.meta.get("stores", {}).get("rerank"):
            return self.meta["stores"]["rerank"]
        shares = (self.reranker.frames == self.recall.frames and not self.reranker.model.needs_patches
                  and not self.recall.needs_patches and not self.recall_from_frames
                  and image_tower_fingerprint(self.reranker.model) == self.recall.image_tower_fingerprint())
        return RECALL_STORE_DIR if shares else RERANK_STORE_DIR

    # --- adding ------------------------------------------------------------------------------

    def add(self, source: str | Path, split: str | None = None) -> IndexSummary:
        """Extract and index every video of `source` (folder, dataset folder or .jsonl) not yet indexed."""
        from vidseek.store.extract import extract, iter_sources

        began = time.perf_counter()
        expected = len(iter_sources(source, split))
        self.recall.expect_count(expected + self.entries.counts()["keys"])
        segment, overlap = self.meta["segment_seconds"], self.meta["overlap_seconds"]
        common = dict(split=split, segment_seconds=segment, overlap_seconds=overlap, batch_size=self.batch_size,
                      workers=self.workers, progress=self.progress, device=self.device, runner=self.runner)
        # A frames-embedding recall model reads pixels, not features: one frame per item keeps the catalog.
        summary = extract(source, self.recall.image_tower, self.index_dir / RECALL_STORE_DIR,
                          frames=1 if self.recall_from_frames else self.recall.frames,
                          patches=self.recall.needs_patches and not self.recall_from_frames, **common)
        failures = list(summary.failures)
        if self.reranker is not None and self.rerank_store_dir == RERANK_STORE_DIR:
            rerank_summary = extract(source, self.reranker.model.clip, self.index_dir / RERANK_STORE_DIR,
                                     frames=self.reranker.frames, patches=self.reranker.model.needs_patches, **common)
            known = {key for key, _ in failures}
            failures += [(k, e) for k, e in rerank_summary.failures if k not in known]
        added, embed_failures = self._add_new_entries()
        failures += embed_failures
        counts = self.entries.counts()
        self._write_meta()
        return IndexSummary(processed=summary.processed, skipped_existing=summary.skipped_existing,
                            failed=len(failures), added=added, total_keys=counts["keys"], total_videos=counts["videos"],
                            failures=failures, seconds=time.perf_counter() - began)

    def _stores(self) -> tuple[Any, Any | None]:
        from vidseek.store import FeatureStore

        recall_store = FeatureStore(self.index_dir / RECALL_STORE_DIR)
        rerank_store = None
        if self.rerank_store_dir is not None and self.rerank_store_dir != RECALL_STORE_DIR:
            rerank_store = FeatureStore(self.index_dir / self.rerank_store_dir)
        return recall_store, rerank_store

    def _add_new_entries(self) -> tuple[int, list[tuple[str, str]]]:
        """Embed keys the stores hold but the entry table lacks, and make them searchable.
        Returns (entries added, (key, error) of entries whose frames could not be decoded)."""
        recall_store, rerank_store = self._stores()
        try:
            pending = self.entries.pending()  # left by an interrupted run
            if pending:
                self.recall.remove(np.array([e.id for e in pending], dtype=np.int64))
            known = self.entries.keys()
            rerank_keys = None if rerank_store is None else set(rerank_store.keys())
            stored = recall_store.rows()
            new_rows = [r for r in stored if r.key not in known and (rerank_keys is None or r.key in rerank_keys)]
            batches: list[list[tuple[int, str]]] = []
            if pending:
                batches.append([(e.id, e.key) for e in pending])
            for begin in range(0, len(new_rows), EMBED_BATCH):
                chunk = new_rows[begin:begin + EMBED_BATCH]
                ids = self.entries.add_pending([(r.key, r.video_id, r.path, float(r.start or 0.0),
                                                 _end_of(r)) for r in chunk])
                batches.append(list(zip(ids, [r.key for r in chunk])))
            rows_by_key = {r.key: r for r in stored}
            added_ids: list[int] = []
            failures: list[tuple[str, str]] = []
            for batch in batches:
                if self.recall_from_frames:
                    added_ids += self._add_from_frames(batch, rows_by_key, recall_store, failures)
                else:
                    ids = np.array([i for i, _ in batch], dtype=np.int64)
                    self.recall.add(ids, stored_frame_features(recall_store, [k for _, k in batch],
                                                               self.recall.needs_patches))
                    added_ids += ids.tolist()
            if added_ids:
                self.recall.save()
                self.entries.mark_ready(added_ids)
            return len(added_ids), failures
        finally:
            recall_store.close()
            if rerank_store is not None:
                rerank_store.close()

    def _add_from_frames(self, batch: list[tuple[int, str]], rows_by_key: dict[str, Any], recall_store: Any,
                         failures: list[tuple[str, str]]) -> list[int]:
        """Recall vectors from decoded frames (each key's stored window, as extraction decoded it).
        A window that no longer decodes leaves the entry table and is marked failed in the recall
        store, so the next run retries it like any extraction failure."""
        rows = [rows_by_key[key] for _, key in batch]
        encoded, decode_failures = decode_and_encode_frames(
            self.recall.video_model, [(r.path, r.start, r.end) for r in rows], self.recall.frames, self.batch_size)
        added: list[int] = []
        for positions, feats in encoded:
            ids = np.array([batch[p][0] for p in positions], dtype=np.int64)
            self.recall.add(ids, feats)
            added += ids.tolist()
        if decode_failures:
            self.entries.delete(batch[p][0] for p, _ in decode_failures)
            for position, error in decode_failures:
                row = rows[position]
                recall_store.catalog.mark_failed(row.key, row.video_id, row.path, error, start=row.start, end=row.end)
                failures.append((row.key, error))
        return added

    # --- removing ----------------------------------------------------------------------------

    def remove(self, video_ids: Sequence[str]) -> int:
        """Delete videos (all their windows) from the index and its feature stores; returns entries removed."""
        from vidseek.store import Catalog
        from vidseek.store.shards import CATALOG_FILE

        entries = self.entries.entries_of(list(video_ids))
        if not entries:
            return 0
        self.recall.remove(np.array([e.id for e in entries], dtype=np.int64))
        self.recall.save()
        self.entries.delete(e.id for e in entries)
        keys = [e.key for e in entries]
        for store_dir in {RECALL_STORE_DIR, self.rerank_store_dir} - {None}:
            with Catalog(self.index_dir / store_dir / CATALOG_FILE) as catalog:
                catalog.delete(keys)
        self._write_meta()
        return len(entries)

    # --- index.json --------------------------------------------------------------------------

    def _write_meta(self) -> None:
        from vidseek import __version__
        from vidseek.store import Catalog
        from vidseek.store.shards import CATALOG_FILE
        from vidseek.utils import atomic_write_json

        with Catalog(self.index_dir / RECALL_STORE_DIR / CATALOG_FILE) as catalog:
            failed = [(r.key, r.error or "") for r in catalog.rows("failed")]
        counts = self.entries.counts()
        self.meta.update({
            "vidseek_version": __version__,
            "updated_at": time.time(),
            "recall": self.recall.describe(),
            "rerank": None if self.reranker is None else self.reranker.describe(),
            "stores": {"recall": RECALL_STORE_DIR, "rerank": self.rerank_store_dir},
            "counts": {**counts, "failed": len(failed)},
            "failures": [{"key": k, "error": e} for k, e in failed[:FAILURES_KEPT]],
        })
        atomic_write_json(self.index_dir / INDEX_FILE, self.meta)

    def close(self) -> None:
        self.entries.close()

    def __enter__(self) -> "Indexer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def stored_frame_features(store: Any, keys: Sequence[str], patches: bool) -> Any:
    """`FrameFeatures` of `keys` read from a FeatureStore (with patch tokens when `patches`)."""
    import torch

    from vidseek.models.base import FrameFeatures

    frames, masks = store.frame_features(list(keys))
    patch_features = store.patch_features(list(keys)) if patches else None
    return FrameFeatures(frames=torch.from_numpy(frames), mask=torch.from_numpy(masks),
                         patches=None if patch_features is None else torch.from_numpy(patch_features))


def _end_of(row: Any) -> float | None:
    if row.end is not None:
        return float(row.end)
    return None if row.duration is None else float(row.duration)


def _same_checkpoint(requested: str, recorded: dict[str, Any]) -> bool:
    from vidseek.train.checkpoint import read_checkpoint

    path = Path(requested).expanduser()
    try:
        resolved = Path(read_checkpoint(path)["path"]) if path.is_dir() else path
    except CheckpointError:
        return False
    return resolved.is_file() and file_sha256(resolved) == recorded["sha256"]


def build_index(source: str | Path, index_dir: str | Path, recall: str, rerank: str | None = None,
                **options: Any) -> IndexSummary:
    """One call: create (or update) `index_dir` from `source` — see `Indexer` for the options."""
    split = options.pop("split", None)
    with Indexer(index_dir, recall=recall, rerank=rerank, **options) as indexer:
        return indexer.add(source, split=split)
