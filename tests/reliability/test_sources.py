"""Issue 12, item 8 (sources): no video is skipped without a word. "..mp4" names and symlinked
folders are indexed, link loops and duplicate ids are reported with a reason, and a second
folder reusing a relative file name is reported — never counted as "already stored"."""
from __future__ import annotations

import os

import torch

from vidseek.store.extract import extract, scan_sources

from test_extract import write_clip


def tiny_tower():
    from vidseek.encoders import build_clip

    torch.manual_seed(0)
    return build_clip("tiny")


def test_dot_names_and_symlinked_folders_are_scanned_and_loops_reported(tmp_path):
    library, elsewhere = tmp_path / "library", tmp_path / "elsewhere"
    for relative in ("..mp4", ".mp4", "a.mp4", "a.webm", "sub/b.mp4"):
        (library / relative).parent.mkdir(parents=True, exist_ok=True)
        (library / relative).write_bytes(b"")
    (elsewhere / "c.mp4").parent.mkdir(parents=True)
    (elsewhere / "c.mp4").write_bytes(b"")
    os.symlink(elsewhere, library / "linked")
    os.symlink(library, library / "sub" / "loop")  # a cycle back to the top
    sources, skipped = scan_sources(library)
    assert [(s.video_id, s.path.name) for s in sources] == [
        ("..mp4", "..mp4"), (".mp4", ".mp4"), ("a", "a.mp4"), ("linked/c", "c.mp4"), ("sub/b", "b.mp4")]
    reasons = dict(skipped)
    assert reasons["a"].endswith("has the same video id as " + str(library / "a.mp4") + "; skipped: rename one of them")
    assert "already scanned; skipped" in reasons["sub/loop"]


def test_second_folder_reusing_a_relative_name_is_reported_not_already_stored(tmp_path):
    first, second, out = tmp_path / "first", tmp_path / "second", tmp_path / "store"
    write_clip(first / "clip.mp4", 6, seed=1)
    write_clip(second / "clip.mp4", 6, seed=2)  # other content, same relative name
    write_clip(second / "other.mp4", 6, seed=3)
    assert extract(first, tiny_tower(), out, frames=4, workers=0, progress=False).processed == 1
    summary = extract(second, tiny_tower(), out, frames=4, workers=0, progress=False)
    assert (summary.processed, summary.skipped_existing, summary.failed) == (1, 0, 1)
    key, reason = summary.failures[0]
    assert key == "clip" and f"already stored from {first / 'clip.mp4'}" in reason and "--remove clip" in reason
