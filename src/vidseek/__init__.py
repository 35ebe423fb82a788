"""vidseek: text-to-video retrieval — train, evaluate and serve TC-MGC, PIG and GRDR.

Importing the package has no side effects (no downloads, no thread settings, no logging set-up).
The public entry points are imported lazily so `import vidseek` stays cheap.
"""
from __future__ import annotations

from vidseek.version import __version__

__all__ = ["__version__", "load", "load_encoder"]


def __getattr__(name: str):
    # Lazy re-exports: keep `import vidseek` free of torch start-up cost.
    if name in ("load", "load_encoder"):
        from vidseek import api

        return getattr(api, name)
    raise AttributeError(f"module 'vidseek' has no attribute {name!r}")
