"""GRDR wiring: presets, `vidseek train` on a dense run's vectors, `vidseek eval` (recall quality +
cascade), the `grdr:` recall backend of the search index, and the diagnostics plot."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from vidseek.errors import ConfigError
from vidseek.eval.grdr_eval import cascade_ranks, plot_grdr_diagnostics, run_grdr_eval
from vidseek.models.registry import get_preset
from vidseek.train.loop import train

GRDR_STEPS = 9  # one step per phase: 3 loops × {pretrain, main, fit}


@pytest.fixture(scope="module")
def runs(tiny_synth, tmp_path_factory):
    """A 2-step dense run and a GRDR run trained on its video vectors."""
    root = tmp_path_factory.mktemp("grdr_runs")
    train(get_preset("synth-meanp-tiny").with_overrides(batch_size=8, max_steps=2, eval_every=2), tiny_synth,
          root / "dense", progress=False, device="cpu")
    preset = get_preset("synth-grdr-tiny").with_overrides(batch_size=8, max_steps=GRDR_STEPS)
    result = train(preset, tiny_synth, root / "grdr", init_from=str(root / "dense"), progress=False, device="cpu")
    return {"root": root, "data": tiny_synth, "dense": root / "dense", "grdr": root / "grdr", "result": result,
            "preset": preset}


def test_paper_presets_follow_the_release():
    for name, k in [("msrvtt9k-grdr-b32", 128), ("activitynet-grdr-b16", 128), ("didemo-grdr-b32", 96),
                    ("lsmdc-grdr-b32", 200)]:
        preset = get_preset(name)
        cfg = preset.model_config
        assert (preset.model, cfg["codebook_size"], cfg["num_views"], cfg["levels"]) == ("grdr", k, 4, 3)
        assert cfg["beams"] == 100 and 20 <= cfg["beams_full_corpus"] <= 50
        assert get_preset(cfg["dense_preset"]).model == "twotower"  # names a registered dense preset
        assert preset.train.batch_size == 512 and preset.train.lr == 1e-4
    tiny = get_preset("synth-grdr-tiny")
    assert tiny.model_config["embed_dim"] == 64 and get_preset(tiny.model_config["dense_preset"]).clip == "tiny"


def test_missing_init_is_one_line_config_error(tiny_synth, tmp_path):
    with pytest.raises(ConfigError, match="pass --init RUN_OF_A_DENSE_MODEL") as err:
        train(get_preset("synth-grdr-tiny"), tiny_synth, tmp_path / "grdr", progress=False, device="cpu")
    assert "\n" not in str(err.value)


def test_unknown_model_config_key_is_rejected():
    from vidseek.models.grdr import split_model_config

    config, settings = split_model_config({"codebook_size": 8, "beams": 7})
    assert (config.codebook_size, settings) == (8, {"beams": 7})
    with pytest.raises(ConfigError, match="codebok_size"):
        split_model_config({"codebok_size": 8})


def test_schedule_and_config_from_the_preset():
    from vidseek.train.grdr_run import grdr_config_for, steps_per_phase

    tiny = get_preset("synth-grdr-tiny")
    assert steps_per_phase(tiny, 3, 2100) == 540 // 9
    by_epochs = tiny.with_overrides(epochs=2, batch_size=64)
    by_epochs.train.max_steps = None
    assert steps_per_phase(by_epochs, 3, 130) == 2 * 3  # 2 passes × ceil(130 / 64) batches
    paper = grdr_config_for(get_preset("msrvtt9k-grdr-b32"), 512)
    assert (paper.embed_dim, paper.codebook_size, paper.lr, paper.grad_clip, paper.text_encoder) == (
        512, 128, 1e-4, 1.0, "clip")
    assert grdr_config_for(get_preset("didemo-grdr-b16"), 768).embed_dim == 768  # width follows the dense model
    with pytest.raises(ConfigError, match="expects 64-d video vectors but the --init model gives 512-d"):
        grdr_config_for(tiny, 512)


def test_run_writes_vidseek_checkpoints_and_resumes(runs):
    from vidseek.train.checkpoint import read_checkpoint

    result = runs["result"]
    assert result.step == GRDR_STEPS
    best, last = read_checkpoint(runs["grdr"] / "best.pt"), read_checkpoint(runs["grdr"] / "last.pt")
    for key in ("preset", "model", "grdr_config", "dense_checkpoint", "step", "best", "history"):
        assert key in best
    assert best["preset"]["name"] == "synth-grdr-tiny" and best["grdr_config"]["embed_dim"] == 64
    assert best["dense_checkpoint"]["checkpoint"] == str((runs["dense"] / "best.pt").absolute())
    assert [(s["loop"], s["phase"], s["steps"]) for s in best["history"]["steps"]] == [
        (loop, phase, 1) for loop in range(3) for phase in ("pretrain", "main", "fit")]
    assert 0.0 <= best["best"]["value"] <= 100.0 and best["best"]["metric"] == "val.grdr.hit_rate"
    assert best["step"] == last["step"] == GRDR_STEPS
    torch.testing.assert_close(best["model"]["tokenizer.codebooks.2"], last["model"]["tokenizer.codebooks.2"])
    # a finished run: --resume is a no-op returning the same result; without it, refusing to overwrite
    again = train(runs["preset"], runs["data"], runs["grdr"], init_from=str(runs["dense"]), resume=True,
                  progress=False, device="cpu")
    assert (again.step, again.best) == (result.step, result.best)
    with pytest.raises(ConfigError, match="--resume"):
        train(runs["preset"], runs["data"], runs["grdr"], init_from=str(runs["dense"]), progress=False, device="cpu")


def test_cascade_ranks_by_hand():
    ranks = cascade_ranks([np.array([0.5, 0.9, 0.5]), np.array([0.2, 0.1]), np.array([], dtype=np.float32)],
                          [[3, 1, 7], [4, 2], []], [7, 4, 0])
    # query 0: gt 7 scores 0.5, tied with 3 and beaten by 1 → rank 3 (ties count against it);
    # query 1: gt 4 is best → 1; query 2: nothing recalled → a miss at every K.
    assert ranks[0] == 3 and ranks[1] == 1 and math.isinf(ranks[2])


def test_eval_reports_recall_cascade_and_diagnostics(runs, tmp_path):
    json_out = tmp_path / "grdr_eval.json"
    m = run_grdr_eval(runs["grdr"], runs["data"], split="test", beams=5, json_out=json_out, device="cpu",
                      progress=False, echo=False)
    assert 0.0 <= m["grdr.hit_rate"] <= 100.0 and 0.0 <= m["dense.hit_rate_same_size"] <= 100.0
    assert m["grdr.candidates.min"] > 0 and m["grdr.candidates.max"] <= m["num_videos"]
    assert m["beams"] == 5 and m["grdr.bytes_per_video"] == 4 * 3 * 1 and m["dense.bytes_per_video"] == 64 * 4
    for key in ("cascade.R@1", "cascade.R@5", "cascade.R@10", "full.R@1", "cascade.ms_per_query",
                "full.ms_per_query", "grdr.views.same_code.l3", "grdr.views.same_prefix.l1", "grdr.codebook.used.l1",
                "grdr.codebook.perplexity.l3"):
        assert key in m
    assert m["cascade.R@1"] <= m["grdr.hit_rate"]  # the cascade cannot find what recall missed
    report = json.loads(json_out.read_text())
    assert report["metrics"]["grdr.hit_rate"] == pytest.approx(m["grdr.hit_rate"])
    assert report["settings"]["split"] == "test" and report["settings"]["beams"] == 5
    assert (tmp_path / "grdr_eval_candidates.png").stat().st_size > 0


def test_eval_with_every_id_recalled_equals_full_corpus(runs):
    """Beams ≥ distinct IDs: every query's candidates are the whole gallery, so recall is perfect
    and reranking the candidates IS full-corpus reranking."""
    m = run_grdr_eval(runs["grdr"], runs["data"], split="test", beams=10_000, device="cpu", progress=False, echo=False)
    assert m["grdr.candidates.min"] == m["grdr.candidates.max"] == m["num_videos"]
    assert m["grdr.hit_rate"] == 100.0 and m["dense.hit_rate_same_size"] == 100.0
    for k in (1, 5, 10):
        assert m[f"cascade.R@{k}"] == m[f"full.R@{k}"]
    assert (runs["grdr"] / "grdr_candidates_test.png").is_file()  # no JSON asked: histogram in the run


def test_diagnostics_plot(runs, tmp_path):
    out = tmp_path / "diag.png"
    plot_grdr_diagnostics(runs["grdr"], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="not a finished GRDR run"):
        plot_grdr_diagnostics(runs["dense"], tmp_path / "x.png")


def test_search_index_with_grdr_recall(runs, tmp_path):
    from vidseek.search.indexer import Indexer, build_index
    from vidseek.search.searcher import Searcher

    index = tmp_path / "index"
    summary = build_index(runs["data"] / "annotations.jsonl", index, recall=f"grdr:{runs['grdr']}", split="test",
                          workers=0, progress=False)
    meta = json.loads((index / "index.json").read_text())["recall"]
    assert meta["backend"] == "grdr" and meta["bytes_per_video"] == 12 and meta["beams"] == 20
    with Searcher(index) as searcher:
        indexed = {e.id: e.video_id for e in searcher.entries.get_many(list(range(1, summary.total_keys + 1))).values()}
        assert len(indexed) == summary.total_keys == summary.added > 0
        recalled = searcher.recall.recall(["a red circle moves left", "a blue square grows"], 1000)
        for pairs in recalled:
            assert pairs and {i for i, _ in pairs} <= set(indexed)
            assert len({i for i, _ in pairs}) == len(pairs)  # de-duplicated
            scores = [s for _, s in pairs]
            assert scores == sorted(scores, reverse=True) and all(np.isfinite(scores))  # beam order
        searcher.recall.beams = 10_000  # every ID: every indexed entry comes back
        assert {i for i, _ in searcher.recall.recall(["a red circle"], 1000)[0]} == set(indexed)
        assert len(searcher.recall.recall(["a red circle"], 3)[0]) == 3
        hits = searcher.search("a red circle moves left", k=3)
        assert 0 < len(hits) <= 3 and all(h.video_id in indexed.values() for h in hits)
    gone = sorted(indexed.values())[0]
    with Indexer(index, progress=False) as indexer:
        assert indexer.remove([gone]) == 1
    with Searcher(index) as searcher:
        searcher.recall.beams = 10_000
        assert gone not in {e.video_id for e in searcher.entries.get_many(
            [i for i, _ in searcher.recall.recall(["a red circle"], 1000)[0]]).values()}
