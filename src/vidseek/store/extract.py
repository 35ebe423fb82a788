"""`extract`: decode videos, encode their frames with a CLIP image tower, fill a `FeatureStore`.

Pipeline (DESIGN.md, data flow "video/ decode+sample -> encoders/ -> store/"):

* background DataLoader workers decode and sample frames (PyAV with a bounded thread count per
  worker: PyAV's automatic threading deadlocks inside forked workers), overlapping
* the image tower on the main process, under `torch.no_grad()`, fp32 on CPU (bf16 autocast is
  slower there) and fp16 autocast on CUDA;
* each encoder batch is written to the shards, flushed, then committed to the catalog in one
  transaction, so a `kill -9` loses at most the batch in flight and a rerun continues: keys
  already 'ok' are skipped, 'failed' keys are retried.

A file that fails to decode is recorded as 'failed' with its error and skipped — never replaced
by blank frames. Long videos can be cut into fixed windows (`segment_seconds`), each stored
under its own key `f"{video_id}#{k}"` with its start/end time.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.utils.data

from vidseek.errors import DatasetError, VideoDecodeError, VidseekError
from vidseek.store.catalog import STATUS_FAILED, STATUS_OK
from vidseek.store.provenance import weights_fingerprint
from vidseek.store.shards import FeatureStore, StoredItem

# The containers a plain folder source is scanned for.
FOLDER_VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
SEGMENT_SEPARATOR = "#"
# PyAV decoder threads per loader worker: bounded (never "AUTO") to avoid the worker deadlock.
DECODER_THREADS_PER_WORKER = 1


@dataclass(frozen=True)
class VideoSource:
    """One video to extract: a whole file, or the clip [start, end] seconds of it."""

    video_id: str
    path: Path
    start: float | None = None
    end: float | None = None


@dataclass
class ExtractSummary:
    processed: int  # keys newly stored this run
    skipped_existing: int  # keys already 'ok' in the store
    failed: int
    failures: list[tuple[str, str]] = field(default_factory=list)  # (key, error)
    seconds: float = 0.0
    videos_per_second: float = 0.0  # processed / seconds


# --- sources ------------------------------------------------------------------------------------

def iter_sources(source: str | Path, split: str | None = None) -> list[VideoSource]:
    """The videos named by `source` (see `scan_sources`, whose skipped names this drops)."""
    return scan_sources(source, split)[0]


def scan_sources(source: str | Path, split: str | None = None) -> tuple[list[VideoSource], list[tuple[str, str]]]:
    """The videos named by `source`, de-duplicated by video id (first occurrence wins), and the
    (name, reason) of every video left out — never dropped without a word:

    * a dataset folder in any format `vidseek.data.detect_format` recognises (`split=None`: every
      split the dataset has),
    * a generic `.jsonl` annotation file,
    * or a plain folder of videos, scanned recursively (symlinked folders followed once) for
      mp4/avi/mov/mkv/webm/m4v; the video id is the path relative to the folder without its
      extension ('/' kept), so ids stay unique across sub-folders; a name that is only dots
      before the extension ("..mp4") keeps its extension as its id.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise DatasetError(f"video source {path} does not exist; pass a folder of videos, a dataset folder or a .jsonl file")
    if path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise DatasetError(f"video source {path} is a file but not a .jsonl annotation file; "
                               f"pass its folder, a dataset folder or a .jsonl file")
        return _dedupe(_dataset_sources(path, split), [])
    if _is_dataset(path):
        return _dedupe(_dataset_sources(path, split), [])
    if split is not None:
        raise DatasetError(f"{path} is a plain folder of videos, which has no splits; drop --split "
                           f"or pass a dataset folder")
    return _folder_sources(path)


def _is_dataset(folder: Path) -> bool:
    from vidseek.data import detect_format

    try:
        detect_format(folder)
    except DatasetError:
        return False
    return True


def _dataset_sources(root: Path, split: str | None) -> list[VideoSource]:
    from vidseek.data import load_dataset
    from vidseek.data.records import SPLITS

    if split is not None:
        datasets = [load_dataset(root, split)]
    else:
        datasets = []
        for name in SPLITS:
            try:
                datasets.append(load_dataset(root, name))
            except DatasetError:
                continue  # a dataset without this split (e.g. no val)
        if not datasets:
            raise DatasetError(f"no split of dataset {root} could be read; pass --split with one of {', '.join(SPLITS)}")
    return [VideoSource(r.video_id, Path(r.path), r.start, r.end) for d in datasets for r in d.records]


