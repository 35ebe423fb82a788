"""The tiny index the HTTP reliability tests serve: built once per test session, shared by files."""
from __future__ import annotations

import shutil
from pathlib import Path

from test_search import tiny_index

CLIPS = 6


def shared_http_index(tmp_path_factory) -> tuple[Path, dict]:
    """(index folder, collection) over CLIPS synthetic clips; later calls reuse the first build."""
    root = tmp_path_factory.getbasetemp() / "http-index"
    done = root / "built"
    if not done.is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        tiny_index(root, num_clips=CLIPS)
        done.touch()
    collection = {"recall": root / "recall.pt", "rerank": root / "rerank.pt", "videos": root / "videos",
                  "clips": sorted((root / "synth" / "videos" / "all").glob("*.mp4"))}
    return root / "index", collection


def copy_index(index: Path, out: Path) -> Path:
    """A private copy of the index (same video files) that a test may change."""
    shutil.copytree(index, out)
    return out
