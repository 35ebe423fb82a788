"""PIG (Hybrid-Tower): attention mask, ITS, generator, fusion, stages, loss, index vector, presets.

Tiny random-init CLIP ("tiny": 48² frames, patch 8 → 36 patches, width 96, D = 64), 2–3 frames.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vidseek.encoders import build_clip
from vidseek.errors import CheckpointError, ConfigError
from vidseek.models.base import FrameFeatures, tree_cat, tree_slice
from vidseek.models.pig import (
    PIG,
    PIGConfig,
    PIGFrameFeatures,
    load_stage1,
    select_informative_tokens,
    vip_attention_mask,
)

WORDS = 32
CAPTIONS = ["a red circle moves left", "a blue square grows then shrinks", "a green star rotates"]


def make_model(seed: int = 0, **config) -> PIG:
    """PIG on the tiny CLIP, whose text width (96) is not its joint width (64): the pseudo-query
    needs the projection (the release default, unprojected, is tested in test_faithfulness)."""
    torch.manual_seed(seed)
    config.setdefault("pseudo_query_projection", True)
    return PIG(build_clip("tiny", context_length=WORDS), PIGConfig(**config))


def make_batch(model: PIG, frames: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    b = len(CAPTIONS)
    pixels = torch.randn(b, frames, 3, 48, 48, generator=g)
    mask = torch.ones(b, frames, dtype=torch.bool)
    return pixels, mask, model.clip.tokenize(CAPTIONS, WORDS)


def video_of(model: PIG, pixels, mask):
    return model.encode_video_features(model.encode_frames(pixels, mask))


# --- backbone: attention mask and ITS -----------------------------------------------------------

def test_attention_mask_matches_the_design_for_two_frames_of_four_patches():
    # Layout (L = 4 + 2·(1+4) = 14): 0 video CLS, 1–3 extra CLS, 4 frame-1 CLS, 5–8 frame-1
    # patches, 9 frame-2 CLS, 10–13 frame-2 patches.
    expected = torch.zeros(14, 14, dtype=torch.bool)
    expected[0:4, :] = True  # global tokens see everything
    expected[4:9, 0:4] = True  # frame 1 sees the global tokens ...
    expected[4:9, 4:9] = True  # ... and itself
    expected[9:14, 0:4] = True
    expected[9:14, 9:14] = True
    mask = vip_attention_mask(num_frames=2, num_patches=4, num_global=4)
    assert mask.shape == (1, 14, 14)
    assert torch.equal(mask[0], expected)

    # Second video's frame 2 is padding: its tokens are no one's keys; its queries keep the globals.
    padded = vip_attention_mask(2, 4, 4, frame_mask=torch.tensor([[True, True], [True, False]]))
    assert torch.equal(padded[0], expected)
    expected_padded = expected.clone()
    expected_padded[:, 9:14] = False
    assert torch.equal(padded[1], expected_padded)
    assert bool(padded[1].any(dim=1).all())  # no empty softmax row


def test_its_picks_the_top_patches_by_max_over_heads_skipping_cls_positions():
    # L = 14 as above; candidates exclude the 4 global tokens and the frame CLS at 4 and 9.
    candidates = torch.ones(14, dtype=torch.bool)
    candidates[[0, 1, 2, 3, 4, 9]] = False
    attn = torch.zeros(2, 2, 14)
    # video 0: CLS positions get the largest values (must be ignored); head 1 favours 12, head 0 favours 6
    attn[0, 0, [0, 4, 9]] = 0.9
    attn[0, 0, 6] = 0.30
    attn[0, 1, 12] = 0.40
    attn[0, 1, 6] = 0.05
    attn[0, 0, 7] = 0.20
    # video 1: only head 1 matters
    attn[1, 1, [5, 13, 10]] = torch.tensor([0.1, 0.3, 0.2])
    chosen = select_informative_tokens(attn, candidates, k=3)
    assert chosen[0].tolist() == [12, 6, 7]
    assert chosen[1].tolist() == [13, 10, 5]

    with pytest.raises(ConfigError, match="its_topk"):
        select_informative_tokens(attn, candidates, k=9)  # only 8 patch positions


def test_encode_frames_feeds_its_patch_positions_only(monkeypatch):
    model = make_model(its_topk=3).eval()
    pixels, mask, _ = make_batch(model)
    b, t, p, d = 3, 2, 36, 64
    length = 4 + t * (1 + p)
    tokens = torch.arange(b * length, dtype=torch.float32).view(b, length, 1).expand(b, length, d).clone()
    attn = torch.zeros(b, 4, length)
    attn[:, :, [0, 1, 4, 4 + 1 + p]] = 1.0  # globals and both frame CLS: highest, never selected
    attn[:, 2, 4 + 1 + p + 7] = 0.5  # frame 2, patch 7
    attn[:, 0, 4 + 1 + 3] = 0.4  # frame 1, patch 3
    attn[:, 3, 4 + 1 + 20] = 0.3  # frame 1, patch 20
    monkeypatch.setattr(model.vit, "forward", lambda visual, px, m: (tokens, attn))
    feats = model.encode_frames(pixels, mask)
    assert isinstance(feats, PIGFrameFeatures)
    picked = [4 + 1 + p + 7, 4 + 1 + 3, 4 + 1 + 20]
    assert torch.equal(feats.selected_patches, tokens[:, picked])
    assert torch.equal(feats.global_tokens, tokens[:, :4])
    assert torch.equal(feats.frames, tokens[:, [4, 4 + 1 + p]])


def test_padded_frames_change_nothing():
    model = make_model().eval()
    pixels, mask, _ = make_batch(model, frames=3)
    mask[1, 2] = False
    with torch.no_grad():
        before = video_of(model, pixels, mask).embedding
        noisy = pixels.clone()
        noisy[1, 2] = torch.randn_like(noisy[1, 2]) * 5
        after = video_of(model, noisy, mask).embedding
        # ... and the video with its padded frame dropped gives the same vector
        alone = video_of(model, pixels[1:2, :2], mask[1:2, :2]).embedding
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    torch.testing.assert_close(alone[0], before[1], rtol=0, atol=1e-5)


# --- generator ----------------------------------------------------------------------------------

def test_generator_reads_at_eos_and_ignores_what_follows():
    model = make_model().eval()
    gen = model.generator
    torch.manual_seed(3)
    seq = torch.randn(2, 10, 96)
    eos = torch.tensor([6, 9])
    with torch.no_grad():
        out = gen.read_at(seq, eos)
        perturbed = seq.clone()
        perturbed[0, 7:] = torch.randn(3, 96)  # after video 0's EOS
        out2 = gen.read_at(perturbed, eos)
        changed = seq.clone()
        changed[0, 2] = torch.randn(96)  # before EOS: must matter
        out3 = gen.read_at(changed, eos)
        short = gen.read_at(seq[:1, :7], torch.tensor([6]))  # EOS last: same value
    torch.testing.assert_close(out2, out, rtol=0, atol=1e-6)
    torch.testing.assert_close(short[0], out[0], rtol=0, atol=1e-5)
    assert (out3[0] - out[0]).abs().max() > 1e-3
    assert out.shape == (2, 64)


def test_generator_drops_padded_tokens_and_wraps_bos_eos():
    model = make_model().eval()
    gen = model.generator
    torch.manual_seed(4)
    tokens = torch.randn(1, 6, 64)
    valid = torch.tensor([[True, True, False, True, True, True]])
    with torch.no_grad():
        with_pad = gen(tokens, valid)
        without = gen(tokens[:, [0, 1, 3, 4, 5]], torch.ones(1, 5, dtype=torch.bool))
        # by hand: [BOS] mapped tokens [EOS], read at the last position
        seq = torch.cat([model.clip.model.token_embedding.weight[49406].view(1, 1, -1),
                         gen.mapper(tokens[:, [0, 1, 3, 4, 5]]),
                         model.clip.model.token_embedding.weight[49407].view(1, 1, -1)], dim=1)
        by_hand = gen.read_at(seq, torch.tensor([6]))
    torch.testing.assert_close(with_pad, without, rtol=0, atol=1e-5)
    torch.testing.assert_close(by_hand, without, rtol=0, atol=1e-6)


def test_generator_starts_as_a_copy_of_the_text_tower_and_keeps_its_activation():
    from open_clip.transformer import QuickGELU

    from vidseek.encoders.weights import set_mlp_activation

    torch.manual_seed(0)
    clip = build_clip("tiny", context_length=WORDS)
    set_mlp_activation(clip.model, "text", "quick_gelu")  # as OpenAI weights set it
    model = PIG(clip, PIGConfig(pseudo_query_projection=True))
    text_state = clip.model.transformer.state_dict()
    for key, value in model.generator.transformer.state_dict().items():
        assert torch.equal(value, text_state[key])
    assert model.generator.transformer.resblocks[0].attn.in_proj_weight is not clip.model.transformer.resblocks[0].attn.in_proj_weight
    fresh = make_model()  # GELU until the checkpoint says otherwise
    fresh.load_state_dict(model.state_dict())
    assert isinstance(fresh.generator.transformer.resblocks[0].mlp.gelu, QuickGELU)


def test_generator_length_beyond_the_text_positions_is_a_config_error():
    model = make_model(its_topk=28)  # 1 + 4 + 2 + 28 + 1 = 36 > 32 positions
    pixels, mask, _ = make_batch(model)
    with pytest.raises(ConfigError, match="positions"):
        video_of(model, pixels, mask)


# --- fusion -------------------------------------------------------------------------------------

def test_fusion_projections_start_as_identities():
    model = make_model()
    eye = torch.eye(64)
    for layer in ("q_proj", "k_proj", "v_proj", "out_proj", "linear"):
        lin = getattr(model.fusion, layer)
        assert torch.equal(lin.weight, eye), layer
        assert torch.equal(lin.bias, torch.zeros(64)), layer


def test_fusion_with_one_hot_attention_returns_the_processed_cls_value():
    model = make_model().eval()
    fusion = model.fusion
    torch.manual_seed(5)
    query, keys = torch.randn(2, 64), torch.randn(2, 5, 64)
    only = torch.zeros(2, 5, dtype=torch.bool)
    only[0, 0] = True  # the video CLS
    only[1, 3] = True
    with torch.no_grad():
        out = fusion(query, keys, only)
        weights = fusion.attention(query, keys, only)
    assert torch.equal(weights, only.float())
    ln = lambda x: F.layer_norm(x, (64,))  # noqa: E731  (γ = 1, β = 0 at init)
    chosen = torch.stack([keys[0, 0], keys[1, 3]])
    a = ln(ln(chosen))  # LN1 → v (identity) → out (identity) → LN2
    torch.testing.assert_close(out, ln(a + a), rtol=0, atol=1e-5)  # a + Linear(a) (identity), LN3


def test_fusion_attention_is_a_softmax_of_scaled_dot_products():
    model = make_model().eval()
    torch.manual_seed(6)
    query, keys = torch.randn(1, 64), torch.randn(1, 4, 64)
    mask = torch.tensor([[True, True, False, True]])
    with torch.no_grad():
        weights = model.fusion.attention(query, keys, mask)
    ln = lambda x: F.layer_norm(x, (64,))  # noqa: E731
    logits = (ln(keys[0]) @ ln(query[0])) / 8.0  # sqrt(64)
    expected = torch.softmax(logits[[0, 1, 3]], dim=0)
    torch.testing.assert_close(weights[0, [0, 1, 3]], expected, rtol=0, atol=1e-6)
    assert weights[0, 2] == 0


# --- loss, gradients, index vector ---------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["vip", "frames"])
def test_loss_is_finite_and_every_trainable_parameter_gets_a_gradient(backbone):
    model = make_model(backbone=backbone).train()
    pixels, mask, tokens = make_batch(model)
    mask[2, 1] = False
    out = model.loss(model.encode_text(tokens), video_of(model, pixels, mask))
    assert torch.isfinite(out.loss)
    assert set(out.terms) == {"infonce", "generation", "logit_scale"}
    out.loss.backward()
    # CLIP's own logit scale is unused by every vidseek model (each has its LogitScale).
    missing = [n for n, p in model.named_parameters()
               if p.requires_grad and n != "clip.model.logit_scale" and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def test_loss_terms_by_hand_and_sum_versus_mean():
    model = make_model().eval()
    pixels, mask, tokens = make_batch(model)
    with torch.no_grad():
        text, video = model.encode_text(tokens), video_of(model, pixels, mask)
        out = model.loss(text, video)
        logits = model.logit_scale() * F.normalize(text.sentence, dim=-1) @ video.embedding.t()
        target = torch.arange(3)
        infonce_sum = F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)
        cos = F.cosine_similarity(video.pseudo_query, text.sentence, dim=-1)
        generation = (2 - 2 * cos).mean()
    assert out.terms["infonce"] == pytest.approx(float(infonce_sum), abs=1e-5)
    assert out.terms["generation"] == pytest.approx(float(generation), abs=1e-5)
    assert float(out.loss) == pytest.approx(float(infonce_sum + generation), abs=1e-5)

    model.config.infonce_reduction = "mean"
    model.config.generation_weight = 0.5
    with torch.no_grad():
        out = model.loss(text, video)
    assert float(out.loss) == pytest.approx(float(infonce_sum / 2 + 0.5 * generation), abs=1e-5)


def test_index_video_is_one_normalised_vector_per_video_and_equals_score():
    model = make_model().eval()
    pixels, mask, tokens = make_batch(model)
    with torch.no_grad():
        video = video_of(model, pixels, mask)
        vectors = model.index_video(video)
        text = model.encode_text(tokens)
        scores = model.score(text, video)
    assert vectors.shape == (3, 64)
    torch.testing.assert_close(vectors.norm(dim=-1), torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(scores, model.index_text(text) @ vectors.t(), rtol=0, atol=1e-6)
    # the representation is a pytree the training loop can slice and concatenate
    again = tree_cat([tree_slice(video, 0, 1), tree_slice(video, 1, 3)])
    assert torch.equal(again.embedding, video.embedding)


def test_baseline_index_vector_is_the_pooled_cls():
    model = make_model(generator=False, fusion=False).eval()
    pixels, mask, _ = make_batch(model)
    with torch.no_grad():
        tokens, _attn = model.vit(model.clip.model.visual, pixels, mask)
        vectors = model.index_video(video_of(model, pixels, mask))
    assert model.generator is None and model.fusion is None
    torch.testing.assert_close(vectors, F.normalize(tokens[:, 0], dim=-1), rtol=0, atol=1e-6)

    frames_model = make_model(backbone="frames", generator=False, fusion=False).eval()
    mask[0, 1] = False
    with torch.no_grad():
        vectors = frames_model.index_video(video_of(frames_model, pixels, mask))
        cls = frames_model.clip.encode_image(pixels.flatten(0, 1)).cls.view(3, 2, 64)
    pooled = torch.stack([cls[0, 0], cls[1].mean(0), cls[2].mean(0)])
    torch.testing.assert_close(vectors, F.normalize(pooled, dim=-1), rtol=0, atol=1e-5)


def test_frames_backbone_runs_from_extracted_features_and_vip_refuses_them():
    model = make_model(backbone="frames").eval()
    assert model.needs_patches and not model.needs_video_frames
    pixels, mask, _ = make_batch(model)
    with torch.no_grad():
        feats = model.encode_frames(pixels, mask)
        assert type(feats) is FrameFeatures and feats.patches.shape == (3, 2, 36, 64)
        assert model.index_video(model.encode_video_features(feats)).shape == (3, 64)
    vip = make_model()
    assert vip.needs_video_frames and not vip.needs_patches
    with pytest.raises(ConfigError, match="mode 'frames'"):
        vip.encode_video_features(feats)


# --- stages -------------------------------------------------------------------------------------

def test_stage1_trains_only_the_generator():
    from vidseek.train.optim import build_optimizer

    model = make_model(stage=1).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    generator = {f"generator.{n}" for n, _ in model.generator.named_parameters()}
    assert trainable == generator and "generator.mapper.weight" in trainable
    optimizer = build_optimizer(model, 1e-3, 1.0, 0.05)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(generator)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    pixels, mask, tokens = make_batch(model)
    out = model.loss(model.encode_text(tokens), video_of(model, pixels, mask))
    assert set(out.terms) == {"generation"}
    out.loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= generator
    # in stage 1 the video vector is the pseudo-query itself
    with torch.no_grad():
        video = video_of(model.eval(), pixels, mask)
    torch.testing.assert_close(video.embedding, F.normalize(video.pseudo_query, dim=-1))


def test_stage1_checkpoint_hands_over_to_stage2(tmp_path):
    from vidseek.train.checkpoint import save_checkpoint
    from vidseek.train.loop import init_weights_from

    stage1 = make_model(seed=1, stage=1)
    with torch.no_grad():
        for p in stage1.generator.parameters():
            p.add_(0.01)  # "trained"
    stage2 = make_model(seed=2, stage=2)
    before_fusion = stage2.fusion.q_proj.weight.detach().clone()
    assert load_stage1(stage2, stage1.state_dict())
    for (n, a), (_, b) in zip(stage2.generator.state_dict().items(), stage1.generator.state_dict().items()):
        assert torch.equal(a, b), n
    assert not torch.equal(stage2.clip.model.visual.proj, stage1.clip.model.visual.proj)  # rest kept
    assert torch.equal(stage2.fusion.q_proj.weight, before_fusion)
    assert all(p.requires_grad for p in stage2.parameters())

    # The same names in both stages: strict loading works, and so does `vidseek train --init`.
    fresh = make_model(seed=3, stage=2)
    fresh.load_state_dict(stage1.state_dict(), strict=True)
    path = tmp_path / "stage1.pt"
    save_checkpoint(path, model=stage1, preset={"name": "synth-pig-stage1-tiny"}, step=1, epoch=0, batch_in_epoch=1)
    other = make_model(seed=4, stage=2)
    assert init_weights_from(other, path) == []
    pixels, mask, _ = make_batch(other)
    with torch.no_grad():
        torch.testing.assert_close(video_of(other.eval(), pixels, mask).pseudo_query,
                                   video_of(stage1.eval(), pixels, mask).pseudo_query, rtol=0, atol=1e-5)

    with pytest.raises(CheckpointError, match="stage-1"):
        load_stage1(stage2, {k: v for k, v in stage1.state_dict().items() if k != "generator.mapper.weight"})


def test_bad_configs_are_one_line_errors():
    with pytest.raises(ConfigError, match="backbone"):
        make_model(backbone="x3d")
    with pytest.raises(ConfigError, match="generator"):
        make_model(stage=1, generator=False)
    with pytest.raises(ConfigError, match="stage"):
        make_model(stage=3)


# --- presets ------------------------------------------------------------------------------------

def test_presets():
    from vidseek.models.registry import create_model, get_preset

    for name in ("msrvtt9k-pig-b32", "msrvtt7k-pig-b16", "msvd-pig-b32", "vatex-pig-b32", "didemo-pig-b16"):
        p = get_preset(name)
        assert (p.model, p.model_config, p.train.lr, p.train.batch_size) == ("pig", {"stage": 2}, 1e-6, 128)
        assert (p.train.weight_decay, p.train.warmup_fraction, p.train.clip_lr_coef) == (0.2, 0.01, 1.0)
    assert (get_preset("msrvtt9k-pig-b32").frames, get_preset("msrvtt9k-pig-b32").words) == (12, 50)
    assert get_preset("msrvtt7k-pig-b32").data_options == {"train_split": "7k", "test_split": "full"}
    assert get_preset("msrvtt9k-pig-stage1-b32").train.lr == 1e-4
    assert get_preset("msrvtt9k-pig-baseline-b32").model_config == {"generator": False, "fusion": False}

    tiny = {n: get_preset(n) for n in ("synth-pig-stage1-tiny", "synth-pig-tiny", "synth-pig-baseline-tiny")}
    for p in tiny.values():
        assert (p.clip, p.frames, p.words, p.train.lr, p.train.clip_lr_coef, p.train.hard_negatives) == \
            ("tiny", 8, 32, 1e-3, 1.0, "groups")
        assert p.model_config["backbone"] == "frames"  # reads frozen-tower features (synth recipe)
    assert tiny["synth-pig-stage1-tiny"].model_config["stage"] == 1
    assert tiny["synth-pig-baseline-tiny"].model_config["generator"] is False
    model = create_model(tiny["synth-pig-tiny"])
    assert isinstance(model, PIG) and model.config.stage == 2 and model.needs_patches


def test_init_from_a_two_tower_checkpoint_rederives_the_clip_copies(tmp_path):
    """`--init synth-clip-tiny`: the generator must start as the LOADED text tower, not the
    random one PIG was built on; a PIG checkpoint's own generator is kept as saved."""
    from vidseek.encoders.weights import set_mlp_activation
    from vidseek.models.twotower import TwoTower
    from vidseek.train.checkpoint import save_checkpoint
    from vidseek.train.loop import init_weights_from

    torch.manual_seed(11)
    pretrained = TwoTower(build_clip("tiny", context_length=WORDS))
    set_mlp_activation(pretrained.clip.model, "text", "quick_gelu")
    path = tmp_path / "clip.pt"
    save_checkpoint(path, model=pretrained, preset={"name": "synth-clip-tiny"}, step=1, epoch=0, batch_in_epoch=1)

    model = make_model(seed=12, stage=1)
    skipped = init_weights_from(model, path)
    assert "generator.mapper.weight" in skipped
    text = pretrained.clip.model
    for key, value in model.generator.transformer.state_dict().items():
        assert torch.equal(value, text.transformer.state_dict()[key]), key
    assert torch.equal(model.generator.bos_embedding, text.token_embedding.weight[49406])
    assert torch.equal(model.generator.positional_embedding, text.positional_embedding)
    assert model.generator.get_extra_state().tolist() == [1]  # quick_gelu followed the tower
    assert torch.equal(model.vit.frame_cls, pretrained.clip.model.visual.class_embedding)
    assert torch.equal(model.vit.extra_cls[2], pretrained.clip.model.visual.class_embedding)

    trained = make_model(seed=13)
    with torch.no_grad():
        trained.generator.ln_final.weight.add_(0.5)
    restored = make_model(seed=14)
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.generator.ln_final.weight, trained.generator.ln_final.weight)
    assert not torch.equal(restored.generator.ln_final.weight, restored.clip.model.ln_final.weight)


