"""File manifests: size + sha256 of every file a folder's data depends on (issue 12, "integrity").

A manifest is `{relative path: {"size": bytes, "sha256": hex}}`. `check_manifest` compares a
folder against one: the cheap check (every open) looks at presence and sizes only; the full check
(`vidseek verify`) also re-hashes every file. Each problem is one line naming the file.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

_HASH_BLOCK = 1 << 20


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, streamed (no cache: manifests must see the bytes as they are now)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def build_manifest(root: str | Path, relative_paths: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """Size and sha256 of each file (paths relative to `root`, '/'-separated)."""
    root = Path(root)
    manifest: dict[str, dict[str, int | str]] = {}
    for relative in sorted(set(relative_paths)):
        path = root / relative
        manifest[relative] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    return manifest


@dataclass(frozen=True)
class FileProblem:
    """One file that does not match its manifest entry."""

    path: Path
    problem: str  # e.g. "is missing", "is 0 bytes, the manifest says 12288"

    def __str__(self) -> str:
        return f"{self.path} {self.problem}"


def check_manifest(root: str | Path, manifest: dict[str, dict[str, int | str]], *, full: bool = False
                   ) -> list[FileProblem]:
    """Files of `root` that are missing, of another size, or (with `full`) of other content."""
    root = Path(root)
    problems: list[FileProblem] = []
    for relative, record in sorted(manifest.items()):
        path = root / relative
        if not path.is_file():
            problems.append(FileProblem(path, "is missing"))
            continue
        size = path.stat().st_size
        if size != record["size"]:
            problems.append(FileProblem(path, f"is {size} bytes, the manifest says {record['size']}"))
        elif full and sha256_of(path) != record["sha256"]:
            problems.append(FileProblem(path, "has other content than when it was written (sha256 differs)"))
    return problems
