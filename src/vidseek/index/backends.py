"""Choose a dense index backend: `build_dense_index` (new, empty) and `load_dense_index` (saved).

Kept apart from the backends so that imports point one way: `dense` (interface + FAISS) ←
`milvus` ← this module.
"""
from __future__ import annotations

from pathlib import Path

from vidseek.errors import ConfigError, SearchIndexError
from vidseek.index.dense import DENSE_META_FILE, DenseIndex, FaissDenseIndex, read_meta
from vidseek.index.milvus import MilvusDenseIndex  # pymilvus itself is imported only on use


def build_dense_index(dim: int, *, index_type: str = "auto", expected_count: int | None = None,
                      memory_budget_bytes: int = 4 << 30, backend: str = "faiss",
                      milvus_uri: str | None = None, collection: str | None = None,
                      folder: str | Path | None = None) -> DenseIndex:
    """An empty dense index. backend="faiss" (embedded) or "milvus" (milvus_uri: a local path for
    milvus-lite, e.g. ``<index folder>/dense.db``, or ``http://host:19530`` for a server).

    Milvus only: `collection` names the index's own collection (default: derived from `folder`'s
    name plus a random suffix); `folder` is where the index will be saved — the collection is
    claimed there before it is created, so an interrupted first build resumes with it.
    """
    if backend == "faiss":
        return FaissDenseIndex(dim, index_type=index_type, expected_count=expected_count,
                               memory_budget_bytes=memory_budget_bytes)
    if backend == "milvus":
        if not milvus_uri:
            raise ConfigError("the milvus backend needs milvus_uri: a local file like <index folder>/dense.db "
                              "(milvus-lite) or http://host:19530 (a Milvus server)")
        return MilvusDenseIndex(dim, uri=milvus_uri, collection=collection, index_type=index_type,
                                expected_count=expected_count, memory_budget_bytes=memory_budget_bytes,
                                folder=folder)
    raise ConfigError(f"unknown dense index backend {backend!r}: use 'faiss' or 'milvus'")


def load_dense_index(folder: str | Path, milvus_uri: str | None = None) -> DenseIndex:
    """Open the index saved in `folder` (its dense.json says which backend). `milvus_uri`: where
    this process reaches a Milvus-backed index's server, when not at the recorded URI."""
    meta = read_meta(folder)
    if meta.get("backend") == "faiss":
        if milvus_uri is not None:
            raise ConfigError(f"--milvus-uri {milvus_uri}: the index at {Path(folder).parent} keeps its vectors in "
                              f"FAISS, not Milvus; drop --milvus-uri")
        return FaissDenseIndex.load(folder, meta)
    if meta.get("backend") == "milvus":
        return MilvusDenseIndex.load(folder, meta, uri=milvus_uri)
    raise SearchIndexError(f"{Path(folder) / DENSE_META_FILE} names unknown backend {meta.get('backend')!r}; rebuild the index")
