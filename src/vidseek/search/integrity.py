"""Is an index folder intact? Its manifest, the cheap check on every open, and `vidseek verify`.

index.json holds a manifest (issue 12, "integrity on open"): the size and sha256 of every file
the index depends on — entries.sqlite, the recall state (dense.json and its FAISS files, or the
GRDR state), and each feature store's store.json, catalog.sqlite and shards — plus the counts
that must agree (ready entries, recall vectors) and the recall vectors' dimension. The indexer
rewrites it, atomically with index.json, at the end of every add / remove, after folding the
SQLite write-ahead logs into their files so that sizes and checksums describe every committed row.

* `check_opened` (every `Searcher` open, so `vidseek search` and `serve`): presence and size of
  every file, the counts and the dimension — stat calls and two counts, no hashing.
* `verify_index` (`vidseek verify IDX`): everything — checksums, SQLite's own consistency check,
  the JSON files, the counts, and the checkpoints' sha256 against what index.json recorded.
"""
from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vidseek.errors import SearchIndexError
from vidseek.search.entries import (ENTRIES_FILE, INDEX_FILE, RECALL_STATE_DIR, EntryCatalog, damaged_index_fix,
                                    read_index_json)
from vidseek.store.manifest import build_manifest, check_manifest, sha256_of
from vidseek.store.shards import CATALOG_FILE, SHARDS_DIR, STORE_CONFIG_FILE
from vidseek.utils import read_json_or_reason

MANIFEST_KEY = "manifest"
MANIFEST_VERSION = 1
# Files under recall/ that are not the index's committed state: temporaries of atomic writes
# (".name.tmp"), and milvus-lite's database, which its own server process rewrites.
_VOLATILE_PREFIXES = (".", "milvus.db")
_SQLITE_FILES = {ENTRIES_FILE, CATALOG_FILE}


@dataclass(frozen=True)
class Problem:
    """What is wrong with one file of an index, as one line."""

    path: Path
    problem: str

    def __str__(self) -> str:
        return f"{self.path} {self.problem}"


def store_dirs(meta: dict[str, Any]) -> list[str]:
    """The feature-store folders an index uses (recall, and the reranker's when separate)."""
    return sorted({d for d in (meta.get("stores") or {}).values() if d})


def index_files(index_dir: Path, meta: dict[str, Any]) -> list[str]:
    """Paths (relative, '/'-separated) of every file the index depends on, as they are now."""
    files = [ENTRIES_FILE]
    recall_dir = index_dir / RECALL_STATE_DIR
    if recall_dir.is_dir():
        files += [p.relative_to(index_dir).as_posix() for p in sorted(recall_dir.rglob("*"))
                  if p.is_file() and not any(part.startswith(_VOLATILE_PREFIXES)
                                             for part in p.relative_to(recall_dir).parts)]
    for store in store_dirs(meta):
        files += [f"{store}/{STORE_CONFIG_FILE}", f"{store}/{CATALOG_FILE}"]
        files += [p.relative_to(index_dir).as_posix() for p in sorted((index_dir / store / SHARDS_DIR).glob("*.bin"))]
    return files


def make_manifest(index_dir: str | Path, meta: dict[str, Any], counts: dict[str, int], dim: int | None
                  ) -> dict[str, Any]:
    """The manifest of the index as it is on disk now. Callers fold SQLite WALs in first."""
    index_dir = Path(index_dir)
    return {"version": MANIFEST_VERSION, "files": build_manifest(index_dir, index_files(index_dir, meta)),
            "counts": {"entries": int(counts["entries"]), "recall_vectors": int(counts["recall_vectors"])},
            "dim": dim}


