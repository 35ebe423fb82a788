"""TC-MGC (paper 004): SR / Bi-SR / ISA / Bi-ISA / LSA against loops and formulas, identity
initialisation, masks, gradients, the exact fast scorer against the direct computation, blocked
scoring, and every ablation switch. Tiny sizes: D = 16, W = 8, T = 5."""
from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from vidseek.errors import ConfigError
from vidseek.models.base import FrameFeatures, TextFeatures
from vidseek.models.losses import symmetric_infonce
from vidseek.models.tcmgc import (
    TCMGC,
    TCMGCConfig,
    aggregate_granularities,
    bidirectional_isa,
    bidirectional_similarity_reorganization,
    interactive_similarity_aggregation,
    masked_softmax,
    register_presets,
    similarity_reorganization,
)

D, W, T = 16, 8, 5
KEEP = 0.3  # k = int(8 · 0.3) = 2 (and int(5 · 0.3) = 1 on a T-long frame axis)


class FakeClip(nn.Module):
    """Stands in for ClipBackbone: TC-MGC only reads `embed_dim` (features are passed in)."""

    embed_dim = D


def tiny_config(**overrides) -> TCMGCConfig:
    base = dict(max_words=W, max_frames=T, video_word_keep=KEEP, sentence_frame_keep=KEEP, frame_word_keep=KEEP,
                temporal_layers=1, temporal_heads=2)
    base.update(overrides)
    return TCMGCConfig(**base)


def perturb(model: nn.Module, seed: int = 0, scale: float = 0.2) -> nn.Module:
    """Move every parameter off its initial value (LayerNorm affines, FC, A, L, W_g, W_l...)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def make_model(dtype=torch.float64, seed: int = 0, **overrides) -> TCMGC:
    torch.manual_seed(seed)
    return perturb(TCMGC(FakeClip(), tiny_config(**overrides)).to(dtype), seed).eval()


def copy_shared(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Load every parameter of `src` whose name and shape exist in `dst`."""
    own = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape},
                        strict=False)
    return dst


def make_text(n: int, dtype=torch.float64, seed: int = 1, lengths: list[int] | None = None) -> TextFeatures:
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [W] * n
    mask = torch.arange(W)[None, :] < torch.tensor(lengths)[:, None]
    return TextFeatures(sentence=torch.randn(n, D, generator=gen, dtype=dtype),
                        words=torch.randn(n, W, D, generator=gen, dtype=dtype), mask=mask)


def make_frames(n: int, dtype=torch.float64, seed: int = 2, lengths: list[int] | None = None, t: int = T
                ) -> FrameFeatures:
    gen = torch.Generator().manual_seed(seed)
    lengths = lengths or [t] * n
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    return FrameFeatures(frames=torch.randn(n, t, D, generator=gen, dtype=dtype), mask=mask)


# --- plain-tensor pieces against loops and formulas ---------------------------------------------

def loop_sr(values: list[float], keep: int, mode: str) -> list[float]:
    ordered = sorted(values, reverse=True)
    if mode == "remove":
        return ordered[:keep]
    rest = ordered[keep:]
    weights = [math.exp(r) for r in rest]
    return ordered[:keep] + [sum(w * r for w, r in zip(weights, rest)) / sum(weights)]


@pytest.mark.parametrize("mode", ["remove", "fuse"])
def test_sr_equals_python_loop(mode):
    s = torch.randn(3, 4, 9, dtype=torch.float64)
    out, valid = similarity_reorganization(s, 3, mode)
    assert valid is None and out.shape == (3, 4, 3 if mode == "remove" else 4)
    for idx in itertools.product(range(3), range(4)):
        assert out[idx].tolist() == pytest.approx(loop_sr(s[idx].tolist(), 3, mode), abs=1e-12)


def test_sr_none_keeps_order():
    s = torch.randn(2, 6)
    assert torch.equal(similarity_reorganization(s, 1, "none")[0], s)


@pytest.mark.parametrize("word_mode,frame_mode", [("remove", "remove"), ("remove", "fuse"),
                                                  ("fuse", "remove"), ("fuse", "fuse"), ("none", "remove")])
