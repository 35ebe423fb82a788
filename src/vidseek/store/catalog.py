"""SQLite catalog of extracted videos: one row per video (or per window of a long video).

The catalog is the single source of truth for what the feature store holds. A feature row in a
shard file only "exists" once the catalog row pointing at it is committed, and the same
transaction advances the per-shard committed high-water mark (`shard_marks`). So a process killed
between writing features and committing leaves no catalog row that points at missing data; the
uncommitted tail of the shard is simply overwritten on the next run (DESIGN.md, "Long work ... can
be resumed").

WAL journal mode lets readers (a search service, a progress poller) read while `extract` writes,
and makes reopening after `kill -9` safe: SQLite replays or discards the WAL on open.
"""
from __future__ import annotations

import functools
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from vidseek.errors import DatasetError, VidseekError

STATUS_OK = "ok"
STATUS_FAILED = "failed"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    key         TEXT PRIMARY KEY,
    video_id    TEXT NOT NULL,
    path        TEXT NOT NULL,
    start       REAL,
    "end"       REAL,
    duration    REAL,
    num_frames  INTEGER,
    frame_mask  TEXT,
    status      TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error       TEXT,
    shard       INTEGER,
    "row"       INTEGER,
    updated_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_status ON items (status);
CREATE INDEX IF NOT EXISTS items_video ON items (video_id);
CREATE TABLE IF NOT EXISTS shard_marks (
    shard           INTEGER PRIMARY KEY,
    committed_rows  INTEGER NOT NULL
);
"""

_COLUMNS = 'key, video_id, path, start, "end", duration, num_frames, frame_mask, status, error, shard, "row", updated_at'


_Method = TypeVar("_Method", bound=Callable[..., Any])


def database_error(path: Path, err: sqlite3.Error, error_type: type[VidseekError], fix: str) -> VidseekError:
    """One line naming the SQLite file and the fix, instead of sqlite3's bare "file is not a database"."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "locked" in reason:
        fix = "another process holds it; wait for it to finish and retry"
    return error_type(f"{path} cannot be read as a SQLite database ({reason}); {fix}")