# --- the video ViT against a frame-by-frame reference ----------------------------------------------

def reference_vit(model: PIG, pixels, mask):
    """Slow reference of the release's factorised attention (`CLIPAttention.forward2`): global
    tokens attend over every real token; each frame's tokens over [globals + own frame]."""
    visual = model.clip.model.visual
    x = model.vit.embed(visual, pixels)
    b, t = pixels.shape[:2]
    g = model.vit.num_global
    per = (x.shape[1] - g) // t
    for block in visual.transformer.resblocks:
        attn = block.attn
        heads, width = attn.num_heads, x.shape[-1]
        hd = width // heads
        h = block.ln_1(x)
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).split(width, dim=-1)
        out = torch.zeros_like(x)
        for i in range(b):
            real = [j for j in range(t) if mask[i, j]]
            frame_span = lambda j: list(range(g + j * per, g + (j + 1) * per))  # noqa: E731
            groups = [(list(range(g)), list(range(g)) + sum((frame_span(j) for j in real), []))]
            groups += [(frame_span(j), list(range(g)) + frame_span(j)) for j in range(t)]
            for queries, keys in groups:
                qh = q[i, queries].view(len(queries), heads, hd).transpose(0, 1)
                kh = k[i, keys].view(len(keys), heads, hd).transpose(0, 1)
                vh = v[i, keys].view(len(keys), heads, hd).transpose(0, 1)
                w = torch.softmax(qh @ kh.transpose(1, 2) / hd ** 0.5, dim=-1)
                out[i, queries] = (w @ vh).transpose(0, 1).reshape(len(queries), width)
        x = x + F.linear(out, attn.out_proj.weight, attn.out_proj.bias)
        x = x + block.mlp(block.ln_2(x))
    return visual.ln_post(x) @ visual.proj