def test_bi_sr_equals_python_loop(word_mode, frame_mode):
    s = torch.randn(2, 7, 6, dtype=torch.float64)  # [.., words, frames]
    out, _ = bidirectional_similarity_reorganization(s, 2, 3, word_mode, frame_mode)
    for b in range(2):
        m = s[b].tolist()
        columns = [loop_sr([m[i][j] for i in range(7)], 2, word_mode) if word_mode != "none"
                   else [m[i][j] for i in range(7)] for j in range(6)]  # per frame column, along words
        rows = [[columns[j][i] for j in range(6)] for i in range(len(columns[0]))]
        expected = [loop_sr(r, 3, frame_mode) for r in rows]
        assert out[b].flatten().tolist() == pytest.approx([x for row in expected for x in row], abs=1e-12)


def test_isa_equals_formula():
    s = torch.tensor([0.30, 0.10, 0.25, -0.05], dtype=torch.float64)
    a = torch.tensor([[1.0, 0.2, 0.0, -0.3], [0.1, 0.9, 0.4, 0.0],
                      [0.0, -0.2, 1.1, 0.3], [0.5, 0.0, 0.1, 0.8]], dtype=torch.float64)
    lam = 7.0
    p = [math.exp(lam * x) for x in s.tolist()]
    p = [x / sum(p) for x in p]
    mixed = [sum(p[i] * a[i, j].item() for i in range(4)) for j in range(4)]
    w = [math.exp(lam * x) for x in mixed]
    w = [x / sum(w) for x in w]
    expected = sum(wi * si for wi, si in zip(w, s.tolist()))
    score, _ = interactive_similarity_aggregation(s, a, lam)
    assert score.item() == pytest.approx(expected, abs=1e-12)


def test_isa_identity_and_huge_lambda_picks_max():
    s = torch.tensor([0.1, 0.7, 0.3])
    assert interactive_similarity_aggregation(s, torch.eye(3), 1e4)[0].item() == pytest.approx(0.7)


def test_bi_isa_averages_both_orders():
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, generator=gen, dtype=torch.float64)  # [words, frames]
    mats = {k: torch.eye(n, dtype=torch.float64) + 0.3 * torch.randn(n, n, generator=gen, dtype=torch.float64)
            for k, n in (("words_first", 3), ("frames_second", 4), ("frames_first", 4), ("words_second", 3))}
    lam = 5.0

    def isa(v, a):
        return interactive_similarity_aggregation(v, a, lam)[0]

    per_frame = torch.stack([isa(s[:, j], mats["words_first"]) for j in range(4)])
    per_word = torch.stack([isa(s[i, :], mats["frames_first"]) for i in range(3)])
    expected = 0.5 * (isa(per_frame, mats["frames_second"]) + isa(per_word, mats["words_second"]))
    assert bidirectional_isa(s, mats, lam).item() == pytest.approx(expected.item(), abs=1e-12)