def _video_extension(name: str) -> str | None:
    lowered = name.lower()
    return next((ext for ext in FOLDER_VIDEO_EXTENSIONS if lowered.endswith(ext)), None)


def _folder_sources(folder: Path) -> tuple[list[VideoSource], list[tuple[str, str]]]:
    found: list[VideoSource] = []
    skipped: list[tuple[str, str]] = []
    visited = {os.path.realpath(folder)}
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for name in list(dirs):
            # A symlinked folder is followed once: a loop or a second link to it would list its videos twice.
            real = os.path.realpath(os.path.join(current, name))
            if real in visited:
                relative = Path(current, name).relative_to(folder).as_posix()
                skipped.append((relative, f"folder {Path(current, name)} links to {real}, which is already scanned; skipped"))
                dirs.remove(name)
            else:
                visited.add(real)
        for name in sorted(files):
            extension = _video_extension(name)
            if extension is None:
                continue
            file_path = Path(current, name)
            relative = file_path.relative_to(folder).as_posix()
            stem = name[:-len(extension)]
            video_id = relative if not stem.strip(".") else relative[:-len(extension)]
            found.append(VideoSource(video_id, file_path.absolute()))
    if not found:
        raise DatasetError(f"no videos found in {folder} (looked for {', '.join(FOLDER_VIDEO_EXTENSIONS)} "
                           f"recursively); pass the folder that holds the videos")
    # Same relative name with two containers (a.mp4 and a.webm) would give one id twice.
    return _dedupe(found, skipped)


def _dedupe(sources: Sequence[VideoSource], skipped: list[tuple[str, str]]
            ) -> tuple[list[VideoSource], list[tuple[str, str]]]:
    seen: dict[str, VideoSource] = {}
    for s in sources:
        first = seen.setdefault(s.video_id, s)
        if first is not s and first.path != s.path:
            skipped.append((s.video_id, f"{s.path} has the same video id as {first.path}; skipped: rename one of them"))
    return list(seen.values()), skipped


def segment_key(video_id: str, index: int) -> str:
    return f"{video_id}{SEGMENT_SEPARATOR}{index}"


# --- decoding (runs in loader workers) ---------------------------------------------------------

@dataclass(frozen=True)
class _VideoJob:
    source: VideoSource
    done_keys: frozenset[str]  # window keys already stored (segment mode)


@dataclass
class _Decoded:
    item: StoredItem
    pixels: Any = None  # Tensor [T,3,S,S] float32, None when failed / skipped
    mask: Any = None  # Tensor bool [T]
    error: str | None = None
    skipped: bool = False  # an already-stored window of a segmented video
    last_of_video: bool = True  # progress advances one video here


@dataclass(frozen=True)
class _DecodeSettings:
    frames: int
    image_size: int
    sampling: str
    segment_seconds: float | None
    overlap_seconds: float
    threads: int


def _error_text(err: Exception, path: Path) -> str:
    if isinstance(err, VideoDecodeError):
        return str(err)  # already names the file
    return f"cannot process video {path}: {type(err).__name__}: {err}"


def _load(source: VideoSource, settings: _DecodeSettings, start: float | None, end: float | None):
    from vidseek.video import load_video_tensor

    return load_video_tensor(source.path, settings.frames, settings.image_size, sampling=settings.sampling,
                             start=start, end=end, threads=settings.threads)


def _windows(source: VideoSource, duration: float, settings: _DecodeSettings) -> list[tuple[float, float]]:
    """Windows over the source's span (the whole file, or its [start, end] clip), in file time."""
    from vidseek.video import segment_windows

    span_start = source.start or 0.0
    span_end = min(source.end, duration) if source.end is not None else duration
    return [(span_start + a, span_start + b)
            for a, b in segment_windows(span_end - span_start, settings.segment_seconds, settings.overlap_seconds)]


