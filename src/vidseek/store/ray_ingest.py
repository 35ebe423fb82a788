"""Extraction on a Ray cluster: `vidseek extract … --ray [ADDRESS]` and `vidseek index … --ray`.

A Ray Data pipeline (DESIGN.md "Ray (Ray Data) for multi-machine ingestion") whose rows are the
videos still to extract, in catalog order:

* `map_batches` with a callable class (`EncodeActor`), a fixed pool of actors — one per GPU of
  the cluster, or CPU actors when it has none. Each actor decodes its videos (the very
  `extract._decode_job` the single-process path runs) and encodes them
  (`extract.encode_in_batches`) in the same process: decoded pixels never enter Ray's object
  store (measured here ≈ 100× slower than a plain loop when they did); only fp16 features leave
  the actor (8 frames × 512 × 2 B ≈ 8 KB per video);
* each encoder batch is written by the actor as one part file under `<store>/ray-parts/`
  (atomically: a temporary name, fsync, rename), so the store folder must be on storage every
  node shares; the pipeline's output rows are just the part files' paths;
* this process (the driver) alone commits: it reads each part in order (`preserve_order`),
  adds it to the feature store in one transaction through `extract`'s own commit step, then
  deletes it. The entry table and its ids are filled later by `Indexer`, also in the driver.

Resumable: a re-run skips what the catalog holds; a driver killed at any point (kill -9) leaves
committed batches and at worst some part files, which the next run deletes before it starts
(they were never committed, so their videos are still pending and are extracted again). Because
commits follow catalog order, a killed-then-resumed run stores the same rows in the same order
as an uninterrupted one.

Ray is imported only when a `RayRunner` runs.
"""
from __future__ import annotations

import json
import logging
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vidseek.errors import ConfigError, VidseekError
from vidseek.store.extract import (EncodedBatch, VideoSource, _Decoded, _decode_job, _DecodeSettings, _VideoJob,
                                   encode_in_batches, local_batches, prepare_encoder)
from vidseek.store.shards import StoredItem
from vidseek.utils import atomic_path

PARTS_DIR = "ray-parts"
#: `--ray` without an address: Ray's own default (RAY_ADDRESS if set, else a new local instance).
LOCAL_ADDRESS = "local"


# --- jobs and part files (plain data that crosses process and machine boundaries) ----------------

def job_to_json(job: _VideoJob, position: int) -> str:
    source = job.source
    return json.dumps({"position": position, "video_id": source.video_id, "path": str(source.path),
                       "start": source.start, "end": source.end, "done": sorted(job.done_keys)})


def job_from_json(text: str) -> tuple[int, _VideoJob]:
    data = json.loads(text)
    source = VideoSource(data["video_id"], Path(data["path"]), data["start"], data["end"])
    return data["position"], _VideoJob(source, frozenset(data["done"]))


def write_part(path: Path, batch: EncodedBatch) -> None:
    """One encoded batch as an .npz file, written atomically: features as fp16 (what the store
    keeps), the items with their errors / skipped flags as JSON."""
    meta = [{"item": asdict(d.item), "error": d.error, "skipped": d.skipped, "last": d.last_of_video}
            for d in batch.decoded]
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)}
    if batch.frames is not None:
        arrays.update(frames=batch.frames.astype(np.float16), masks=batch.masks.astype(bool))
        if batch.patches is not None:
            arrays["patches"] = batch.patches.astype(np.float16)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def read_part(path: Path) -> EncodedBatch:
    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode("utf-8"))
        decoded = [_Decoded(StoredItem(**m["item"]), error=m["error"], skipped=m["skipped"], last_of_video=m["last"])
                   for m in meta]
        batch = EncodedBatch(decoded)
        if "frames" in data:
            batch.frames, batch.masks = data["frames"], data["masks"]
            batch.patches = data["patches"] if "patches" in data else None
    return batch


# --- the actor -------------------------------------------------------------------------------------

class EncodeActor:
    """Decode + encode fused in one Ray actor: a batch of video jobs in, part-file paths out."""

    def __init__(self, encoder: Any, settings: dict[str, Any], parts_dir: str, run_id: str, batch_size: int,
                 patches: bool):
        import ray
        import torch

        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        torch.set_num_threads(max(1, int(cpus)))  # the CPUs Ray gave this actor, no more
        self.encoder = prepare_encoder(encoder, self.device)
        self.settings = _DecodeSettings(**settings)
        self.parts_dir = Path(parts_dir)
        self.run_id = run_id
        self.batch_size = batch_size
        self.patches = patches

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        jobs = [job_from_json(str(text)) for text in batch["job"]]
        decoded = (d for _, job in jobs for d in _decode_job(job, self.settings))
        paths = []
        for k, encoded in enumerate(encode_in_batches(decoded, self.encoder, self.batch_size, self.patches,
                                                      self.device)):
            path = self.parts_dir / f"{self.run_id}-{jobs[0][0]:09d}-{k:04d}.npz"
            write_part(path, encoded)
            paths.append(str(path))
        return {"part": np.array(paths, dtype=object)}