def test_aggregations_equal_hand_formulas():
    scores = torch.tensor([[1.0, 2.0], [3.0, 0.5], [0.0, 1.0]], dtype=torch.float64)  # [G=3, 2 pairs]
    lsa = torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.2], [0.3, 0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(aggregate_granularities(scores, "avg"), scores.mean(0))
    for col in range(2):
        s = scores[:, col]
        soft = (s.softmax(0) * s).sum()
        logits = torch.stack([sum(s[g] * lsa[g, h] for g in range(3)) for h in range(3)])
        lin = (logits.softmax(0) * s).sum()
        assert aggregate_granularities(scores, "softmax")[col].item() == pytest.approx(soft.item(), abs=1e-12)
        assert aggregate_granularities(scores, "lsa", lsa)[col].item() == pytest.approx(lin.item(), abs=1e-12)
    # identity L: LSA starts as the softmax aggregation
    assert torch.allclose(aggregate_granularities(scores, "lsa", torch.eye(3, dtype=torch.float64)),
                          aggregate_granularities(scores, "softmax"))


def test_masked_entries_get_zero_weight():
    s = torch.tensor([[0.5, 0.2, 9.0, 0.1]])
    valid = torch.tensor([[True, True, False, True]])
    w = masked_softmax(s, valid)
    assert w[0, 2].item() == 0.0 and w.sum().item() == pytest.approx(1.0)
    assert masked_softmax(s, torch.zeros_like(valid)).abs().sum().item() == 0.0  # all padding → no weight
    # ISA over a masked vector = ISA over its valid entries with A restricted to them
    a = torch.eye(4) + 0.2 * torch.arange(16.0).view(4, 4) / 16
    keep = [0, 1, 3]
    masked, _ = interactive_similarity_aggregation(s, a, 10.0, valid)
    direct, _ = interactive_similarity_aggregation(s[:, keep], a[keep][:, keep], 10.0)
    assert masked.item() == pytest.approx(direct.item(), abs=1e-6)
    # SR never selects a padded entry, even the largest one
    top, top_valid = similarity_reorganization(s, 2, "fuse", valid)
    assert top.tolist()[0][:2] == pytest.approx([0.5, 0.2]) and top_valid.all()
    exp = torch.tensor([0.1]).exp().item()
    assert top[0, 2].item() == pytest.approx(0.1 * exp / exp)


# --- model: shapes, initialisation --------------------------------------------------------------

def test_shapes_and_padding():
    model = TCMGC(FakeClip(), tiny_config()).double().eval()
    video = model.encode_video_features(make_frames(4, t=3))
    assert video.frames.shape == (4, T, D) and video.mask.tolist() == [[True] * 3 + [False] * 2] * 4
    scores = model.score(make_text(3), video)
    assert scores.shape == (3, 4) and torch.isfinite(scores).all()
    final, parts = model.pairwise(make_text(3), video)
    assert final.shape == (3, 4) and parts.shape == (4, 3, 4)
    cache = model.precompute_video(video)
    assert cache.keys.shape == (4, T, D) and cache.design.shape == (4, T + 1, D)
    assert cache.design_gram.shape == (4, 2, T + 1, T + 1)
    with pytest.raises(ConfigError, match="max_frames"):
        model.encode_video_features(make_frames(1, t=T + 1))
    with pytest.raises(ConfigError, match="max_words is 8"):
        model.score(TextFeatures(torch.randn(1, D), torch.randn(1, W + 1, D), torch.ones(1, W + 1, dtype=torch.bool)),
                    video)


def test_identity_initialisation():
    model = TCMGC(FakeClip(), tiny_config())
    eye = torch.eye(D)
    assert torch.equal(model.global_projection, eye) and torch.equal(model.local_projection, eye)
    assert torch.equal(model.lva.fc.weight, eye) and torch.equal(model.lva.fc.bias, torch.zeros(D))
    # SR sizes: remove → k = 2, fuse → k + 1 = 3 (W = 8, r = 0.3)
    assert {k: v.shape[0] for k, v in model.isa.items()} == {
        "video_word": 2, "sentence_frame": 3, "frame_word_words_first": 2, "frame_word_frames_second": 2,
        "frame_word_frames_first": 2, "frame_word_words_second": 2}
    for a in model.isa.values():
        assert torch.equal(a, torch.eye(a.shape[0]))
    assert torch.equal(model.lsa, torch.eye(4))
    assert model.logit_scale().item() == pytest.approx(1 / 0.07)  # random init; the checkpoint's with weights


@pytest.mark.parametrize("overrides,params", [
    ({}, {"video_word": 9, "sentence_frame": 16, "frame_word": 36}),  # paper defaults at W = 32, r = 0.1
    ({"video_word_sr": "none", "sentence_frame_sr": "none", "frame_word_word_sr": "none",
      "frame_word_frame_sr": "none"}, {"video_word": 1024, "sentence_frame": 1024, "frame_word": 4096}),  # baselines
    ({"video_word_sr": "fuse", "frame_word_frame_sr": "fuse"}, {"video_word": 16, "frame_word": 50}),
    ({"frame_word_word_sr": "fuse", "frame_word_frame_sr": "fuse"}, {"frame_word": 64}),
    ({"frame_word_frame_sr": "none"}, {"frame_word": 2066}),  # Table 7a, word direction only
    ({"video_word_keep": 0.2}, {"video_word": 36}),
])
def test_isa_parameter_counts_match_paper_tables(overrides, params):
    """Tables 5–8 'Params(K)' columns: 0.009 / 0.016 / 0.036 / 0.050 / 0.064 / 1.024 / 2.066 / 4.096."""
    model = TCMGC(FakeClip(), TCMGCConfig(**overrides))
    counts = {"video_word": model.isa["video_word"].numel(), "sentence_frame": model.isa["sentence_frame"].numel(),
              "frame_word": sum(v.numel() for k, v in model.isa.items() if k.startswith("frame_word"))}
    assert {k: counts[k] for k in params} == params


def test_config_validation():
    with pytest.raises(ConfigError, match="at least one granularity"):
        TCMGCConfig(video_sentence=False, video_word=False, sentence_frame=False, frame_word=False)
    with pytest.raises(ConfigError, match="'remove', 'fuse' or 'none'"):
        TCMGCConfig(video_word_sr="drop")
    with pytest.raises(ConfigError, match="leaves something to fuse"):
        TCMGCConfig(sentence_frame_keep=1.0)
    with pytest.raises(ConfigError, match="must divide"):
        TCMGC(FakeClip(), tiny_config(attention_heads=3))
    paper = TCMGCConfig.paper("DiDeMo")
    assert (paper.max_frames, paper.max_words, paper.attention_heads, paper.isa_lambda, paper.frame_word_keep,
            paper.sdr_weight) == (64, 64, 1, 100.0, 0.1, 0.5)
    assert (TCMGCConfig.paper("msrvtt").max_frames, TCMGCConfig.paper("vatex").max_words) == (12, 32)


def test_register_presets():
    added = {}
    register_presets(register=lambda p: added.setdefault(p.name, p), Preset=_PresetStub,
                     synth_train=lambda **kw: "synth", paper_train=lambda **kw: kw,
                     datasets=[("msrvtt9k", "msrvtt", {}, 12, 32, 5, "MSR-VTT"),
                               ("didemo", "didemo", {}, 64, 64, 5, "D"), ("msvd", "msvd", {}, 12, 32, 5, "MSVD")])
    assert sorted(added) == ["didemo-tcmgc-b16", "didemo-tcmgc-b32", "msrvtt9k-tcmgc-b16", "msrvtt9k-tcmgc-b32",
                             "synth-tcmgc-tiny"]
    assert added["didemo-tcmgc-b32"].train == {"epochs": 20, "batch_size": 64}
    assert TCMGCConfig(**added["msrvtt9k-tcmgc-b32"].model_config) == TCMGCConfig.paper("msrvtt9k")
    tiny = added["synth-tcmgc-tiny"]
    assert (tiny.frames, tiny.words, TCMGCConfig(**tiny.model_config).max_frames) == (8, 32, 8)


@dataclasses.dataclass
class _PresetStub:
    name: str
    description: str
    model: str
    clip: str
    frames: int
    words: int
    model_config: dict
    data_format: str | None = None
    data_options: dict = dataclasses.field(default_factory=dict)
    train: object = None
    reference: str = ""


# --- the exact fast path ------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"attention_heads": 2}, {"frame_mask": True, "text_mask": True},
                                       {"residual_fc": False}, {"sentence_frame_sr": "none", "aggregation": "avg"}])
