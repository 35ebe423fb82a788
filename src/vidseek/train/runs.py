"""What every kind of training run shares, below the loops that run them.

`vidseek.train.loop.train` is the one entry point. Model kinds whose training is not the
contrastive loop (GRDR learns semantic IDs over a dense model's video vectors) are reached
through `KIND_TRAINERS`, a table of "module:function" names imported on use — so the loop never
imports those trainers, and they can use the split loader, the video source and the result type
defined here without importing the loop back.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vidseek.errors import ConfigError, DatasetError
from vidseek.train.data import FrameCache, StoreSource

if TYPE_CHECKING:
    from vidseek.models.base import RetrievalModel
    from vidseek.models.registry import Preset


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    best: dict[str, Any]
    final_val: dict[str, float]


#: model kind → "module:function" of its own training; kinds not listed train in the loop. Each
#: function takes (preset, data, out, *, weights, features, resume, init_from, device, progress,
#: stop_after_steps) and returns a TrainResult.
KIND_TRAINERS: dict[str, str] = {
    "grdr": "vidseek.train.grdr_run:train_grdr_run",
}


def kind_trainer(model_kind: str) -> Callable[..., TrainResult] | None:
    """The training function of a kind listed in KIND_TRAINERS, else None (the contrastive loop)."""
    target = KIND_TRAINERS.get(model_kind)
    if target is None:
        return None
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)


def load_split(preset: "Preset", data: str | Path, split: str):
    from vidseek.data import load_dataset

    return load_dataset(data, split, fmt=preset.data_format, **preset.data_options)


def video_source(preset: "Preset", dataset, run_dir: Path, features: str | Path | None, model: "RetrievalModel",
                 progress: bool):
    """Frames (decoded once into the run's frame cache) or a feature store, per the preset's mode.

    Feature mode without `features` extracts them into `run_dir/features` with the model's own
    (frozen) image tower — e.g. the tower of the checkpoint given to `--init` — once, resumably.
    """
    image_size = model.clip.image_size
    if preset.train.mode == "features":
        from vidseek.store import FeatureStore

        if features is None:
            from vidseek.store.extract import extract

            features = run_dir / "features"
            extract(dataset.root, model.clip, features, frames=preset.frames, patches=model.needs_patches,
                    progress=progress, device=str(model.device))
        source = StoreSource(FeatureStore(features), [r.video_id for r in dataset.records], patches=model.needs_patches)
        if len(source.usable) == 0:
            raise DatasetError(f"feature store {features} has none of the {dataset.split} videos: run `vidseek extract` on {dataset.root}")
        return source
    if preset.train.mode != "frames":
        raise ConfigError(f"unknown training mode {preset.train.mode!r}: use 'frames' or 'features'")
    records = dataset.records
    cache = FrameCache(run_dir / "frame_cache" / dataset.split, [r.path for r in records], preset.frames, image_size,
                       starts=[r.start for r in records], ends=[r.end for r in records])
    return cache.build(progress=progress)
