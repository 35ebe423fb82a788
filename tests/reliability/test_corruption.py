"""Issue 12, items 2, 3 and 6: a damaged index never answers with rc 0 and wrong results, and
never with a traceback — each damage is one line naming the file and the fix; k is bounded by
the index, not by the request.

One clean 12-clip index (random-init tiny meanP recall, no reranker) is built per module; each
test damages a copy and runs the real CLI entry point in-process (`vidseek.cli.app`).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from vidseek.errors import ConfigError, SearchIndexError
from vidseek.search.indexer import build_index
from vidseek.search.searcher import Searcher

from test_search import save_random_checkpoint

CLIPS = 12
QUERY = "a red circle moves left"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `vidseek ARGS` run through the console entry point."""
    from vidseek.cli import app

    capsys.readouterr()
    previous = sys.argv
    sys.argv = ["vidseek", *map(str, args)]
    try:
        app()
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    finally:
        sys.argv = previous
    out, err = capsys.readouterr()
    return code, out, err


def clips_and_recall_model(tiny_synth: Path, root: Path, clips: int) -> tuple[Path, Path]:
    """A folder with the first `clips` synthetic clips, and a random-init tiny meanP checkpoint."""
    folder = root / "videos"
    folder.mkdir()
    for clip in sorted((tiny_synth / "videos" / "all").glob("*.mp4"))[:clips]:
        shutil.copy(clip, folder / clip.name)
    return folder, save_random_checkpoint(root / "recall.pt", "synth-meanp-tiny", seed=0)


@pytest.fixture(scope="module")
def clean(tiny_synth, tmp_path_factory):
    root = tmp_path_factory.mktemp("corruption")
    folder, recall = clips_and_recall_model(tiny_synth, root, CLIPS)
    build_index(folder, root / "index", recall=str(recall), workers=0, progress=False)
    with Searcher(root / "index") as searcher:
        reference = [h.to_dict() for h in searcher.search(QUERY, k=CLIPS, recall_k=CLIPS)]
    return {"index": root / "index", "reference": reference, "folder": folder, "recall": recall}


@pytest.fixture
def damaged(clean, tmp_path) -> Path:
    copy = tmp_path / "index"
    shutil.copytree(clean["index"], copy)
    return copy