def test_fast_equals_direct_float64(overrides):
    model = make_model(**overrides)
    text = make_text(3, lengths=[8, 5, 3])
    video = model.encode_video_features(make_frames(4, lengths=[5, 4, 2, 5]))
    fast = model.score_blocked(text, video, 1 << 20, exact_fast=True)
    direct = model.score_blocked(text, video, 1 << 20, exact_fast=False)
    assert (fast - direct).abs().max().item() < 1e-10
    _, parts_fast = model.pairwise(text, video, exact_fast=True)
    _, parts_direct = model.pairwise(text, video, exact_fast=False)
    assert (parts_fast - parts_direct).abs().max().item() < 1e-8  # logit-scaled (×~100)


def test_fast_equals_direct_float32_and_precomputed_cache():
    model = make_model(dtype=torch.float32)
    text, video = make_text(3, torch.float32), model.encode_video_features(make_frames(6, torch.float32))
    direct = model.score_blocked(text, video, 1 << 20, exact_fast=False)
    cache = model.precompute_video(video)
    assert (model.score_blocked(text, cache, 1 << 20) - direct).abs().max().item() < 1e-5
    assert (model.rerank(text, make_frames(6, torch.float32)) - direct).abs().max().item() < 1e-5


def test_fast_probe_dots_equal_direct_lva_outputs():
    model = make_model(attention_heads=2)
    text, video = make_text(2), model.encode_video_features(make_frames(3))
    side = model._text_side(text)
    fast = model._probe_scores(side, model.precompute_video(video), True, None)
    direct = model._probe_scores(side, video, False, None)
    for a, b in zip(fast, direct):
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-12


@pytest.mark.parametrize("budget", [1, 3000, 20000, 10 ** 9])
def test_blocked_equals_unblocked(budget):
    model = make_model()
    text, video = make_text(5), model.encode_video_features(make_frames(7))
    full = model.score_blocked(text, video, 10 ** 12)
    for fast in (True, False):
        assert (model.score_blocked(text, video, budget, exact_fast=fast) - full).abs().max().item() < 1e-12


