"""Training core: optimiser groups, schedule, gradient caching, batching, exact resume, errors."""
from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from vidseek.errors import CheckpointError, ConfigError
from vidseek.models.registry import get_preset
from vidseek.train.data import EpochBatches, RawFrames
from vidseek.train.distributed import DistInfo
from vidseek.train.loop import train, train_step
from vidseek.train.optim import build_optimizer, warmup_cosine


def tiny_preset(name="synth-clip-tiny", **train_overrides):
    preset = get_preset(name)
    base = dict(batch_size=8, max_steps=6, eval_every=3, epochs=50, warmup_fraction=0.2)
    base.update(train_overrides)
    return preset.with_overrides(**base)


def test_warmup_cosine_values():
    f = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [f(0), f(1)] == [0.5, 1.0]
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.0)


def test_param_groups_split_clip_and_new_and_decay():
    from vidseek.models.registry import create_model

    model = create_model(get_preset("synth-seqtransf-tiny"))
    opt = build_optimizer(model, lr=1e-4, clip_lr_coef=1e-3, weight_decay=0.2)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["clip-decay"]["lr"] == pytest.approx(1e-7)
    assert groups["new-decay"]["lr"] == pytest.approx(1e-4)
    assert groups["new-no_decay"]["weight_decay"] == 0.0
    named = {id(p): n for n, p in model.named_parameters()}
    assert "logit_scale.log_scale" in {named[id(p)] for p in groups["new-no_decay"]["params"]}
    assert all(p.ndim < 2 for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"])
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_gradient_caching_equals_full_batch_gradients():
    from vidseek.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(get_preset("synth-seqtransf-tiny"))
    tokens = model.clip.tokenize(["a red circle", "a blue square grows", "green star", "x then y", "z", "w"], context_length=32)
    frames = RawFrames(torch.randn(6, 4, 3, 48, 48), torch.tensor([[1, 1, 1, 0]] * 3 + [[1, 1, 1, 1]] * 3, dtype=torch.bool))
    full = train_step(model, tokens, frames, None, DistInfo())
    g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    cached = train_step(model, tokens, frames, 4, DistInfo())  # uneven chunks: 4 + 2
    g_cached = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert float(full.loss.detach()) == pytest.approx(float(cached.loss.detach()), abs=1e-6)
    assert g_full.keys() == g_cached.keys() and len(g_full) > 50
    for name in g_full:
        torch.testing.assert_close(g_cached[name], g_full[name], rtol=1e-4, atol=1e-6, msg=name)


def test_epoch_batches_deterministic_and_groups_together():
    groups = ["g0", "g0", "g1", "g1", "g2", "g3", "g3", "g4"]
    from vidseek.data.hard_negatives import group_partners

    batches = EpochBatches(list(range(8)), batch_size=4, seed=7, partners=group_partners(groups))
    first = batches.for_epoch(0)
    assert first == batches.for_epoch(0)
    assert first != batches.for_epoch(1) or first != batches.for_epoch(2)
    assert [len(b) for b in first] == [4, 4]
    flat = [i for b in first for i in b]
    assert sorted(flat) == list(range(8))
    # members of a group are adjacent in the epoch order (so they share a batch unless cut at a boundary)
    position = {i: k for k, i in enumerate(flat)}
    for a, b in [(0, 1), (2, 3), (5, 6)]:
        assert abs(position[a] - position[b]) == 1
    assert batches.caption_choice(3, 5, 7) == batches.caption_choice(3, 5, 7) < 7


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


# frames mode, features mode, features with patch tokens + twin batches + partner loss
@pytest.mark.parametrize("name", ["synth-clip-tiny", "synth-seqtransf-tiny", "synth-seqtransf-grid-tiny"])
def test_resume_continues_exactly(tiny_synth, tmp_path, name):
    preset = tiny_preset(name)
    straight = train(preset, tiny_synth, tmp_path / "straight", progress=False)
    assert straight.step == 6
    part = train(preset, tiny_synth, tmp_path / "resumed", progress=False, stop_after_steps=4)
    assert part.step == 4
    resumed = train(preset, tiny_synth, tmp_path / "resumed", progress=False, resume=True)
    assert resumed.step == 6
    a, b = _weights(tmp_path / "straight" / "last.pt"), _weights(tmp_path / "resumed" / "last.pt")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert straight.final_val == resumed.final_val
    lines = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "val.t2v.R@1" in x] == [3, 6]
    assert straight.best == resumed.best
    assert straight.best["metric"] == preset.train.select_metric


