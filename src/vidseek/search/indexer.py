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

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from vidseek.errors import CheckpointError, ConfigError, SearchIndexError
# Re-exported: these lived here before the entry table and model loading got their own modules.
from vidseek.search.entries import (ENTRIES_FILE, INDEX_FILE, INDEX_FORMAT, RECALL_STATE_DIR,  # noqa: F401
                                    RECALL_STORE_DIR, RERANK_STORE_DIR, THUMBNAIL_DIR, Entry, EntryCatalog,
                                    read_index_json)
from vidseek.search.loading import (LoadedModel, decode_and_encode_frames, file_sha256,  # noqa: F401
                                    image_tower_fingerprint, load_checkpoint_model, needs_video_frames,
                                    stored_frame_features)
# Keys encoded per recall-embedding batch (bounds memory; each batch is one catalog transaction).
EMBED_BATCH = 256
# How many per-video failures index.json keeps (the store catalogs keep all of them).
FAILURES_KEPT = 100


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
                 backend: str = "faiss", milvus_uri: str | None = None, milvus_collection: str | None = None,
                 memory_budget_bytes: int = 4 << 30,
                 device: str = "cpu", batch_size: int = 8, workers: int = 2, progress: bool = True,
                 beams: int | None = None, weights: str | Path | None = None, ray: str | None = None):
        """`weights`: the CLIP weights file of zero-shot recall (`recall="clip:ARCH"`).
        `ray`: extract on the Ray cluster at this address (`vidseek.store.ray_ingest.RayRunner`)."""
        from vidseek.search.recall_spec import zero_shot_recall
        from vidseek.search.searcher import RecallOptions, open_recall, parse_recall_spec
        from vidseek.store.ray_ingest import runner_for

        self.index_dir = Path(index_dir)
        self.device = device
        self.batch_size = batch_size
        self.workers = workers
        self.progress = progress
        self.runner = runner_for(ray)
        existing = read_index_json(self.index_dir) if (self.index_dir / INDEX_FILE).is_file() else None
        requested = None  # (backend, checkpoint, CLIP architecture of zero-shot recall)
        if recall is not None:
            backend_name, checkpoint = parse_recall_spec(recall)
            requested = (backend_name, *zero_shot_recall(backend_name, checkpoint, weights))
        elif weights is not None:
            raise ConfigError("--weights goes with --recall clip:ARCH (zero-shot recall); pass both")
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
            backend_name, recall_checkpoint, clip_arch = requested
            recall_sha = None
        else:
            self.meta = existing
            backend_name = existing["recall"]["backend"]
            recall_checkpoint, recall_sha = existing["recall"]["checkpoint"], existing["recall"]["sha256"]
            self._check_same(existing, requested, rerank, segment_seconds, overlap_seconds)
            clip_arch = None
            if requested is not None and existing["recall"].get("arch"):
                recall_checkpoint = requested[1]  # zero-shot weights, same file (by hash), maybe moved: use it where it is now
        options = RecallOptions(index_type=index_type, backend=backend, milvus_uri=milvus_uri,
                                milvus_collection=milvus_collection, clip_arch=clip_arch,
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
        self.entries = EntryCatalog(self._entries_path(), mode="create" if existing is None else "write")
        try:
            self._check_provenance(existing)
            if existing is None:
                # Written before anything is extracted: a run killed at any later point leaves an
                # index.json naming its models, so a re-run with other weights is refused, never mixed.
                self._write_meta(with_manifest=False)
        except BaseException:
            self.entries.close()
            raise

    def _entries_path(self) -> Path:
        self.index_dir.mkdir(parents=True, exist_ok=True)
        return self.index_dir / ENTRIES_FILE

    def _provenance(self) -> dict[str, str]:
        """The content hashes of the weights behind this index's entries and vectors."""
        return {"recall_sha256": str(self.recall.describe()["sha256"]),
                "rerank_sha256": "" if self.reranker is None else self.reranker.sha256}

    def _check_provenance(self, existing: dict[str, Any] | None) -> None:
        """entries.sqlite must hold entries of THESE weights; an unrecorded table gets them recorded.

        Entries left by a killed run with other weights (whose index.json was lost) are refused
        with one line — re-extracting them silently would hide that the folder is someone else's.
        """
        wanted = self._provenance()
        recorded = self.entries.provenance()
        if recorded:
            if recorded.get("recall_sha256") != wanted["recall_sha256"]:
                raise SearchIndexError(
                    f"{self.entries.path} holds entries made by other recall weights (sha256 "
                    f"{recorded.get('recall_sha256', '?')[:12]}, this checkpoint is {wanted['recall_sha256'][:12]}); "
                    f"re-run with the checkpoint that started this index, or use a new --out folder")
            return
        if existing is None and self.entries.total():
            raise SearchIndexError(f"{self.entries.path} holds entries of an unknown model and {self.index_dir} has no "
                                   f"{INDEX_FILE}; use a new --out folder")
        self.entries.set_provenance(wanted)
        if existing is not None and self.entries.counts()["keys"] and len(self.recall) == 0:
            raise SearchIndexError(f"{self.index_dir / RECALL_STATE_DIR} holds no vectors but {self.entries.path} holds "
                                   f"{self.entries.counts()['keys']} entries; run `vidseek verify {self.index_dir}` "
                                   f"and re-index into a new --out folder")

    def _check_same(self, meta: dict[str, Any], recall: tuple[str, str, str | None] | None, rerank: str | None,
                    segment_seconds: float | None, overlap_seconds: float) -> None:
        """An existing index keeps its models and windows; a different request is a user error.
        `recall`: the requested (backend, checkpoint, CLIP architecture of zero-shot recall)."""
        if recall is not None:
            backend_name, checkpoint, clip_arch = recall
            if backend_name != meta["recall"]["backend"] or clip_arch != meta["recall"].get("arch") \
                    or not _same_checkpoint(checkpoint, meta["recall"]):
                raise SearchIndexError(
                    f"index {self.index_dir} was built with recall model {meta['recall']['checkpoint']} (sha256 "
                    f"{meta['recall']['sha256'][:12]}), not {checkpoint}; re-run with that checkpoint (or without "
                    f"--recall) to add to it, or use a new --out folder")
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

    def _write_meta(self, with_manifest: bool = True) -> None:
        """Write index.json atomically: models, provenance, counts, failures and — once the files
        are complete — the manifest (`integrity`) that every open checks."""
        from vidseek.version import __version__
        from vidseek.search.integrity import MANIFEST_KEY, make_manifest
        from vidseek.store import Catalog
        from vidseek.store.shards import CATALOG_FILE
        from vidseek.utils import atomic_write_json

        failed: list[tuple[str, str]] = []
        stores = [d for d in {RECALL_STORE_DIR, self.rerank_store_dir} - {None}
                  if (self.index_dir / d / CATALOG_FILE).is_file()]
        for store_dir in sorted(stores):
            with Catalog(self.index_dir / store_dir / CATALOG_FILE) as catalog:
                if store_dir == RECALL_STORE_DIR:
                    failed = [(r.key, r.error or "") for r in catalog.rows("failed")]
                if with_manifest:
                    catalog.checkpoint()
        counts = self.entries.counts()
        self.meta.update({
            "vidseek_version": __version__,
            "updated_at": time.time(),
            "recall": self.recall.describe(),
            "rerank": None if self.reranker is None else self.reranker.describe(),
            "stores": {"recall": RECALL_STORE_DIR, "rerank": self.rerank_store_dir},
            "counts": {**counts, "failed": len(failed)},
            "failures": [{"key": k, "error": e} for k, e in failed[:FAILURES_KEPT]],
            "provenance": self._provenance(),
            MANIFEST_KEY: None,
        })
        if with_manifest:
            self.entries.checkpoint()
            dim = getattr(getattr(self.recall, "index", None), "dim", None)
            self.meta[MANIFEST_KEY] = make_manifest(self.index_dir, self.meta,
                                                    {"entries": counts["keys"], "recall_vectors": len(self.recall)},
                                                    None if dim is None else int(dim))
        atomic_write_json(self.index_dir / INDEX_FILE, self.meta)

    def close(self) -> None:
        from vidseek.search.searcher import close_recall

        self.entries.close()
        close_recall(self.recall)

    def __enter__(self) -> "Indexer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
