"""User-facing errors. Each message is one line that names the thing and says the fix.

The CLI catches `VidseekError` and prints `error: <message>` with a non-zero exit status, so a
user never sees a traceback for a mistake they can correct.
"""
from __future__ import annotations

from pathlib import Path


class VidseekError(Exception):
    """Base class: a problem the user can fix. `str(err)` is a single line."""


class ConfigError(VidseekError):
    """Unknown preset, bad option value, inconsistent configuration."""


class DatasetError(VidseekError):
    """A dataset file or folder is missing or malformed."""


class CheckpointError(VidseekError):
    """A checkpoint / weights file is missing, corrupt, or belongs to another model."""


class VideoDecodeError(VidseekError):
    """A video file cannot be opened or decoded. Never replaced by zero frames."""

    def __init__(self, path: str | Path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot decode video {self.path}: {reason}")


class SearchIndexError(VidseekError):
    """A search index is missing, corrupt, or was built by an incompatible model."""
