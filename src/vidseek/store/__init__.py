"""Feature store: SQLite catalog + memory-mapped fp16 feature shards, and resumable extraction.

`FeatureStore` holds per-frame (and optionally patch-token) features for every video or window;
`extract` fills one from a dataset / JSONL file / folder of videos and can be resumed after a kill.
`extract` is imported lazily so that reading a store does not import torch.
"""
from __future__ import annotations

from vidseek.store.catalog import Catalog, CatalogRow
from vidseek.store.shards import FeatureShards, FeatureStore, StoredItem, read_store_config

__all__ = ["Catalog", "CatalogRow", "FeatureShards", "FeatureStore", "StoredItem", "read_store_config",
           "extract", "iter_sources", "ExtractSummary", "VideoSource"]


def __getattr__(name: str):
    if name in ("extract", "iter_sources", "ExtractSummary", "VideoSource"):
        from vidseek.store import extract as extract_module

        return getattr(extract_module, name)
    raise AttributeError(f"module 'vidseek.store' has no attribute {name!r}")