def _decode_job(job: _VideoJob, settings: _DecodeSettings) -> Iterator[_Decoded]:
    source = job.source
    whole = StoredItem(source.video_id, source.video_id, str(source.path), source.start, source.end)
    if settings.segment_seconds is None:
        try:
            pixels, mask, clip = _load(source, settings, source.start, source.end)
        except Exception as err:  # noqa: BLE001 - any per-file failure is recorded, not fatal
            yield _Decoded(whole, error=_error_text(err, source.path))
            return
        yield _Decoded(StoredItem(source.video_id, source.video_id, str(source.path), source.start, source.end,
                                  float(clip.info.duration)), pixels, mask)
        return
    try:
        duration = float(_probe_duration(source.path))
        windows = _windows(source, duration, settings)
    except Exception as err:  # noqa: BLE001
        yield _Decoded(whole, error=_error_text(err, source.path))
        return
    for k, (start, end) in enumerate(windows):
        item = StoredItem(segment_key(source.video_id, k), source.video_id, str(source.path), start, end, duration)
        last = k == len(windows) - 1
        if item.key in job.done_keys:
            yield _Decoded(item, skipped=True, last_of_video=last)
            continue
        try:
            pixels, mask, _ = _load(source, settings, start, end)
        except Exception as err:  # noqa: BLE001
            yield _Decoded(item, error=_error_text(err, source.path), last_of_video=last)
            continue
        yield _Decoded(item, pixels, mask, last_of_video=last)


def _probe_duration(path: Path) -> float:
    from vidseek.video import probe

    return probe(path).duration


def _worker_init(_: int) -> None:
    # Each loader worker decodes one video at a time; intra-op threads would only oversubscribe.
    torch.set_num_threads(1)


class _DecodeJobs(torch.utils.data.IterableDataset):
    """Video jobs dealt round-robin to the loader workers; each worker yields decoded items."""

    def __init__(self, jobs: list[_VideoJob], settings: _DecodeSettings):
        self.jobs = jobs
        self.settings = settings

    def __iter__(self) -> Iterator[_Decoded]:
        info = torch.utils.data.get_worker_info()
        mine = self.jobs if info is None else self.jobs[info.id::info.num_workers]
        for job in mine:
            yield from _decode_job(job, self.settings)


# --- encoding (main process, or a Ray actor: see `vidseek.store.ray_ingest`) ----------------------