def test_video_vit_equals_the_frame_by_frame_reference():
    model = make_model().eval()
    pixels, mask, _ = make_batch(model, frames=3)
    mask[2, 2] = False
    with torch.no_grad():
        model.vit.temporal_embedding.normal_(0, 0.1)
        tokens, cls_attention = model.vit(model.clip.model.visual, pixels, mask)
        expected = reference_vit(model, pixels, mask)
    torch.testing.assert_close(tokens[:2], expected[:2], rtol=0, atol=2e-5)
    real = list(range(4 + 2 * 37))  # video 2: its padded frame's own outputs are never read
    torch.testing.assert_close(tokens[2, real], expected[2, real], rtol=0, atol=2e-5)
    assert cls_attention.shape == (3, 4, 4 + 3 * 37)
    torch.testing.assert_close(cls_attention.sum(-1), torch.ones(3, 4), rtol=0, atol=1e-5)
    assert float(cls_attention[2, :, 4 + 2 * 37:].abs().max()) == 0.0  # padded frame: no attention


def test_frame_order_matters_only_through_the_temporal_embedding():
    model = make_model(generator=False, fusion=False).eval()
    pixels, mask, _ = make_batch(model, frames=3)
    reversed_pixels = pixels.flip(1)
    with torch.no_grad():
        same = [model.index_video(video_of(model, p, mask)) for p in (pixels, reversed_pixels)]
        model.vit.temporal_embedding.normal_(0, 0.5)
        different = [model.index_video(video_of(model, p, mask)) for p in (pixels, reversed_pixels)]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=1e-5)  # zero-initialised: order-blind
    assert float((different[0] - different[1]).abs().max()) > 1e-3