def _manifest(index_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    manifest = meta.get(MANIFEST_KEY)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise SearchIndexError(
            f"{index_dir / INDEX_FILE} has no manifest: its first `vidseek index` run did not finish (re-run it), "
            f"or an older vidseek built it (run `vidseek verify {index_dir} --write-manifest`)")
    return manifest


def damaged(index_dir: Path, problem: Problem | str) -> SearchIndexError:
    return SearchIndexError(f"index {index_dir} is damaged: {problem}; if a `vidseek index` run on it was "
                            f"interrupted, re-run it, otherwise {damaged_index_fix(index_dir)}")


def check_files(index_dir: str | Path, meta: dict[str, Any]) -> None:
    """The cheap file check (presence and sizes): raises on the first problem."""
    index_dir = Path(index_dir)
    problems = check_manifest(index_dir, _manifest(index_dir, meta)["files"])
    if problems:
        raise damaged(index_dir, problems[0])


def check_counts(index_dir: str | Path, meta: dict[str, Any], entries: int, recall_vectors: int,
                 dim: int | None) -> None:
    """Ready entries, recall vectors and their dimension must be what the manifest recorded."""
    index_dir = Path(index_dir)
    manifest = _manifest(index_dir, meta)
    recorded = manifest["counts"]
    if entries != recorded["entries"]:
        raise damaged(index_dir, f"{index_dir / ENTRIES_FILE} holds {entries} ready entries, the manifest says "
                                 f"{recorded['entries']}")
    if recall_vectors != recorded["recall_vectors"]:
        raise damaged(index_dir, f"{index_dir / RECALL_STATE_DIR} holds {recall_vectors} vectors, the manifest says "
                                 f"{recorded['recall_vectors']}")
    if dim is not None and manifest.get("dim") is not None and dim != manifest["dim"]:
        raise damaged(index_dir, f"{index_dir / RECALL_STATE_DIR} holds {dim}-d vectors, the manifest says "
                                 f"{manifest['dim']}")


# --- vidseek verify --------------------------------------------------------------------------------

def _sqlite_problem(path: Path) -> str | None:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
        try:
            rows = [r for (r,) in db.execute("PRAGMA quick_check")]
        finally:
            db.close()
    except sqlite3.DatabaseError as err:
        return f"is not a readable SQLite database ({err})"
    if rows != ["ok"]:
        return f"fails SQLite's consistency check ({rows[0]})"
    return None


def _json_problem(path: Path) -> str | None:
    _, reason = read_json_or_reason(path)
    return None if reason is None else f"is {reason}"


def _content_problems(index_dir: Path, files: list[str]) -> list[Problem]:
    """What the files' own formats say: SQLite consistency, JSON syntax."""
    problems = []
    for relative in files:
        path = index_dir / relative
        if not path.is_file():
            continue
        problem = (_sqlite_problem(path) if path.name in _SQLITE_FILES
                   else _json_problem(path) if path.suffix == ".json" else None)
        if problem:
            problems.append(Problem(path, problem))
    return problems


def _recorded_counts(index_dir: Path, meta: dict[str, Any]) -> tuple[dict[str, int], int | None, list[Problem]]:
    """Counts and dimension as the files say now (ready entries, recall vectors), or problems."""
    problems: list[Problem] = []
    counts = {"entries": 0, "recall_vectors": 0}
    dim = None
    try:
        entries = EntryCatalog(index_dir / ENTRIES_FILE, mode="read")
        try:
            counts["entries"] = entries.counts()["keys"]
        finally:
            entries.close()
    except SearchIndexError as err:
        problems.append(Problem(index_dir / ENTRIES_FILE, f"cannot be read ({err})"))
    dense_meta = index_dir / RECALL_STATE_DIR / "dense.json"
    if (meta.get("recall") or {}).get("backend", "dense") == "dense":
        try:
            recall_meta = json.loads(dense_meta.read_text(encoding="utf-8"))
            counts["recall_vectors"], dim = int(recall_meta["count"]), int(recall_meta["dim"])
        except FileNotFoundError:
            if counts["entries"]:
                problems.append(Problem(dense_meta, "is missing"))
        except (ValueError, KeyError, TypeError):
            pass  # reported by the JSON check
    else:
        counts["recall_vectors"] = counts["entries"]  # other backends: checked when they load
    return counts, dim, problems


def _checkpoint_problems(meta: dict[str, Any]) -> list[Problem]:
    problems = []
    for role in ("recall", "rerank"):
        model = meta.get(role)
        if not model or not model.get("checkpoint"):
            continue
        path = Path(model["checkpoint"])
        if not path.is_file():
            problems.append(Problem(path, f"(the {role} checkpoint) is missing; restore it or re-index"))
        elif sha256_of(path) != model.get("sha256"):
            problems.append(Problem(path, f"(the {role} checkpoint) changed since indexing (sha256 differs); "
                                          f"restore it or re-index"))
    return problems


def verify_index(index_dir: str | Path, write_manifest: bool = False) -> tuple[list[Problem], dict[str, Any]]:
    """Check everything: ([first problem of each damaged file], summary). With `write_manifest`,
    an index without a manifest gets one — only when nothing else is wrong."""
    from vidseek.utils import atomic_write_json

    index_dir = Path(index_dir)
    if not (index_dir / INDEX_FILE).is_file():
        read_index_json(index_dir)  # raises: no index here at all
    try:
        meta = read_index_json(index_dir)
    except SearchIndexError as err:  # e.g. "…/index.json is damaged (not UTF-8 text); run …"
        return [Problem(index_dir / INDEX_FILE, str(err).split(";")[0].split(INDEX_FILE, 1)[-1].strip())], {"files": 1}
    manifest = meta.get(MANIFEST_KEY) if isinstance(meta.get(MANIFEST_KEY), dict) else None
    files = sorted(manifest["files"]) if manifest else index_files(index_dir, meta)
    problems: list[Problem] = []
    if manifest:
        problems += [Problem(p.path, p.problem) for p in check_manifest(index_dir, manifest["files"], full=True)]
    problems += _content_problems(index_dir, files)
    counts, dim, count_problems = _recorded_counts(index_dir, meta)
    problems += count_problems
    if manifest and not count_problems:
        try:
            check_counts(index_dir, meta, counts["entries"], counts["recall_vectors"], dim)
        except SearchIndexError:
            problems.append(Problem(index_dir / ENTRIES_FILE, f"and {RECALL_STATE_DIR}/ hold {counts['entries']} "
                                    f"entries / {counts['recall_vectors']} vectors, the manifest says "
                                    f"{manifest['counts']['entries']} / {manifest['counts']['recall_vectors']}"))
    problems += _checkpoint_problems(meta)
    first_per_file: dict[Path, Problem] = {}
    for problem in problems:
        first_per_file.setdefault(problem.path, problem)
    problems = list(first_per_file.values())
    if manifest is None:
        if not write_manifest:
            problems.append(Problem(index_dir / INDEX_FILE, "has no manifest (built by an older vidseek or an "
                                    "unfinished run): re-run `vidseek index`, or `vidseek verify --write-manifest`"))
        elif not problems:
            meta[MANIFEST_KEY] = make_manifest(index_dir, meta, counts, dim)
            atomic_write_json(index_dir / INDEX_FILE, meta)
    return problems, {"files": len(files), **counts}
