"""A server that follows its index (issue 12): the `Searcher` is reopened when index.json changes.

`vidseek index` (adds and ``--remove``) rewrites index.json atomically as its last step, so a new
inode / mtime / size of that one file says "the index on disk moved on". Every request stats it
(a few microseconds); on a change one request reopens the index while the others wait for it, so
no response comes from an index older than the one on disk when the request arrived, and /health
and /search always answer from the same generation. The replaced `Searcher` is closed once its
last in-flight request is done.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from vidseek.search.indexer import INDEX_FILE
from vidseek.search.searcher import Searcher

Signature = tuple[int, int, int] | None


def index_signature(index_dir: Path) -> Signature:
    """(inode, mtime ns, size) of index.json; None when it cannot be read."""
    try:
        info = os.stat(index_dir / INDEX_FILE)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


@dataclass
class _Generation:
    searcher: Searcher
    signature: Signature
    owned: bool  # closed by this object when replaced
    users: int = 0
    retired: bool = False  # replaced, or the app shut down: no new users
    closed: bool = False


class LiveIndex:
    """The current `Searcher` of `index_dir`; `use()` hands it out for the length of a request."""

    def __init__(self, index_dir: str | Path, open_searcher: Callable[[], Searcher], first: Searcher | None = None):
        """`open_searcher` opens the index anew; `first` (not owned, never closed here) is used
        until the index changes, otherwise the first generation is opened now."""
        self.index_dir = Path(index_dir)
        self._open_searcher = open_searcher
        signature = index_signature(self.index_dir)
        self._current = _Generation(first or open_searcher(), signature, owned=first is None)
        self._lock = threading.Lock()  # guards _current and the user counts
        self._reload_lock = threading.Lock()  # one reopen at a time

    @property
    def searcher(self) -> Searcher:
        """The current generation's searcher (for reads that need no reload check)."""
        return self._current.searcher

    def _stale(self, signature: Signature) -> bool:
        return signature != self._current.signature or self._current.retired

    def _refresh(self) -> None:
        if not self._stale(index_signature(self.index_dir)):
            return
        with self._reload_lock:
            signature = index_signature(self.index_dir)  # read before opening: a later change reloads again
            if not self._stale(signature):
                return  # another request reopened it while this one waited
            fresh = _Generation(self._open_searcher(), signature, owned=True)
            with self._lock:
                old, self._current = self._current, fresh
                old.retired = True
                close_now = old.users == 0
        if close_now:
            self._close(old)

    @contextmanager
    def use(self) -> Iterator[Searcher]:
        """The searcher of the index as it is on disk now, kept open until the block ends."""
        self._refresh()
        with self._lock:
            generation = self._current
            generation.users += 1
        try:
            yield generation.searcher
        finally:
            with self._lock:
                generation.users -= 1
                close_now = generation.retired and generation.users == 0
            if close_now:
                self._close(generation)

    def search_batch(self, texts: Sequence[str], k: int = 10, recall_k: int = 100,
                     rerank: bool = True) -> list[list[Any]]:
        """`Searcher.search_batch` on the current generation (what `QueryBatcher` calls)."""
        with self.use() as searcher:
            return searcher.search_batch(texts, k=k, recall_k=recall_k, rerank=rerank)

    def _close(self, generation: _Generation) -> None:
        with self._lock:
            already, generation.closed = generation.closed, True
        if generation.owned and not already:
            generation.searcher.close()

    def close(self) -> None:
        """Close the current generation once its requests are done. Closing twice is harmless, and
        a request after `close` (an app whose lifespan is started again) reopens the index."""
        with self._lock:
            generation = self._current
            generation.retired = True
            close_now = generation.users == 0
        if close_now:
            self._close(generation)