def named_database_errors(method: _Method) -> _Method:
    """Turn sqlite3 errors raised by a method of an object with `path` and `damaged_fix` into one
    `database_error` line (the object's `error_type`, default DatasetError)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as err:
            raise database_error(self.path, err, getattr(self, "error_type", DatasetError), self.damaged_fix) from None

    return wrapper  # type: ignore[return-value]


def checkpoint_wal(db: sqlite3.Connection) -> None:
    """Copy the write-ahead log into the database file and empty it, so the file alone holds
    every committed row (what a manifest's size and checksum describe). Retried while a reader
    briefly blocks it."""
    for _ in range(50):
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy:
            return
        time.sleep(0.1)


@dataclass(frozen=True)
class CatalogRow:
    """One catalog entry. `frame_mask` holds one '1'/'0' per sampled frame ('1' = real frame)."""

    key: str
    video_id: str
    path: str
    start: float | None
    end: float | None
    duration: float | None
    num_frames: int | None
    frame_mask: str | None
    status: str
    error: str | None
    shard: int | None
    row: int | None
    updated_at: float

    @property
    def location(self) -> tuple[int, int]:
        """(shard, row) of this entry's features; only 'ok' rows have one."""
        if self.shard is None or self.row is None:
            raise ValueError(f"catalog row {self.key!r} has status {self.status!r} and no features")
        return (self.shard, self.row)


@dataclass(frozen=True)
class OkEntry:
    """What `Catalog.mark_ok` needs to record one successfully extracted item."""

    key: str
    video_id: str
    path: str
    start: float | None
    end: float | None
    duration: float | None
    num_frames: int
    frame_mask: str
    shard: int
    row: int


class Catalog:
    """The `items` table plus the per-shard committed high-water marks."""

    damaged_fix = "run `vidseek verify` on its index, or re-extract into a new --out folder"

    @named_database_errors
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: we issue BEGIN/COMMIT ourselves so one batch is one transaction.
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL is durable against process crashes (kill -9) in WAL mode; feature shards are
        # fsynced before each commit, so a power loss can only lose whole recent batches.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @named_database_errors
    def checkpoint(self) -> None:
        """Fold the WAL into catalog.sqlite (before a manifest records its size and checksum)."""
        checkpoint_wal(self._db)

    def __enter__(self) -> "Catalog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading ----------------------------------------------------------------------------

    @named_database_errors
    def get(self, key: str) -> CatalogRow | None:
        cur = self._db.execute(f"SELECT {_COLUMNS} FROM items WHERE key = ?", (key,))
        found = cur.fetchone()
        return CatalogRow(*found) if found else None

    @named_database_errors
    def get_many(self, keys: Sequence[str]) -> dict[str, CatalogRow]:
        """Rows for the keys that exist, keyed by key (SQLite's variable limit respected)."""
        found: dict[str, CatalogRow] = {}
        for begin in range(0, len(keys), 500):
            chunk = list(keys[begin:begin + 500])
            marks = ",".join("?" * len(chunk))
            for values in self._db.execute(f"SELECT {_COLUMNS} FROM items WHERE key IN ({marks})", chunk):
                found[values[0]] = CatalogRow(*values)
        return found

    @named_database_errors
    def rows(self, status: str | None = STATUS_OK) -> list[CatalogRow]:
        """Rows in insertion order of their features (then key); `status=None` returns all."""
        order = 'ORDER BY shard, "row", key'
        if status is None:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM items {order}")
        else:
            cur = self._db.execute(f"SELECT {_COLUMNS} FROM items WHERE status = ? {order}", (status,))
        return [CatalogRow(*values) for values in cur]

    @named_database_errors
    def keys(self, status: str | None = STATUS_OK) -> list[str]:
        if status is None:
            cur = self._db.execute("SELECT key FROM items ORDER BY key")
        else:
            cur = self._db.execute("SELECT key FROM items WHERE status = ? ORDER BY key", (status,))
        return [k for (k,) in cur]

    @named_database_errors
    def counts(self) -> dict[str, int]:
        """{'ok': n, 'failed': m} (both always present)."""
        result = {STATUS_OK: 0, STATUS_FAILED: 0}
        for status, n in self._db.execute("SELECT status, COUNT(*) FROM items GROUP BY status"):
            result[status] = n
        return result

    def __len__(self) -> int:
        return self.counts()[STATUS_OK]

    @named_database_errors
    def committed_rows(self) -> dict[int, int]:
        """Committed high-water mark per shard: rows [0, n) of shard s are referenced data."""
        return dict(self._db.execute("SELECT shard, committed_rows FROM shard_marks"))

    # --- writing ----------------------------------------------------------------------------

    @named_database_errors
    def mark_ok(self, entries: Iterable[OkEntry]) -> None:
        """Record successfully extracted items and advance the shard marks, in ONE transaction.

        Call only after the features at each entry's (shard, row) are flushed to disk.
        A key that was 'failed' (or 'ok' from an earlier run) is replaced.
        """
        now = time.time()
        entries = list(entries)
        marks: dict[int, int] = {}
        for e in entries:
            marks[e.shard] = max(marks.get(e.shard, 0), e.row + 1)
        with self._transaction():
            self._db.executemany(
                f"INSERT OR REPLACE INTO items ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(e.key, e.video_id, e.path, e.start, e.end, e.duration, e.num_frames, e.frame_mask,
                  STATUS_OK, None, e.shard, e.row, now) for e in entries],
            )
            self._db.executemany(
                "INSERT INTO shard_marks (shard, committed_rows) VALUES (?, ?) "
                "ON CONFLICT(shard) DO UPDATE SET committed_rows = MAX(committed_rows, excluded.committed_rows)",
                list(marks.items()),
            )

    @named_database_errors
    def mark_failed(self, key: str, video_id: str, path: str, error: str,
                    start: float | None = None, end: float | None = None) -> None:
        """Record a per-item failure with its error text (retried on the next run)."""
        with self._transaction():
            self._db.execute(
                f"INSERT OR REPLACE INTO items ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (key, video_id, str(path), start, end, None, None, None, STATUS_FAILED, error, None, None,
                 time.time()),
            )

    @named_database_errors
    def delete(self, keys: Iterable[str]) -> int:
        """Forget keys (their feature rows become unreferenced space). Returns rows deleted."""
        keys = list(keys)
        with self._transaction():
            cur = self._db.executemany("DELETE FROM items WHERE key = ?", [(k,) for k in keys])
        return cur.rowcount

    def _transaction(self) -> "_Transaction":
        return _Transaction(self._db)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