def _encode_batch(encoder: Any, batch: list[_Decoded], patches: bool, device: str
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Frame features [B,T,D] (and patches [B,T,P,D]) of a batch; padded frames are not encoded
    and stay zero, so the stored mask is the only thing that marks them."""

    pixels = torch.stack([d.pixels for d in batch])  # [B,T,3,S,S]
    masks = torch.stack([d.mask for d in batch]).bool()  # [B,T]
    b, t = masks.shape
    real = masks.reshape(-1)
    images = pixels.reshape(b * t, *pixels.shape[2:])[real].to(device, non_blocking=True)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        out = encoder.encode_image(images, patches=patches)
    cls = out.cls.float().cpu()
    frame_features = torch.zeros(b * t, cls.shape[-1])
    frame_features[real] = cls
    patch_features = None
    if patches:
        tokens = out.patches.float().cpu()
        patch_features = torch.zeros(b * t, *tokens.shape[1:])
        patch_features[real] = tokens
        patch_features = patch_features.reshape(b, t, *tokens.shape[1:]).numpy()
    return frame_features.reshape(b, t, -1).numpy(), masks.numpy(), patch_features


@dataclass
class EncodedBatch:
    """What one encoder batch leaves behind: every decoded item in order (stored, failed or an
    already-stored window) and the features of the stored ones (`frames` [n,T,D], `masks` [n,T],
    `patches` [n,T,P,D] or None; n = the items without error that were not skipped)."""

    decoded: list[_Decoded]
    frames: np.ndarray | None = None
    masks: np.ndarray | None = None
    patches: np.ndarray | None = None

    @property
    def to_store(self) -> list[_Decoded]:
        return [d for d in self.decoded if d.error is None and not d.skipped]


def encode_decoded(encoder: Any, decoded: list[_Decoded], patches: bool, device: str) -> EncodedBatch:
    """Encode the decoded items that have pixels; failures and skipped windows ride along."""
    batch = EncodedBatch(list(decoded))
    if batch.to_store:
        batch.frames, batch.masks, batch.patches = _encode_batch(encoder, batch.to_store, patches, device)
    return batch


#: runner(jobs, settings, encoder, store_root, batch_size=, patches=, device=, workers=) -> the
#: EncodedBatches of those jobs, in job order; it decides where decoding and encoding run.
BatchRunner = Callable[..., Iterator[EncodedBatch]]


def local_batches(jobs: list[_VideoJob], settings: _DecodeSettings, encoder: Any, store_root: Path, *,
                  batch_size: int, patches: bool, device: str, workers: int) -> Iterator[EncodedBatch]:
    """This process: `workers` DataLoader workers decode, the encoder runs here on `device`."""
    prepare_encoder(encoder, device)
    workers = min(workers, len(jobs))
    loader = torch.utils.data.DataLoader(
        _DecodeJobs(jobs, settings), batch_size=None, num_workers=workers,
        worker_init_fn=_worker_init if workers else None,
        # Let workers run a full encoder batch ahead so decoding overlaps encoding.
        prefetch_factor=max(2, batch_size) if workers else None,
        pin_memory=device.startswith("cuda"))
    yield from encode_in_batches(loader, encoder, batch_size, patches, device)


def prepare_encoder(encoder: Any, device: str) -> Any:
    """The encoder in eval mode on `device` (an nn.Module, or anything with the same methods)."""
    if hasattr(encoder, "eval"):
        encoder.eval()
    if hasattr(encoder, "to"):
        encoder.to(device)
    return encoder


def encode_in_batches(decoded_items: Iterable[_Decoded], encoder: Any, batch_size: int, patches: bool,
                      device: str) -> Iterator[EncodedBatch]:
    """Group decoded items into batches of `batch_size` items with pixels and encode each."""
    decoded: list[_Decoded] = []
    with_pixels = 0
    for item in decoded_items:
        decoded.append(item)
        with_pixels += item.error is None and not item.skipped
        if with_pixels >= batch_size:
            yield encode_decoded(encoder, decoded, patches, device)
            decoded, with_pixels = [], 0
    if decoded:
        yield encode_decoded(encoder, decoded, patches, device)


def _commit(store: FeatureStore, batch: EncodedBatch, summary: ExtractSummary) -> int:
    """Store a batch's features (one transaction) and record its failures; returns videos finished."""
    to_store = batch.to_store
    if to_store:
        store.add([d.item for d in to_store], batch.frames, batch.masks, batch.patches)
        summary.processed += len(to_store)
    for d in batch.decoded:
        if d.error is not None:
            store.mark_failed(d.item, d.error)
            summary.failed += 1
            summary.failures.append((d.item.key, d.error))
        elif d.skipped:
            summary.skipped_existing += 1
    return sum(d.last_of_video for d in batch.decoded)


def _encoder_name(encoder: Any) -> str:
    return str(getattr(encoder, "name", None) or type(encoder).__name__)


def _progress_bar(enabled: bool, total: int):
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    class VideosPerSecond(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text("-- videos/s" if speed is None else f"{speed:.2f} videos/s")

    progress = Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(), VideosPerSecond(),
                        TimeRemainingColumn(), console=Console(stderr=True), disable=not enabled)
    task = progress.add_task("extract", total=total)
    return progress, task


# --- the entry point ---------------------------------------------------------------------------

def extract(source: str | Path, encoder: Any, out: str | Path, *, frames: int = 12, patches: bool = False,
            split: str | None = None, segment_seconds: float | None = None, overlap_seconds: float = 0.0,
            batch_size: int = 8, workers: int = 2, progress: bool = True, device: str = "cpu",
            sampling: str = "uniform", runner: BatchRunner = local_batches) -> ExtractSummary:
    """Extract per-frame CLS (and optionally patch-token) features of every video into `out`.

    Resumable: run it again after an interruption and it stores only what is missing (keys
    already 'ok' are skipped, 'failed' ones retried). Raises a one-line `VidseekError` only when
    no video at all could be processed; otherwise failures are listed in the summary and the
    catalog. `encoder` is a `vidseek.encoders.ClipBackbone` (it is put in eval mode on `device`).
    `runner` decodes and encodes (default: this process; `vidseek.store.ray_ingest.RayRunner`: a
    Ray cluster); whatever runs them, this process alone writes the store.
    """

    if batch_size < 1 or workers < 0 or frames < 1:
        raise VidseekError(f"extract needs batch_size >= 1, workers >= 0 and frames >= 1 "
                           f"(got {batch_size}, {workers}, {frames}); fix the options")
    began = time.perf_counter()
    sources, unscanned = scan_sources(source, split)
    store = FeatureStore.create(out, encoder=_encoder_name(encoder), weights=weights_fingerprint(encoder),
                                embed_dim=int(encoder.embed_dim), frames=frames,
                                image_size=int(encoder.image_size), patches=patches,
                                grid=int(encoder.grid) if patches else None,
                                segment_seconds=segment_seconds, overlap_seconds=overlap_seconds, sampling=sampling)
    try:
        jobs, skipped, conflicts = _pending_jobs(store, sources, segmented=segment_seconds is not None)
        settings = _DecodeSettings(frames, int(encoder.image_size), sampling, segment_seconds, overlap_seconds,
                                   DECODER_THREADS_PER_WORKER)
        # Left out by the scan, or an id already stored from another file: reported, never silent.
        left_out = unscanned + conflicts
        summary = ExtractSummary(processed=0, skipped_existing=skipped, failed=len(left_out), failures=list(left_out))
        bar, task = _progress_bar(progress, total=len(sources))
        bar.update(task, advance=len(sources) - len(jobs))
        with bar:
            for batch in runner(jobs, settings, encoder, store.root, batch_size=batch_size, patches=patches,
                                device=device, workers=workers):
                bar.update(task, advance=_commit(store, batch, summary))
        if segment_seconds is not None:
            _forget_superseded_failures(store)
    finally:
        store.close()
    summary.seconds = time.perf_counter() - began
    summary.videos_per_second = summary.processed / summary.seconds if summary.seconds > 0 else 0.0
    if summary.processed == 0 and summary.skipped_existing == 0 and summary.failed > 0:
        raise VidseekError(f"none of the {summary.failed} videos from {source} could be processed "
                           f"(first error: {summary.failures[0][1]}); check the files and rerun")
    return summary


def _forget_superseded_failures(store: FeatureStore) -> None:
    """Drop a whole-video 'failed' row (the file could not be probed) once its windows are stored."""
    windowed = {r.video_id for r in store.catalog.rows(STATUS_OK)}
    stale = [r.key for r in store.catalog.rows(STATUS_FAILED) if r.key == r.video_id and r.video_id in windowed]
    if stale:
        store.catalog.delete(stale)


def _pending_jobs(store: FeatureStore, sources: list[VideoSource], segmented: bool
                  ) -> tuple[list[_VideoJob], int, list[tuple[str, str]]]:
    """Jobs still to do, how many keys are already stored (counted as skipped), and the
    (video id, reason) of sources whose id the store already holds for ANOTHER file: a second
    folder reusing a relative name must not pass as "already stored"."""
    ok_rows = store.catalog.rows(STATUS_OK)
    stored_path = {r.video_id: r.path for r in ok_rows}
    conflicts = [(s.video_id, f"video id {s.video_id!r} is already stored from {stored_path[s.video_id]}, not "
                              f"{s.path}; skipped: remove it first (`vidseek index --remove {s.video_id}`) or rename the file")
                 for s in sources if stored_path.get(s.video_id, str(s.path)) != str(s.path)]
    clashing = {video_id for video_id, _ in conflicts}
    sources = [s for s in sources if s.video_id not in clashing]
    if not segmented:
        ok_keys = {r.key for r in ok_rows}
        jobs = [_VideoJob(s, frozenset()) for s in sources if s.video_id not in ok_keys]
        return jobs, len(sources) - len(jobs), conflicts
    # Windows are only known after probing the file, so each video goes to a worker with the
    # windows it already has; the worker reports those as skipped.
    done: dict[str, set[str]] = {}
    for r in ok_rows:
        done.setdefault(r.video_id, set()).add(r.key)
    return [_VideoJob(s, frozenset(done.get(s.video_id, ()))) for s in sources], 0, conflicts
