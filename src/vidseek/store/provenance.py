"""Which weights made a feature, an entry, a vector: content hashes (issue 12, "provenance").

An architecture name says nothing about the weights: two checkpoints of one architecture (or two
random initialisations) give different features. So every store and index records

* `file_sha256(path)` — the content hash of a checkpoint / weights file, streamed once and cached
  in this process by (path, size, mtime, inode), so a server that reopens its index stays cheap;
* `weights_fingerprint(module)` — a hash over an image tower's architecture name and tensors:
  equal fingerprints ⇒ identical frame features, whatever file the weights came from (random
  init included).
"""
from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

_HASH_BLOCK = 1 << 20
_sha256_cache: dict[tuple[str, int, int, int], str] = {}
_cache_lock = threading.Lock()


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes; recomputed only when its size, mtime or inode changed."""
    resolved = os.path.realpath(path)
    stat = os.stat(resolved)
    key = (resolved, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    with _cache_lock:
        cached = _sha256_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(resolved, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    with _cache_lock:
        _sha256_cache[key] = digest.hexdigest()
    return digest.hexdigest()


def weights_fingerprint(encoder: Any) -> str:
    """sha256 over an image tower's name and weights (a ClipBackbone's `model.visual`, else the
    whole module's state dict): what a feature store records as the identity of its features."""
    import torch

    name = str(getattr(encoder, "name", None) or type(encoder).__name__)
    visual = getattr(getattr(encoder, "model", None), "visual", None)
    module = visual if isinstance(visual, torch.nn.Module) else encoder
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"cannot fingerprint the weights of {name}: pass a torch.nn.Module image tower")
    digest = hashlib.sha256(name.encode())
    for tensor_name, tensor in sorted(module.state_dict().items()):
        digest.update(tensor_name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