def test_block_plan_respects_budget():
    model = make_model()
    per_pair = model._pair_elements(T, True)
    assert model.plan_blocks(50, 40, T, 1, True) == (1, 1)
    # at least MIN_BLOCK_TEXTS (16) texts per block, then as many videos as fit, then more texts
    assert model.MIN_BLOCK_TEXTS == 16
    texts, videos = model.plan_blocks(50, 40, T, per_pair * 100, True)
    assert (texts, videos) == (16, 6) and texts * videos * per_pair <= per_pair * 100
    assert model.plan_blocks(50, 40, T, per_pair * 30, True) == (30, 1)
    assert model.plan_blocks(50, 40, T, per_pair * 5, True) == (5, 1)  # fewer pairs than 8: one video
    assert model.plan_blocks(3, 40, T, per_pair * 100, True) == (3, 33)  # only 3 texts: wide video side
    assert model.plan_blocks(50, 40, T, per_pair * 10 ** 6, True) == (50, 40)
    assert model._pair_elements(T, False) > model._pair_elements(T, True)  # the direct path is D-sized


# --- masks --------------------------------------------------------------------------------------

def _with_garbage_words(text: TextFeatures) -> TextFeatures:
    words = text.words.clone()
    words[~text.mask] = 50 * torch.randn(int((~text.mask).sum()), D, dtype=words.dtype)
    return TextFeatures(text.sentence, words, text.mask)


@pytest.mark.parametrize("conditioned", [True, False])
def test_text_mask_ignores_padding_words(conditioned):
    text = make_text(3, lengths=[8, 5, 3])
    garbage = _with_garbage_words(text)
    for text_mask in (True, False):
        model = make_model(text_mask=text_mask, text_conditioned=conditioned)
        video = model.encode_video_features(make_frames(4))
        changed = (model.score(text, video) - model.score(garbage, video)).abs()
        if text_mask:
            assert changed.max().item() < 1e-12
        else:  # faithful: padding positions take part
            assert changed[1:].max().item() > 1e-6 and changed[0].max().item() < 1e-12


@pytest.mark.parametrize("conditioned", [True, False])
def test_frame_mask_ignores_padded_frames(conditioned):
    clean = make_frames(3, lengths=[5, 3, 2])
    dirty = FrameFeatures(clean.frames.clone(), clean.mask)
    dirty.frames[~clean.mask] = 30 * torch.randn(int((~clean.mask).sum()), D, dtype=torch.float64)
    zero_padded = FrameFeatures(clean.frames * clean.mask[..., None], clean.mask)
    text = make_text(2)
    for frame_mask in (True, False):
        model = make_model(frame_mask=frame_mask, text_conditioned=conditioned)
        changed = (model.score(text, model.encode_video_features(dirty))
                   - model.score(text, model.encode_video_features(zero_padded))).abs()
        if frame_mask:
            assert changed.max().item() < 1e-12
        else:
            assert changed[:, 1:].max().item() > 1e-6 and changed[:, 0].max().item() < 1e-12


def test_frame_mask_equals_truncated_video():
    """With frame_mask, a video padded to T scores like one that only has its real frames
    (no temporal encoder: its positions would otherwise see different padding)."""
    model = make_model(frame_mask=True, temporal_encoder=False)
    full = make_frames(1, lengths=[3])
    short = FrameFeatures(full.frames[:, :3], full.mask[:, :3])
    text = make_text(2)
    lva_full = F.normalize(model.lva(model._text_side(text).queries, model.encode_video_features(full).frames,
                                     model.encode_video_features(full).mask), dim=-1)
    lva_short = F.normalize(model.lva(model._text_side(text).queries, short.frames), dim=-1)
    assert (lva_full - lva_short).abs().max().item() < 1e-12


# --- training -----------------------------------------------------------------------------------

def test_gradients_reach_every_parameter():
    model = make_model(dtype=torch.float32).train()
    text = make_text(4, torch.float32, lengths=[8, 6, 4, 8])
    out = model.loss(text, model.encode_video_features(make_frames(4, torch.float32)))
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert set(out.terms) == {"infonce", "sdr", "logit_scale", "loss"}


