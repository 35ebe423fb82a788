"""Issue 12, item 1 and the kill -9 half of the fault suite: `extract`, `index` and `train`
killed with SIGKILL at injected points, then re-run — with the same weights (must end identical
to a clean run) and with OTHER weights (must be refused with one line, never mixed).

Each killed run is a forked child of the test process (torch already imported, so a run costs
seconds, not an interpreter start) that patches one function to `os.kill(os.getpid(), SIGKILL)`
at its kill point. Every wait is bounded.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from vidseek.errors import ConfigError, SearchIndexError
from vidseek.search.indexer import build_index
from vidseek.search.searcher import Searcher

from reliability.test_corruption import clips_and_recall_model

CLIPS = 8
FIRST = 5  # clips of the first build in the "incremental add" kill point
QUERY = "a blue square grows"
CHILD_SECONDS = 300


def _child(work: Callable[..., None], args: tuple, kill_point: Callable[[pytest.MonkeyPatch], None]) -> None:
    torch.set_num_threads(1)
    kill_point(pytest.MonkeyPatch())
    work(*args)
    os._exit(4)  # the kill point was never reached


def run_killed(work: Callable[..., None], args: tuple, kill_point: Callable[[pytest.MonkeyPatch], None]) -> None:
    """Run `work(*args)` in a child that SIGKILLs itself where `kill_point` patched; assert it did.

    Children come from a fork server (a fresh interpreter with torch imported once), not from
    this process: a fork of a process whose OpenMP pools already ran can hang in the child.
    """
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "vidseek.search.indexer", "vidseek.search.searcher",
                                    "vidseek.store.extract", "vidseek.train.loop"])
    child = context.Process(target=_child, args=(work, args, kill_point))
    child.start()
    child.join(CHILD_SECONDS)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("the killed run hung")
    assert child.exitcode == -signal.SIGKILL, f"child exit code {child.exitcode}"


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_on_call(patcher: pytest.MonkeyPatch, owner: object, name: str, call: int,
                 when: Callable[..., bool] | None = None) -> None:
    """Patch owner.name so that its `call`-th matching call SIGKILLs the process instead of running."""
    original = getattr(owner, name)
    seen = [0]

    def patched(*args, **kwargs):
        if when is None or when(*args, **kwargs):
            seen[0] += 1
            if seen[0] >= call:
                die()
        return original(*args, **kwargs)

    patcher.setattr(owner, name, patched)





def other_weights(checkpoint: Path, out: Path) -> Path:
    """The same architecture with slightly different image-tower weights (model "B")."""
    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    name = next(k for k in payload["model"] if "visual" in k and payload["model"][k].is_floating_point())
    payload["model"][name] = payload["model"][name] + 0.05
    torch.save(payload, out)
    return out


@pytest.fixture(scope="module")
def corpus(tiny_synth, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    folder, model_a = clips_and_recall_model(tiny_synth, root, CLIPS)
    model_b = other_weights(model_a, root / "b.pt")
    build_index(folder, root / "clean", recall=str(model_a), workers=0, progress=False)
    return {"root": root, "folder": folder, "a": model_a, "b": model_b,
            "reference": results(root / "clean")}


def results(index: Path) -> list[dict]:
    """Ranked hits without the file path (the incremental case indexes a copy of the folder)."""
    with Searcher(index) as searcher:
        return [{**h.to_dict(), "path": Path(h.path).name} for h in searcher.search(QUERY, k=CLIPS, recall_k=CLIPS)]


def index_with(corpus: dict, model: str, out: Path, folder: Path | None = None) -> None:
    build_index(folder or corpus["folder"], out, recall=str(corpus[model]), workers=0, progress=False, batch_size=1)


def _kill_mid_extraction(p):
    from vidseek.store.shards import FeatureStore

    kill_on_call(p, FeatureStore, "add", call=3)  # 2 clips committed, the 3rd batch killed


def _kill_before_entries_ready(p):
    from vidseek.search.entries import EntryCatalog

    kill_on_call(p, EntryCatalog, "mark_ready", call=1)


def _is_final_index_json(path, obj) -> bool:
    return Path(path).name == "index.json" and bool(obj.get("manifest"))


def _kill_before_final_index_json(p):
    import vidseek.utils

    kill_on_call(p, vidseek.utils, "atomic_write_json", call=1, when=_is_final_index_json)


KILL_POINTS = {
    "mid-extraction": _kill_mid_extraction,
    "before marking entries ready": _kill_before_entries_ready,
    "before writing the final index.json": _kill_before_final_index_json,
}


@pytest.mark.parametrize("point", [*KILL_POINTS, "mid incremental add"])
def test_index_killed_then_rerun_with_other_weights_is_refused_and_with_the_same_completes(point, corpus, tmp_path):
    out = tmp_path / "index"
    folder = corpus["folder"]
    before: list[dict] | None = None
    if point == "mid incremental add":
        folder = tmp_path / "videos"
        folder.mkdir()
        for clip in sorted(corpus["folder"].glob("*.mp4"))[:FIRST]:
            shutil.copy(clip, folder / clip.name)
        index_with(corpus, "a", out, folder)
        before = results(out)
        for clip in sorted(corpus["folder"].glob("*.mp4"))[FIRST:]:
            shutil.copy(clip, folder / clip.name)
        run_killed(index_with, (corpus, "a", out, folder), _kill_mid_extraction)
    else:
        run_killed(index_with, (corpus, "a", out, folder), KILL_POINTS[point])

    # The interrupted index never answers wrongly: the previous complete state, or one line.
    try:
        interrupted = results(out)
    except SearchIndexError as err:
        assert "\n" not in str(err) and "re-run" in str(err)
    else:
        assert before is not None and interrupted == before

    # Other weights: refused with one line naming what to do — never "N already stored" and a mixed index.
    with pytest.raises(SearchIndexError, match="re-run with (that|the) checkpoint") as refused:
        index_with(corpus, "b", out, folder)
    assert "\n" not in str(refused.value)

    # The same weights: finishes, and equals a clean build.
    index_with(corpus, "a", out, folder)
    assert results(out) == corpus["reference"]
    from vidseek.search.integrity import verify_index

    problems, summary = verify_index(out)
    assert problems == [] and summary["entries"] == CLIPS


def test_index_json_lost_after_a_kill_still_refuses_other_weights(corpus, tmp_path):
    """Even without index.json, entries.sqlite and the feature store name the weights they hold."""
    out = tmp_path / "index"
    run_killed(index_with, (corpus, "a", out), _kill_before_entries_ready)
    (out / "index.json").unlink()
    with pytest.raises(SearchIndexError, match="other recall weights"):
        index_with(corpus, "b", out)
    (out / "entries.sqlite").unlink()
    with pytest.raises(ConfigError, match="features of other .* weights"):
        index_with(corpus, "b", out)


# --- extract ---------------------------------------------------------------------------------------

def tiny_tower(seed: int):
    from vidseek.encoders import build_clip

    torch.manual_seed(seed)
    return build_clip("tiny")


def extract_with(folder: Path, seed: int, out: Path):
    from vidseek.store.extract import extract

    return extract(folder, tiny_tower(seed), out, frames=4, batch_size=1, workers=0, progress=False)


def test_extract_killed_then_rerun_with_other_weights_is_refused(corpus, tmp_path):
    from vidseek.store import FeatureStore
    from vidseek.store.extract import extract

    def run(seed: int):
        return extract_with(corpus["folder"], seed, tmp_path / "store")

    run_killed(extract_with, (corpus["folder"], 0, tmp_path / "store"), _kill_mid_extraction)
    with FeatureStore(tmp_path / "store") as store:
        committed = len(store)
    assert committed == 2
    with pytest.raises(ConfigError, match=r"holds features of other tiny weights .*use the weights it was extracted with"):
        run(1)
    summary = run(0)
    assert (summary.skipped_existing, summary.processed, summary.failed) == (committed, CLIPS - committed, 0)
    extract(corpus["folder"], tiny_tower(0), tmp_path / "clean", frames=4, workers=0, progress=False)
    keys = sorted(p.stem for p in corpus["folder"].glob("*.mp4"))
    with FeatureStore(tmp_path / "store") as got, FeatureStore(tmp_path / "clean") as want:
        np.testing.assert_array_equal(got.frame_features(keys)[0], want.frame_features(keys)[0])


# --- train -----------------------------------------------------------------------------------------

def tiny_train_preset():
    from vidseek.models.registry import get_preset

    return get_preset("synth-clip-tiny").with_overrides(batch_size=8, max_steps=6, eval_every=3, epochs=50,
                                                       warmup_fraction=0.2)


def train_run(preset, data: Path, out: Path) -> None:
    from vidseek.train.loop import train

    train(preset, data, out, progress=False)


def _kill_after_checkpoint_at_step_3(p):
    import vidseek.train.loop as loop

    original = loop.save_checkpoint

    def save_then_die(path, **kwargs):
        original(path, **kwargs)
        if Path(path).name == "last.pt" and kwargs["step"] >= 3:
            die()

    p.setattr(loop, "save_checkpoint", save_then_die)


def test_train_killed_after_a_checkpoint_resumes_bit_identical(tiny_synth, tmp_path):
    import vidseek.train.loop as loop

    preset = tiny_train_preset()
    straight = loop.train(preset, tiny_synth, tmp_path / "straight", progress=False)

    run_killed(train_run, (preset, tiny_synth, tmp_path / "run"), _kill_after_checkpoint_at_step_3)
    resumed = loop.train(preset, tiny_synth, tmp_path / "run", progress=False, resume=True)
    assert resumed.step == straight.step == 6
    a = torch.load(tmp_path / "straight" / "last.pt", map_location="cpu", weights_only=False)["model"]
    b = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=False)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "val.t2v.R@1" in x] == [3, 6]  # no duplicated lines


def test_train_resume_without_checkpoint_is_one_line_and_a_fresh_run_drops_stale_log_lines(tiny_synth, tmp_path):
    import vidseek.train.loop as loop

    preset = tiny_train_preset().with_overrides(max_steps=3)
    with pytest.raises(ConfigError, match=r"holds no checkpoint \(last\.pt\) to continue; drop --resume") as info:
        loop.train(preset, tiny_synth, tmp_path / "run", progress=False, resume=True)
    assert "\n" not in str(info.value)
    # A run killed before its first checkpoint leaves only log lines; the new run must not append to them.
    (tmp_path / "run" / "log.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    loop.train(preset, tiny_synth, tmp_path / "run", progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert {"step": 1, "loss": 9.0} not in lines
    assert [x["step"] for x in lines if "val.t2v.R@1" in x] == [3]
