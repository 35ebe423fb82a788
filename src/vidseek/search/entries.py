"""An index folder's layout, its index.json, and its table of searchable entries.

Shared by the indexer (which writes them) and the searcher (which reads them), so neither has to
import the other. See `indexer` for what each file of an index folder holds.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from vidseek.errors import SearchIndexError
from vidseek.store.catalog import checkpoint_wal, named_database_errors
from vidseek.utils import read_json_or_reason

INDEX_FILE = "index.json"
ENTRIES_FILE = "entries.sqlite"
RECALL_STORE_DIR = "features"
RERANK_STORE_DIR = "features-rerank"
RECALL_STATE_DIR = "recall"
THUMBNAIL_DIR = "thumbnails"
INDEX_FORMAT = 1


def damaged_index_fix(index_dir: str | Path) -> str:
    """The fix every "this index file is damaged" line ends with."""
    return f"run `vidseek verify {index_dir}` to see every damaged file, then re-index (`vidseek index`) into a new --out folder"


# --- index.json ----------------------------------------------------------------------------------

def read_index_json(index_dir: str | Path) -> dict[str, Any]:
    """index.json of an index folder, or one line naming the file and the fix."""
    path = Path(index_dir) / INDEX_FILE
    if not path.is_file():
        raise SearchIndexError(f"no search index at {index_dir} (missing {INDEX_FILE}); "
                               f"build one with `vidseek index <videos> --recall CKPT --out {index_dir}`")
    meta, reason = read_json_or_reason(path)
    if reason:
        raise SearchIndexError(f"{path} is damaged ({reason}); {damaged_index_fix(index_dir)}")
    if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise SearchIndexError(f"{path} has index format {found!r}, this vidseek reads {INDEX_FORMAT}; "
                               f"rebuild the index with `vidseek index`")
    return meta


# --- the entry table -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One searchable item: a whole video or one window of a long one."""

    id: int  # the dense index id
    key: str  # feature-store key: video_id, or "video_id#k" for window k
    video_id: str
    path: str
    start: float  # seconds in the file
    end: float | None  # None when the file's duration is unknown
    # The file's size and st_mtime_ns when it was indexed (None in indexes from before they were
    # recorded): the server serves a file only while both still match.
    size: int | None = None
    mtime_ns: int | None = None


