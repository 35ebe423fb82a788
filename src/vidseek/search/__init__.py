"""The search engine: index a video collection (`Indexer`) and search it (`Searcher`) with a
recall → rerank cascade. Imported lazily so `import vidseek.search` does not load torch."""
from __future__ import annotations

__all__ = ["Indexer", "IndexSummary", "build_index", "Searcher", "Hit", "Recall", "RecallBackend",
           "RECALL_BACKENDS", "register_recall_backend", "MAX_QUERY_CHARS"]

_HOMES = {
    "Indexer": "indexer", "IndexSummary": "indexer", "build_index": "indexer",
    "Searcher": "searcher", "Hit": "searcher", "Recall": "searcher", "RecallBackend": "searcher",
    "RECALL_BACKENDS": "searcher", "register_recall_backend": "searcher", "MAX_QUERY_CHARS": "searcher",
}


def __getattr__(name: str):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"vidseek.search.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'vidseek.search' has no attribute {name!r}")
