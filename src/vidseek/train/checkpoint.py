"""One checkpoint file holds everything needed to resume exactly or to load a model anywhere:
model, optimizer, scheduler, step, epoch, RNG states, sampler position, preset (config), the
vidseek version and the best validation metric so far (nanoGPT-style). Written atomically.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vidseek.version import __version__
from vidseek.errors import CheckpointError
from vidseek.utils import atomic_torch_save

CHECKPOINT_FORMAT = 1


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, *, model: torch.nn.Module, preset: dict[str, Any], step: int, epoch: int,
                    batch_in_epoch: int, optimizer=None, scheduler=None, best: dict[str, Any] | None = None,
                    extra: dict[str, Any] | None = None) -> None:
    payload = {
        "format": CHECKPOINT_FORMAT,
        "vidseek_version": __version__,
        "model_name": getattr(model, "name", type(model).__name__),
        "preset": preset,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": step,
        "epoch": epoch,
        "batch_in_epoch": batch_in_epoch,
        "rng": rng_state(),
        "best": best or {},
        "extra": extra or {},
    }
    atomic_torch_save(payload, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a vidseek checkpoint (a run folder means its best.pt, else last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise CheckpointError(f"no checkpoint in {path}: expected best.pt or last.pt from `vidseek train`")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: pass a run folder or a .pt file written by `vidseek train`")
    try:
        # RNG states hold numpy arrays/tuples, so full unpickling is needed; checkpoints are our own files.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 — any unpickling failure means the same thing to a user
        raise CheckpointError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) from None
    if not isinstance(payload, dict) or "model" not in payload or "preset" not in payload:
        raise CheckpointError(
            f"{path} is not a vidseek checkpoint (no model/preset inside): raw CLIP weights go to --weights, not here"
        )
    payload["path"] = str(path)
    return payload


def load_model(path: str | Path, expect_model: str | None = None, device: str = "cpu"):
    """Rebuild the model from a checkpoint's preset and load its weights. Returns (model, payload)."""
    from vidseek.models.registry import Preset, create_model

    payload = read_checkpoint(path)
    preset = Preset.from_dict(payload["preset"])
    if expect_model is not None and preset.model != expect_model:
        raise CheckpointError(
            f"{payload['path']} holds a {preset.model} model (preset {preset.name}), not {expect_model}: pass a {expect_model} checkpoint"
        )
    model = create_model(preset)
    missing, unexpected = model.load_state_dict(payload["model"], strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{payload['path']} does not fit preset {preset.name}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return model.to(device).eval(), payload