_ENTRY_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    key       TEXT NOT NULL UNIQUE,
    video_id  TEXT NOT NULL,
    path      TEXT NOT NULL,
    start     REAL NOT NULL,
    "end"     REAL,
    ready     INTEGER NOT NULL DEFAULT 0,
    size      INTEGER,
    mtime_ns  INTEGER
);
CREATE INDEX IF NOT EXISTS entries_video ON entries (video_id);
CREATE TABLE IF NOT EXISTS provenance (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
"""
_BASE_COLUMNS = 'id, key, video_id, path, start, "end"'
_FILE_COLUMNS = ("size", "mtime_ns")  # added after the first release: older tables get them on open


def _file_identity(path: str) -> tuple[int | None, int | None]:
    try:
        info = os.stat(path)
    except OSError:
        return None, None
    return info.st_size, info.st_mtime_ns


class EntryCatalog:
    """SQLite table of searchable entries; safe to share between threads (one lock).

    Readers open an existing table only: a missing or emptied file is an error naming it, never an
    empty index. The `provenance` table records which model's vectors the
    entries stand for (the recall checkpoint's sha256), so a run with other weights cannot add to them.
    """

    error_type = SearchIndexError

    @named_database_errors
    def __init__(self, path: str | Path, mode: str = "create"):
        """`mode`: "create" (an indexer's first run: file and table made if absent), "write" (an
        indexer on an existing index: the table must exist) or "read" (a searcher: the table must
        exist and the file is not modified)."""
        if mode not in ("create", "write", "read"):
            raise ValueError(f"EntryCatalog mode must be create, write or read, not {mode!r}")
        self.path = Path(path)
        self.damaged_fix = damaged_index_fix(self.path.parent)
        self._lock = threading.Lock()
        if mode != "create" and not self.path.is_file():
            raise SearchIndexError(f"{self.path} is missing; {self.damaged_fix}")
        self._db = sqlite3.connect(str(self.path), isolation_level=None, timeout=30.0, check_same_thread=False)
        if mode != "create" and "entries" not in self._tables():
            self._db.close()
            raise SearchIndexError(f"{self.path} holds no entries table (emptied or replaced?); {self.damaged_fix}")
        if mode != "read":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_ENTRY_SCHEMA)
        present = {row[1] for row in self._db.execute("PRAGMA table_info(entries)")}
        for column in _FILE_COLUMNS:
            if column not in present and mode != "read":
                self._db.execute(f"ALTER TABLE entries ADD COLUMN {column} INTEGER")
        # A reader of an older table (not modified) sees NULL file identities: regular-file check only.
        self._columns = _BASE_COLUMNS + "".join(
            f", {c}" if (c in present or mode != "read") else f", NULL AS {c}" for c in _FILE_COLUMNS)

    def _tables(self) -> set[str]:
        return {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @named_database_errors
    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return list(self._db.execute(sql, args))

    @named_database_errors
    def _write(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(sql, rows)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @named_database_errors
    def add_pending(self, rows: Sequence[tuple[str, str, str, float, float | None]]) -> list[int]:
        """Insert (key, video_id, path, start, end) rows as not yet searchable, with the file's
        current size and mtime; their new ids, in order."""
        rows = [(*row, *_file_identity(row[2])) for row in rows]
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                ids = [int(self._db.execute('INSERT INTO entries (key, video_id, path, start, "end", ready, size, '
                                            "mtime_ns) VALUES (?,?,?,?,?,0,?,?)", row).lastrowid) for row in rows]
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return ids

    def mark_ready(self, ids: Iterable[int]) -> None:
        self._write("UPDATE entries SET ready = 1 WHERE id = ?", [(int(i),) for i in ids])

    def pending(self) -> list[Entry]:
        return [Entry(*r) for r in self._query(f"SELECT {self._columns} FROM entries WHERE ready = 0 ORDER BY id")]

    def keys(self) -> set[str]:
        return {k for (k,) in self._query("SELECT key FROM entries")}

    def get_many(self, ids: Sequence[int]) -> dict[int, Entry]:
        """Ready entries for the ids that exist (unknown ids are simply absent)."""
        found: dict[int, Entry] = {}
        ids = [int(i) for i in ids]
        for begin in range(0, len(ids), 500):
            chunk = ids[begin:begin + 500]
            marks = ",".join("?" * len(chunk))
            for row in self._query(f"SELECT {self._columns} FROM entries WHERE ready = 1 AND id IN ({marks})", chunk):
                found[row[0]] = Entry(*row)
        return found

    def video_entries(self, video_id: str) -> list[Entry]:
        """Ready entries of one video, in time order ([] for an unknown id)."""
        rows = self._query(f"SELECT {self._columns} FROM entries WHERE ready = 1 AND video_id = ? ORDER BY start, id",
                           (video_id,))
        return [Entry(*r) for r in rows]

    def entries_of(self, video_ids: Sequence[str]) -> list[Entry]:
        found: list[Entry] = []
        for begin in range(0, len(video_ids), 500):
            chunk = list(video_ids[begin:begin + 500])
            marks = ",".join("?" * len(chunk))
            found += [Entry(*r) for r in self._query(
                f"SELECT {self._columns} FROM entries WHERE video_id IN ({marks}) ORDER BY id", chunk)]
        return found

    def delete(self, ids: Iterable[int]) -> None:
        self._write("DELETE FROM entries WHERE id = ?", [(int(i),) for i in ids])

    def counts(self) -> dict[str, int]:
        """{'keys': ready entries, 'videos': distinct videos among them}."""
        ((keys, videos),) = self._query("SELECT COUNT(*), COUNT(DISTINCT video_id) FROM entries WHERE ready = 1")
        return {"keys": int(keys), "videos": int(videos)}

    def total(self) -> int:
        """Entries of any state (ready or pending)."""
        ((count,),) = self._query("SELECT COUNT(*) FROM entries")
        return int(count)

    @named_database_errors
    def provenance(self) -> dict[str, str]:
        """What the entries' vectors were made by ({} for a table from before provenance)."""
        with self._lock:
            tables = self._tables()
        return dict(self._query("SELECT name, value FROM provenance")) if "provenance" in tables else {}

    def set_provenance(self, values: dict[str, str]) -> None:
        self._write("INSERT OR REPLACE INTO provenance (name, value) VALUES (?, ?)", sorted(values.items()))

    @named_database_errors
    def checkpoint(self) -> None:
        """Fold the WAL into entries.sqlite (before a manifest records its size and checksum)."""
        with self._lock:
            checkpoint_wal(self._db)
