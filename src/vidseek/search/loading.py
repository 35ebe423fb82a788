"""Loading the models an index names, and turning stored or decoded frames into their input.

`load_checkpoint_model` refuses a checkpoint whose content hash differs from the one index.json
recorded (issue 12, provenance); `stored_frame_features` / `decode_and_encode_frames` feed the
recall and rerank models from a feature store or from decoded windows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from vidseek.errors import SearchIndexError, VidseekError
from vidseek.store.provenance import file_sha256, weights_fingerprint

__all__ = ["LoadedModel", "load_checkpoint_model", "image_tower_fingerprint", "file_sha256", "needs_video_frames",
           "decode_and_encode_frames", "stored_frame_features"]


# --- checkpoints -----------------------------------------------------------------------------------

def image_tower_fingerprint(model: Any) -> str:
    """sha256 over the image tower's architecture name and weights: equal ⇒ identical frame
    features (the value a feature store records as its "weights")."""
    return weights_fingerprint(model.clip)


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
    if path.is_dir():  # a run folder stands for the checkpoint file `load_model` reads from it
        path = next((path / name for name in ("best.pt", "last.pt") if (path / name).is_file()), path)
    if expected_sha256 is not None:
        if not path.is_file():
            raise SearchIndexError(f"the index was built with checkpoint {path}, which no longer exists; "
                                   f"restore it or rebuild the index with `vidseek index`")
        if file_sha256(path) != expected_sha256:
            raise SearchIndexError(f"checkpoint {path} changed since the index was built (sha256 differs); "
                                   f"restore the original file or rebuild the index with `vidseek index`")
    model, payload = load_model(path, device=device)
    resolved = Path(payload["path"])  # a run folder means its best.pt / last.pt
    sha256 = file_sha256(resolved)  # cached: a stat unless the file was replaced while loading
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise SearchIndexError(f"checkpoint {path} changed while it was being loaded (sha256 differs); "
                               f"restore the original file or rebuild the index with `vidseek index`")
    preset = Preset.from_dict(payload["preset"])
    return LoadedModel(model=model, checkpoint=str(resolved.absolute()), sha256=sha256,
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


def stored_frame_features(store: Any, keys: Sequence[str], patches: bool) -> Any:
    """`FrameFeatures` of `keys` read from a FeatureStore (with patch tokens when `patches`)."""
    import torch

    from vidseek.models.base import FrameFeatures

    frames, masks = store.frame_features(list(keys))
    patch_features = store.patch_features(list(keys)) if patches else None
    return FrameFeatures(frames=torch.from_numpy(frames), mask=torch.from_numpy(masks),
                         patches=None if patch_features is None else torch.from_numpy(patch_features))