def test_loss_terms_equal_formulas():
    model = make_model()
    text, video = make_text(4), model.encode_video_features(make_frames(4))
    out = model.loss(text, video)
    final, parts = model.pairwise(text, video)
    infonce = symmetric_infonce(final)
    diag = torch.stack([parts[:, i, i] for i in range(4)], dim=1)  # [G, B]
    mean = diag.mean(0)
    sdr = (((diag - mean) ** 2).sum(0) / 3).mean()  # unbiased variance over the 4 scores
    assert out.terms["infonce"] == pytest.approx(infonce.item())
    assert out.terms["sdr"] == pytest.approx(sdr.item())
    assert out.loss.item() == pytest.approx(infonce.item() + 0.5 * sdr.item())
    assert "sdr" not in make_model(sdr=False).loss(text, video).terms
    # score = final / logit scale (LSA weights see the logit-scaled scores, as released)
    assert torch.allclose(model.score(text, video) * model.logit_scale(), final)


def test_training_mode_dropout_uses_direct_path():
    model = make_model().train()
    text, video = make_text(2), model.encode_video_features(make_frames(3))
    torch.manual_seed(5)
    a = model.score(text, video)
    torch.manual_seed(6)
    b = model.score(text, video)
    assert (a - b).abs().max().item() > 1e-6  # dropout on the residual FC is live
    model.eval()
    assert torch.equal(model.score(text, video), model.score(text, video))


# --- ablations ----------------------------------------------------------------------------------

ABLATIONS = [
    {"video_sentence": False}, {"video_word": False}, {"sentence_frame": False}, {"frame_word": False},
    {"text_conditioned": False}, {"text_conditioned": False, "unconditioned_frames": "temporal"},
    {"video_word_sr": "fuse"}, {"video_word_sr": "none"}, {"video_word_keep": 0.5},
    {"sentence_frame_sr": "remove"}, {"sentence_frame_keep": 0.5},
    {"frame_word_word_sr": "fuse"}, {"frame_word_frame_sr": "none"}, {"frame_word_keep": 0.5},
    {"aggregation": "softmax"}, {"aggregation": "avg"}, {"temporal_encoder": False}, {"residual_fc": False},
    {"attention_heads": 2}, {"isa_lambda": 10.0}, {"text_mask": True}, {"frame_mask": True},
]