def test_existing_run_needs_resume_flag(tiny_synth, tmp_path):
    preset = tiny_preset(max_steps=1, eval_every=1)
    train(preset, tiny_synth, tmp_path / "run", progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(preset, tiny_synth, tmp_path / "run", progress=False)


def test_checkpoint_of_another_model_is_rejected(tiny_synth, tmp_path):
    from vidseek.train.checkpoint import load_model

    train(tiny_preset(max_steps=1, eval_every=1), tiny_synth, tmp_path / "run", progress=False)
    model, payload = load_model(tmp_path / "run")
    assert payload["preset"]["name"] == "synth-clip-tiny" and payload["step"] == 1
    with pytest.raises(CheckpointError, match="holds a twotower model"):
        load_model(tmp_path / "run", expect_model="tcmgc")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_model(garbage)


def test_unknown_preset_is_a_config_error():
    with pytest.raises(ConfigError, match="vidseek presets"):
        get_preset("no-such-preset")
    with pytest.raises(ConfigError, match="unknown training option"):
        get_preset("synth-meanp-tiny").with_overrides(bogus=1)


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--preset", "nope", "--data", "."], "unknown preset 'nope'"),
        (["train", "--preset", "synth-meanp-tiny", "--data", "/does/not/exist"], "data folder /does/not/exist does not exist"),
        (["eval", "/does/not/exist.pt", "--data", "."], "checkpoint /does/not/exist.pt not found"),
    ],
)
def test_cli_user_errors_are_one_line_with_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "vidseek.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]


def test_every_preset_builds_and_computes_a_loss():
    """timm-style smoke test: each registered preset's model, on a tiny CLIP for speed."""
    from vidseek.models.registry import create_model, list_presets

    seen = set()
    for preset in list_presets():
        if preset.model == "grdr":  # generative recall: its own trainer, smoke-tested in test_grdr_run
            continue
        small = dataclasses.replace(preset, clip="tiny", frames=4)
        if small.model == "pig" and small.model_config.get("generator", True):
            # tiny's text width (96) is not its joint width (64); the release's unprojected
            # pseudo-query needs them equal (tests/test_faithfulness.py covers it on equal widths)
            small = dataclasses.replace(small, model_config={**small.model_config, "pseudo_query_projection": True})
        key = (small.model, json.dumps(small.model_config, sort_keys=True))
        if key in seen:
            continue
        seen.add(key)
        torch.manual_seed(0)
        model = create_model(small)
        tokens = model.clip.tokenize(["a red circle moves left", "a blue square"], context_length=small.words)
        frames = RawFrames(torch.randn(2, 4, 3, 48, 48), torch.ones(2, 4, dtype=torch.bool))
        out = train_step(model, tokens, frames, None, DistInfo())
        assert torch.isfinite(out.loss.detach()), preset.name
    assert len(seen) >= 2


def test_selection_value_sums_parts_and_skips_absent_hard_negative_accuracies():
    from vidseek.train.loop import selection_value

    metrics = {"val.t2v.R@1": 30.0, "val.hardneg.order.acc": 80.0, "val.hardneg.attribute.acc": 90.0}
    assert selection_value(metrics, "val.t2v.R@1") == 30.0
    assert selection_value(metrics, "val.t2v.R@1+val.hardneg.order.acc+val.hardneg.attribute.acc") == 200.0
    # Data without partner metadata reports no hard-negative accuracies: those parts drop out.
    assert selection_value({"val.t2v.R@1": 30.0}, "val.t2v.R@1+val.hardneg.order.acc") == 30.0
    assert selection_value({}, "val.t2v.R@1") is None  # non-main ranks validate nothing
    with pytest.raises(ConfigError, match="val.t2v.R@2"):
        selection_value(metrics, "val.t2v.R@2+val.hardneg.order.acc")