# --- the runner (driver side) ---------------------------------------------------------------------

def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate extra of ray
    except ImportError:
        raise ConfigError("--ray needs Ray Data: pip install 'vidseek[ray]' (ray[data]) on the driver and every node") from None
    return ray


def actor_resources(cluster: dict[str, float], actors: int | None) -> tuple[int, dict[str, float]]:
    """(actor count, per-actor Ray resources): one actor per GPU when the cluster has GPUs, else
    `actors` one-CPU actors (default: one per CPU of the cluster)."""
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        return (actors or gpus), {"num_gpus": 1}
    return (actors or max(1, int(cluster.get("CPU", 1)))), {"num_cpus": 1}


def clear_parts(parts_dir: Path) -> None:
    """Part files left by a dead driver were never committed: their videos are still pending."""
    shutil.rmtree(parts_dir, ignore_errors=True)


class RayRunner:
    """An `extract` runner (`extract.BatchRunner`) that decodes and encodes on a Ray cluster.

    `address`: "local" (Ray's default: RAY_ADDRESS if set, else start Ray on this machine),
    "auto" (the cluster this machine belongs to), "HOST:PORT" of a head node, or
    "ray://HOST:10001" (Ray Client). `actors`: how many actors (default: one per GPU, else one
    per CPU of the cluster).
    """

    def __init__(self, address: str = LOCAL_ADDRESS, actors: int | None = None):
        if actors is not None and actors < 1:
            raise ConfigError(f"a Ray pipeline needs at least one actor (got {actors})")
        self.address = address
        self.actors = actors

    def _connect(self, ray: Any) -> bool:
        """Connect to (or start) Ray; True when this call did, so it also shuts it down."""
        if ray.is_initialized():
            return False
        logging.getLogger("ray").setLevel(logging.WARNING)
        try:
            ray.init(address=None if self.address == LOCAL_ADDRESS else self.address,
                     logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise ConfigError(f"cannot connect to the Ray cluster at {self.address!r} ({err}); start one with "
                              f"`ray start --head` and pass its address, e.g. --ray 127.0.0.1:6379") from None
        return True

    def __call__(self, jobs: list[_VideoJob], settings: _DecodeSettings, encoder: Any, store_root: Path, *,
                 batch_size: int, patches: bool, device: str, workers: int) -> Iterator[EncodedBatch]:
        """The jobs' EncodedBatches, in job order. `device` and `workers` belong to the
        single-process runner: here each actor uses its GPU if Ray gave it one."""
        if not jobs:
            return
        ray = _import_ray()
        started = self._connect(ray)
        parts_dir = Path(store_root) / PARTS_DIR
        clear_parts(parts_dir)
        try:
            yield from self._run(ray, jobs, settings, encoder, parts_dir, batch_size, patches)
        finally:
            clear_parts(parts_dir)  # a failed run's parts were not committed either
            if started:
                ray.shutdown()

    def _run(self, ray: Any, jobs: list[_VideoJob], settings: _DecodeSettings, encoder: Any, parts_dir: Path,
             batch_size: int, patches: bool) -> Iterator[EncodedBatch]:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # commits in catalog order: resumes are exact
        context.enable_progress_bars = False  # extract shows its own
        count, resources = actor_resources(ray.cluster_resources(), self.actors)
        encoder = prepare_encoder(encoder, "cpu")  # shipped once to each actor, which moves it to its device
        dataset = ray.data.from_items([{"job": job_to_json(job, n)} for n, job in enumerate(jobs)])
        parts = dataset.map_batches(
            EncodeActor, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=min(count, len(jobs))),
            fn_constructor_kwargs={"encoder": encoder, "settings": asdict(settings), "parts_dir": str(parts_dir),
                                   "run_id": uuid.uuid4().hex[:12], "batch_size": batch_size, "patches": patches},
            **resources)
        try:
            for row in parts.iter_rows():
                path = Path(row["part"])
                yield read_part(path)
                path.unlink()  # reached only after the caller committed the batch
        except ray.exceptions.RayError as err:
            raise VidseekError(f"the Ray extraction job failed ({type(err).__name__}: {str(err).splitlines()[0]}); "
                               f"rerun the same command to resume: committed videos are kept") from None


def runner_for(ray_address: str | None) -> Any:
    """The `extract` runner for a `--ray` option: None → this process, else a `RayRunner`."""
    return local_batches if ray_address is None else RayRunner(ray_address)