@pytest.mark.parametrize("overrides", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_each_ablation_changes_the_score(overrides):
    # Soft temperatures: at the released λ = 100 and logit scale 100, ISA is nearly a max and LSA
    # nearly picks one granularity, so most switches move the score by less than e^-100·Δ.
    soft = {"logit_scale_init": 1.0, "isa_lambda": 2.0}
    base = make_model(**soft)
    variant = copy_shared(base, TCMGC(FakeClip(), tiny_config(**{**soft, **overrides})).double().eval())
    text = make_text(3, lengths=[8, 5, 3])
    frames = make_frames(4, lengths=[5, 4, 2, 5])
    s_base = base.score(text, base.encode_video_features(frames))
    s_variant = variant.score(text, variant.encode_video_features(frames))
    assert (s_base - s_variant).abs().max().item() > 1e-6


def test_sdr_switch_changes_the_loss_only():
    base, no_sdr = make_model(), make_model(sdr=False)
    text, frames = make_text(3), make_frames(3)
    assert torch.equal(base.score(text, base.encode_video_features(frames)),
                       no_sdr.score(text, no_sdr.encode_video_features(frames)))
    assert base.loss(text, base.encode_video_features(frames)).loss.item() != pytest.approx(
        no_sdr.loss(text, no_sdr.encode_video_features(frames)).loss.item())


def test_all_granularities_avg_is_the_mean_of_the_four():
    full = make_model(aggregation="avg")
    text, frames = make_text(3), make_frames(4)
    singles = []
    for g in ("video_sentence", "video_word", "sentence_frame", "frame_word"):
        only = {k: k == g for k in ("video_sentence", "video_word", "sentence_frame", "frame_word")}
        single = copy_shared(full, TCMGC(FakeClip(), tiny_config(aggregation="avg", **only)).double().eval())
        singles.append(single.score(text, single.encode_video_features(frames)))
    expected = torch.stack(singles).mean(0)
    assert (full.score(text, full.encode_video_features(frames)) - expected).abs().max().item() < 1e-12


@pytest.mark.parametrize("k", [1, 2, 3, 6, 7])
@pytest.mark.parametrize("dim", [-1, -2])
def test_top_values_equals_topk_with_ties(k, dim):
    from vidseek.models.tcmgc import top_values

    x = torch.randint(-3, 4, (3, 9, 8)).double()  # many exact ties
    x[0, 0, :3] = float("-inf")  # masked entries sort last
    assert torch.equal(top_values(x, k, dim), x.topk(k, dim=dim).values)


def test_fast_path_gradients_equal_direct_gradients():
    """The fast algebra is plain differentiable torch: with dropout off, training through it
    gives the direct path's gradients."""
    model = make_model(dropout=0.0).train()
    text, frames = make_text(3, lengths=[8, 6, 4]), make_frames(3)
    grads = []
    for fast in (True, False):
        model.zero_grad()
        final, parts = model.pairwise(text, model.encode_video_features(frames), exact_fast=fast)
        (symmetric_infonce(final) + parts.var(0).mean()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-9, rtol=1e-7), name


# --- speed-path pieces against the plain torch ops they replace ---------------------------------

def test_short_softmax_equals_softmax_in_any_layout():
    from vidseek.models.tcmgc import short_softmax

    gen = torch.Generator().manual_seed(4)
    x = 50 * torch.randn(5, 6, 3, 4, generator=gen, dtype=torch.float64)
    for dim in range(4):
        assert torch.allclose(short_softmax(x, dim), x.softmax(dim), rtol=0, atol=1e-15)
        permuted = x.movedim(dim, 0).contiguous().movedim(0, dim)  # `dim` outermost in memory
        assert torch.allclose(short_softmax(permuted, dim), x.softmax(dim), rtol=0, atol=1e-15)
    long = torch.randn(2, 20, generator=gen, dtype=torch.float64)  # above the cut-off: torch's own
    assert torch.equal(short_softmax(long), long.softmax(-1))


def test_fuse_without_sort_equals_sorted_fusion_with_ties():
    """SR "fuse" (no masks) takes no sort; ties across the top-k / rest split count exactly."""
    gen = torch.Generator().manual_seed(5)
    s = torch.randint(-3, 4, (40, 9), generator=gen).double() / 4  # many ties
    s[0] = 0.5  # all equal
    for keep in (1, 3, 5):
        out, valid = similarity_reorganization(s, keep, "fuse")
        assert valid is None
        for row, got in zip(s.tolist(), out.tolist()):
            assert got == pytest.approx(loop_sr(row, keep, "fuse"), abs=1e-12)


def test_top_values_in_any_memory_layout():
    from vidseek.models.tcmgc import top_values

    x = torch.randint(-3, 4, (5, 7, 9)).double()
    for dim in range(3):
        for layout in (x, x.movedim(dim, 0).contiguous().movedim(0, dim), x.transpose(0, 2).contiguous().transpose(0, 2)):
            assert torch.equal(top_values(layout, 3, dim), x.topk(3, dim=dim).values)


def test_small_batched_matmul_writes_probe_major():
    from vidseek.models.tcmgc_fast import small_batched_matmul

    gen = torch.Generator().manual_seed(6)
    left = torch.randn(3, 4, 6, 5, generator=gen, dtype=torch.float64)
    right = torch.randn(3, 4, 5, 7, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        out = small_batched_matmul(left.transpose(-1, -2).contiguous().transpose(-1, -2), right)
    assert torch.allclose(out, left @ right, rtol=0, atol=1e-13)
    assert out.movedim(-2, 0).is_contiguous()  # [P, ..., Q] in memory


def test_probe_dots_without_cached_key_space_probes():
    """The text cache's key-space probes are an optimisation: computed on the fly, same dots."""
    from vidseek.models import tcmgc_fast

    model = make_model(attention_heads=2)
    text, video = make_text(2), model.precompute_video(model.encode_video_features(make_frames(3)))
    side = model._text_side(text, fast=True)
    frame_probes = slice(W + 1, 2 * W + 2)
    groups = [(slice(0, W + 1), slice(0, 1)), (frame_probes, slice(1, W + 1))]
    assert side.fast_cache.key_space == frame_probes and side.fast_cache.key_probes is not None
    bare = tcmgc_fast.precompute_text(model.lva, side.queries, side.probes)
    cached = tcmgc_fast.probe_dots(model.lva, side.fast_cache, video, groups, False)
    computed = tcmgc_fast.probe_dots(model.lva, bare, video, groups, False)
    for a, b in zip(cached, computed):
        assert (a - b).abs().max().item() < 1e-12