def one_line_error(code: int, err: str, names: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert names in lines[0], lines[0]
    assert "Traceback" not in err
    return lines[0]


def search_json(capsys, index: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(["search", index, QUERY, "-k", str(CLIPS), "--recall-k", str(CLIPS), "--json", *extra], capsys)


def overwrite_middle(path: Path, data: bytes) -> None:
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        handle.write(data)


def test_clean_index_verifies_and_searches(clean, capsys):
    code, out, err = run_cli(["verify", clean["index"]], capsys)
    assert code == 0, err
    assert out.startswith(f"OK: {clean['index']}") and f"{CLIPS} entries, {CLIPS} recall vectors" in out
    code, out, _ = search_json(capsys, clean["index"])
    assert code == 0 and json.loads(out)["results"] == clean["reference"]


# --- each damage: one line naming the file, from search AND from verify --------------------------

def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    path.write_bytes(b"")


def _garbage_same_size(path: Path) -> None:
    path.write_bytes(bytes([0xFF, 0xFE, 0x00, 0x80]) * (path.stat().st_size // 4) + b"\xff" * (path.stat().st_size % 4))


def _garbage_other_size(path: Path) -> None:
    path.write_bytes(b"\x89\xff\x00garbage\xfe" * 7)


def _overwrite_64_bytes(path: Path) -> None:
    overwrite_middle(path, b"\x7f" * 64)  # float32 0x7f7f7f7f ≈ 3.4e38 wherever it lands


DAMAGES = {
    # name: (file glob, damage, what `vidseek search` must name; None: search still right, verify must catch it)
    "dense.json deleted": ("recall/dense.json", _delete, "recall/dense.json"),
    "entries.sqlite truncated to 0 bytes": ("entries.sqlite", _truncate, "entries.sqlite"),
    "64 bytes overwritten in dense-*.faiss": ("recall/dense-*.faiss", _overwrite_64_bytes, "recall"),
    "garbage index.json": ("index.json", _garbage_other_size, "index.json"),
    "garbage dense.json (same size)": ("recall/dense.json", _garbage_same_size, "recall/dense.json"),
    "garbage dense.json": ("recall/dense.json", _garbage_other_size, "recall/dense.json"),
    "garbage store.json": ("features/store.json", _garbage_other_size, "features/store.json"),
    "garbage store.json (same size)": ("features/store.json", _garbage_same_size, None),
    "corrupted entries.sqlite (same size)": ("entries.sqlite", _garbage_same_size, "entries.sqlite"),
    "corrupted catalog.sqlite (same size)": ("features/catalog.sqlite", _garbage_same_size, None),
    "catalog.sqlite truncated": ("features/catalog.sqlite", _truncate, "features/catalog.sqlite"),
    "feature shard deleted": ("features/shards/frames-*.bin", _delete, "features/shards/frames-"),
}


@pytest.mark.parametrize("name", list(DAMAGES))
def test_damage_is_one_line_naming_the_file(name, damaged, clean, capsys):
    pattern, damage, search_names = DAMAGES[name]
    (target,) = damaged.glob(pattern)
    damage(target)
    code, out, err = search_json(capsys, damaged)
    if search_names is None:
        # A file plain search does not read: the answer must still be the clean index's.
        assert code == 0 and json.loads(out)["results"] == clean["reference"], err
    else:
        line = one_line_error(code, err, search_names)
        assert "vidseek verify" in line or "re-index" in line or "rebuild" in line
    code, out, err = run_cli(["verify", damaged], capsys)
    one_line_error(code, err, "damaged file(s)")
    relative = target.relative_to(damaged).as_posix()
    damaged_lines = [line for line in out.splitlines() if line.startswith("damaged: ")]
    assert any(relative in line for line in damaged_lines), out


@pytest.mark.parametrize("damage", [_garbage_same_size, _truncate], ids=["garbage", "truncated"])
def test_damaged_store_catalog_stops_an_incremental_index_with_one_line(damage, damaged, clean, capsys):
    damage(damaged / "features" / "catalog.sqlite")
    code, _, err = run_cli(["index", clean["folder"], "--out", damaged, "--workers", "0"], capsys)
    if damage is _truncate:
        # An emptied catalog re-extracts everything; the entries already indexed are kept, not duplicated.
        assert code == 0, err
        with Searcher(damaged) as searcher:
            assert [h.to_dict() for h in searcher.search(QUERY, k=CLIPS, recall_k=CLIPS)] == clean["reference"]
    else:
        one_line_error(code, err, "features/catalog.sqlite")


def test_garbage_store_json_stops_extract_with_one_line(damaged, clean, capsys):
    _garbage_same_size(damaged / "features" / "store.json")
    code, _, err = run_cli(["index", clean["folder"], "--out", damaged, "--workers", "0"], capsys)
    one_line_error(code, err, "features/store.json")


def test_score_beyond_what_unit_vectors_give_is_an_error_not_a_ranking(damaged):
    """The issue's 4.2e22: even if the bytes land where sizes and parsing cannot see them."""
    from vidseek.index.dense import check_scores

    with pytest.raises(SearchIndexError, match=r"score 4\.2e\+22.*run `vidseek verify`"):
        check_scores(np.array([[0.5, 4.2e22]], np.float32), np.array([[3, 7]]), "flat", damaged / "recall")
    with pytest.raises(SearchIndexError, match="score nan"):
        check_scores(np.array([[np.nan]], np.float32), np.array([[3]]), "flat", damaged / "recall")
    check_scores(np.array([[1.0004, -0.99, -np.inf]], np.float32), np.array([[1, 2, -1]]), "flat", "x")  # padding ok
    check_scores(np.array([[1.3]], np.float32), np.array([[1]]), "ivf4,pq8", "x")  # PQ overshoot is honest
    with pytest.raises(SearchIndexError):
        check_scores(np.array([[1.3]], np.float32), np.array([[1]]), "flat", "x")


def test_index_without_manifest_says_how_to_fix_and_write_manifest_repairs(damaged, clean, capsys):
    meta = json.loads((damaged / "index.json").read_text())
    meta["manifest"] = None  # what an index from before manifests looks like
    (damaged / "index.json").write_text(json.dumps(meta))
    code, _, err = search_json(capsys, damaged)
    one_line_error(code, err, "--write-manifest")
    code, out, err = run_cli(["verify", damaged, "--write-manifest"], capsys)
    assert code == 0 and out.startswith("OK"), out + err
    code, out, _ = search_json(capsys, damaged)
    assert code == 0 and json.loads(out)["results"] == clean["reference"]


# --- k is bounded by the index -------------------------------------------------------------------

def test_huge_k_is_clipped_to_the_index_size(clean, monkeypatch):
    with Searcher(clean["index"]) as searcher:
        asked: list[int] = []
        search = searcher.recall.index.search
        monkeypatch.setattr(searcher.recall.index, "search", lambda q, k: (asked.append(k), search(q, k))[1])
        hits = searcher.search(QUERY, k=1_000_000_000, recall_k=10**12)
    assert asked == [CLIPS]  # arrays sized by the index, not by k
    assert [h.to_dict() for h in hits] == clean["reference"]


@pytest.mark.parametrize("k", [0, -3, 2.5, True, "5"])
def test_bad_k_is_a_one_line_config_error(clean, k):
    with Searcher(clean["index"]) as searcher:
        with pytest.raises(ConfigError, match="k must be a whole number of at least 1") as info:
            searcher.search(QUERY, k=k)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("k, message", [("abc", "Invalid value for '-k'"), ("0", "k must be a whole number"),
                                        ("1000000000", None)])
def test_cli_k_values(k, message, clean, capsys):
    code, out, err = run_cli(["search", clean["index"], QUERY, "-k", k, "--json"], capsys)
    if message is None:
        assert code == 0 and json.loads(out)["results"] == clean["reference"]
    else:
        line = one_line_error(code, err, message)
        assert "--help" in line or "at least 1" in line
