"""vidseek.encoders: tokenizer ids, tower outputs vs open_clip, weight formats, loading errors."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from vidseek.encoders import CLIP_CONFIGS, ClipBackbone, build_clip, load_clip_weights, read_clip_checkpoint
from vidseek.encoders.clip import _instantiate, clip_config
from vidseek.encoders.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID, decode_ids, tokenize, used_length, vocab_size
from vidseek.encoders.weights import convert_hf_state_dict, guess_clip_name, set_mlp_activation
from vidseek.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def tiny() -> ClipBackbone:
    torch.manual_seed(0)
    return build_clip("tiny").eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(1))


def _fresh_tiny(seed: int = 123) -> ClipBackbone:
    torch.manual_seed(seed)  # different init, so a load that silently did nothing would be caught
    return build_clip("tiny").eval()


def _assert_same_outputs(a: ClipBackbone, b: ClipBackbone, images: torch.Tensor, atol: float = 0.0) -> None:
    tokens = a.tokenize(["a dog catches a frisbee", "a red square moves left then up"])
    with torch.no_grad():
        ta, tb = a.encode_text(tokens), b.encode_text(tokens)
        ia, ib = a.encode_image(images, patches=True), b.encode_image(images, patches=True)
    torch.testing.assert_close(ta.sentence, tb.sentence, atol=atol, rtol=0)
    torch.testing.assert_close(ta.words, tb.words, atol=atol, rtol=0)
    torch.testing.assert_close(ia.cls, ib.cls, atol=atol, rtol=0)
    torch.testing.assert_close(ia.patches, ib.patches, atol=atol, rtol=0)


# --- tokenizer ----------------------------------------------------------------------------------

def test_vocabulary_is_clips_49408_with_sot_eot_at_the_top():
    assert vocab_size() == 49408
    assert (SOT_TOKEN_ID, EOT_TOKEN_ID) == (49406, 49407)


def test_known_sentence_tokenizes_to_clip_ids():
    tokens = tokenize(["A photo of a dog."], context_length=10)
    # a</w>=320, photo</w>=1125, of</w>=539, dog</w>=1929, .</w>=269 (lower-cased BPE).
    assert tokens.dtype == torch.long
    assert tokens.tolist() == [[49406, 320, 1125, 539, 320, 1929, 269, 49407, 0, 0]]
    assert decode_ids([320, 1125, 539, 320, 1929]).strip() == "a photo of a dog"


def test_truncation_keeps_eot_last():
    tokens = tokenize(["a photo of a dog", "a dog"], context_length=4)
    assert tokens.tolist() == [[49406, 320, 1125, 49407], [49406, 320, 1929, 49407]]


def test_backbone_tokenize_rejects_longer_than_tower(tiny):
    assert tiny.tokenize(["a dog"]).shape == (1, 32)
    assert tiny.tokenize(["a dog"], context_length=8).shape == (1, 8)
    with pytest.raises(ConfigError, match="exceeds the text tower's 32"):
        tiny.tokenize(["a dog"], context_length=33)


# --- configs ------------------------------------------------------------------------------------

def test_named_vit_configs_equal_open_clips():
    import open_clip

    for name in ("ViT-B-32", "ViT-B-16", "ViT-L-14"):
        assert CLIP_CONFIGS[name] == open_clip.get_model_config(name)


def test_tiny_dimensions(tiny):
    assert (tiny.embed_dim, tiny.image_size, tiny.patch_size, tiny.grid, tiny.context_length) == (64, 48, 8, 6, 32)
    assert tiny.model.visual.transformer.resblocks[0].attn.num_heads == 4
    assert len(tiny.model.visual.transformer.resblocks) == 3
    assert tiny.model.transformer.resblocks[0].attn.num_heads == 4
    assert len(tiny.model.transformer.resblocks) == 2
    assert tiny.model.token_embedding.weight.shape == (49408, 96)


def test_unknown_and_unsupported_architectures():
    with pytest.raises(ConfigError, match="unknown CLIP architecture 'ViT-X-99'"):
        build_clip("ViT-X-99")
    with pytest.raises(ConfigError, match="not supported"):
        build_clip("RN50")  # ResNet image tower: no patch tokens


# --- text tower ---------------------------------------------------------------------------------

def test_text_features_shapes_and_sentence_equals_open_clip(tiny):
    tokens = tiny.tokenize(["a dog catches a frisbee", "", "a red square moves left then up"])
    with torch.no_grad():
        out = tiny.encode_text(tokens)
        reference = tiny.model.encode_text(tokens)
    assert out.sentence.shape == (3, 64) and out.words.shape == (3, 32, 64) and out.mask.shape == (3, 32)
    assert torch.equal(out.sentence, reference)
    eot = tokens.argmax(dim=-1)
    torch.testing.assert_close(out.words[torch.arange(3), eot], out.sentence, atol=1e-6, rtol=0)
    assert out.mask.sum(dim=1).tolist() == [7, 2, 9]  # SOT + words + EOT


def test_mask_covers_token_id_zero_inside_the_text(tiny):
    # BPE id 0 is the byte "!"; padding is everything after EOT, not "id == 0".
    tokens = tiny.tokenize(['wow !"#'])
    assert tokens[0, :5].tolist() == [49406, 2781, 0, 8345, 49407]
    mask = tiny.encode_text(tokens).mask
    assert mask[0].tolist() == [True] * 5 + [False] * 27


def test_shorter_token_rows_give_the_same_features(tiny):
    texts = ["a dog catches a frisbee", "a blue circle grows"]
    with torch.no_grad():
        full = tiny.encode_text(tiny.tokenize(texts))
        short = tiny.encode_text(tiny.tokenize(texts, context_length=12))
    torch.testing.assert_close(short.sentence, full.sentence, atol=1e-5, rtol=0)
    torch.testing.assert_close(short.words, full.words[:, :12], atol=1e-5, rtol=0)


def test_skip_padding_encodes_only_up_to_the_last_eot(tiny):
    texts = ["a dog catches a frisbee", "", "a red square moves left then up"]
    tokens = tiny.tokenize(texts)
    assert used_length(tokens) == 9  # the longest row: SOT + 7 words + EOT (mask sums 7, 2, 9 above)
    assert used_length(tokens[1:2]) == 2
    with torch.no_grad():
        full = tiny.encode_text(tokens)
        skipped = tiny.encode_text(tokens, skip_padding=True)
    assert skipped.words.shape == full.words.shape and torch.equal(skipped.mask, full.mask)
    torch.testing.assert_close(skipped.sentence, full.sentence, atol=1e-5, rtol=0)
    torch.testing.assert_close(skipped.words[:, :9], full.words[:, :9], atol=1e-5, rtol=0)
    assert skipped.words[:, 9:].abs().max() == 0 and full.words[:, 9:].abs().max() > 0


def test_models_skip_padding_unless_their_scores_read_it(tiny):
    from vidseek.models.tcmgc import TCMGC, TCMGCConfig
    from vidseek.models.twotower import TwoTower, TwoTowerConfig

    tokens = tiny.tokenize(["a blue circle grows", "a star"])
    with torch.no_grad():
        full = tiny.encode_text(tokens)
        two_tower = TwoTower(tiny, TwoTowerConfig()).encode_text(tokens)
        faithful = TCMGC(tiny, TCMGCConfig(max_words=32, temporal_layers=1)).encode_text(tokens)
        masked = TCMGC(tiny, TCMGCConfig(max_words=32, temporal_layers=1, text_mask=True)).encode_text(tokens)
    torch.testing.assert_close(two_tower.sentence, full.sentence, atol=1e-5, rtol=0)
    assert two_tower.words[:, 6:].abs().max() == 0  # SOT + 4 words + EOT, then skipped
    assert torch.equal(faithful.words, full.words)  # TC-MGC as released weighs padding positions
    assert masked.words[:, 6:].abs().max() == 0


# --- image tower --------------------------------------------------------------------------------

def test_image_features_shapes_and_cls_equals_open_clip(tiny, images):
    with torch.no_grad():
        plain = tiny.encode_image(images)
        full = tiny.encode_image(images, patches=True, attention=True)
        reference = tiny.model.encode_image(images)
    assert plain.patches is None and plain.attention is None
    assert full.cls.shape == (3, 64) and full.patches.shape == (3, 36, 64) and full.attention.shape == (3, 4, 37, 37)
    assert torch.equal(plain.cls, reference) and torch.equal(full.cls, reference)


def test_wrong_image_size_is_a_one_line_error(tiny):
    with pytest.raises(ConfigError, match=r"images must be \[N, 3, 48, 48\]"):
        tiny.encode_image(torch.zeros(1, 3, 64, 64))


def test_attention_rows_sum_to_one_and_rebuild_the_last_block(tiny, images):
    visual = tiny.model.visual
    block = visual.transformer.resblocks[-1]
    seen = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            out = tiny.encode_image(images, patches=True, attention=True)
    finally:
        handle.remove()
    attn = out.attention
    assert (attn >= 0).all()
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 4, 37), atol=1e-5, rtol=0)

    # Slow reference: apply the returned probabilities to the values by hand, finish the block,
    # then ln_post @ proj must give the same CLS and patch features.
    with torch.no_grad():
        x_in = seen[0]
        n, length, width = x_in.shape
        heads, head_dim = 4, width // 4
        h = block.ln_1(x_in)
        w_v = block.attn.in_proj_weight[2 * width:]
        b_v = block.attn.in_proj_bias[2 * width:]
        values = (h @ w_v.T + b_v).view(n, length, heads, head_dim).transpose(1, 2)  # [N, H, L, hd]
        context = (attn @ values).transpose(1, 2).reshape(n, length, width)
        x = x_in + block.attn.out_proj(context)
        x = x + block.mlp(block.ln_2(x))
        x = visual.ln_post(x)
    torch.testing.assert_close(x[:, 0] @ visual.proj, out.cls, atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, 1:] @ visual.proj, out.patches, atol=1e-5, rtol=0)


# --- weight files -------------------------------------------------------------------------------

def test_open_clip_checkpoint_round_trip(tiny, images, tmp_path):
    path = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "tiny", "state_dict": tiny.model.state_dict()}, path)
    loaded = build_clip("tiny", weights=path).eval()
    assert read_clip_checkpoint(path).source == "open_clip"
    _assert_same_outputs(tiny, loaded, images)


def test_module_prefixed_state_dict_round_trip(tiny, images, tmp_path):
    path = tmp_path / "ddp.bin"
    torch.save({f"module.{k}": v for k, v in tiny.model.state_dict().items()}, path)
    fresh = _fresh_tiny()
    load_clip_weights(fresh, path)
    _assert_same_outputs(tiny, fresh, images)


def test_safetensors_round_trip(tiny, images, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    _assert_same_outputs(tiny, build_clip("tiny", weights=tmp_path).eval(), images)  # folder lookup


def test_openai_torchscript_archive_round_trip_switches_to_quick_gelu(tiny, images, tmp_path):
    from open_clip.transformer import QuickGELU

    # Build an archive shaped like OpenAI's release: OpenAI key names, QuickGELU, and the
    # input_resolution / context_length / vocab_size attributes stored as tensors.
    source = copy.deepcopy(tiny.model)
    for tower in ("visual", "text"):
        set_mlp_activation(source, tower, "quick_gelu")
    for attr, value in (("input_resolution", 48), ("context_length", 32), ("vocab_size", 49408)):
        if hasattr(source, attr):
            delattr(source, attr)  # open_clip keeps these as ints; OpenAI's archive as tensors
        source.register_buffer(attr, torch.tensor(value))
    example_tokens = tokenize(["a dog"], context_length=32).repeat(2, 1)
    traced = torch.jit.trace_module(source.eval(), {"encode_text": (example_tokens,),
                                                    "encode_image": (images[:2],)}, check_trace=False)
    path = tmp_path / "ViT-tiny.pt"
    torch.jit.save(traced, str(path))

    loaded = build_clip("tiny", weights=path).eval()
    assert read_clip_checkpoint(path).source == "openai"
    assert isinstance(loaded.model.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert isinstance(loaded.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    jit_model = torch.jit.load(str(path))
    tokens = loaded.tokenize(["a dog catches a frisbee", "a red square"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_text(tokens).sentence, jit_model.encode_text(tokens),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(loaded.encode_image(images[:2]).cls, jit_model.encode_image(images[:2]),
                                   atol=1e-5, rtol=0)


def test_activation_travels_with_the_backbone_state_dict(tiny, images):
    # A model checkpoint saved after loading OpenAI / HF weights must bring QuickGELU back when
    # a fresh (GELU) backbone loads it; the state rides along as a tensor, under any prefix.
    source = copy.deepcopy(tiny)
    set_mlp_activation(source.model, "text", "quick_gelu")
    set_mlp_activation(source.model, "visual", "gelu_tanh")
    assert source.activations == {"visual": "gelu_tanh", "text": "quick_gelu"}
    holder = nn.ModuleDict({"clip": source})
    state = holder.state_dict()
    assert torch.equal(state["clip._extra_state"], torch.tensor([2, 1]))

    target = nn.ModuleDict({"clip": _fresh_tiny()})
    assert target["clip"].activations == {"visual": "gelu", "text": "gelu"}
    target.load_state_dict(state)
    assert target["clip"].activations == {"visual": "gelu_tanh", "text": "quick_gelu"}
    _assert_same_outputs(source, target["clip"], images)


def test_half_precision_openai_state_dict_loads_into_fp32(tiny, tmp_path):
    path = tmp_path / "openai_fp16.pt"
    state = {k: v.half() if v.ndim >= 2 else v for k, v in tiny.model.state_dict().items()}
    state["input_resolution"] = torch.tensor(48)  # marks OpenAI's layout
    torch.save(state, path)
    fresh = _fresh_tiny()
    load_clip_weights(fresh, path)
    weight = fresh.model.visual.conv1.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, tiny.model.visual.conv1.weight.half().float())


def _tiny_hf_config(**text_overrides):
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=32, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=0)
    text.update(text_overrides)
    vision = dict(hidden_size=96, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
                  image_size=48, patch_size=8)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def _hf_features(model, tokens, images):
    def unwrap(out):  # transformers 4 returns a tensor, 5 a model output with pooler_output
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    with torch.no_grad():
        return unwrap(model.get_text_features(input_ids=tokens)), unwrap(model.get_image_features(pixel_values=images))


def test_hugging_face_clipmodel_folder_matches_hf_features(images, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    hf = transformers.CLIPModel(_tiny_hf_config()).eval()
    hf.save_pretrained(tmp_path / "hf-tiny")

    ours = build_clip("tiny", weights=tmp_path / "hf-tiny").eval()
    assert read_clip_checkpoint(tmp_path / "hf-tiny").source == "huggingface"
    tokens = ours.tokenize(["a dog catches a frisbee", "a red square moves left then up"])
    text_ref, image_ref = _hf_features(hf, tokens, images)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(tokens).sentence, text_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_image(images).cls, image_ref, atol=1e-5, rtol=0)


def test_hugging_face_bin_without_config_defaults_to_quick_gelu(images, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(6)
    hf = transformers.CLIPModel(_tiny_hf_config()).eval()
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf.state_dict(), path)
    ours = _fresh_tiny()
    load_clip_weights(ours, path)
    text_ref, image_ref = _hf_features(hf, ours.tokenize(["a blue circle"]), images)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_text(ours.tokenize(["a blue circle"])).sentence, text_ref,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_image(images).cls, image_ref, atol=1e-5, rtol=0)


def test_hugging_face_head_count_mismatch_is_reported(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.CLIPModel(_tiny_hf_config(num_attention_heads=2)).save_pretrained(tmp_path / "hf2")
    with pytest.raises(CheckpointError, match="2 attention heads in the text tower, tiny has 4"):
        build_clip("tiny", weights=tmp_path / "hf2")


def test_hf_qkv_projections_fuse_in_q_k_v_order():
    q, k, v = (torch.full((2, 2), float(i)) for i in (1, 2, 3))
    state = {f"text_model.encoder.layers.0.self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))}
    state["visual_projection.weight"] = torch.arange(6.0).view(2, 3)  # [out=2, in=3]
    out = convert_hf_state_dict(state)
    assert out["transformer.resblocks.0.attn.in_proj_weight"][:, 0].tolist() == [1, 1, 2, 2, 3, 3]
    assert out["visual.proj"].tolist() == [[0, 3], [1, 4], [2, 5]]  # x @ proj needs [in, out]


# --- loading errors -----------------------------------------------------------------------------

def test_shorter_context_keeps_the_first_positional_embeddings(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    short = build_clip("tiny", weights=path, context_length=16).eval()
    assert torch.equal(short.model.positional_embedding, tiny.model.positional_embedding[:16])
    tokens = short.tokenize(["a dog catches a frisbee"])
    with torch.no_grad():
        torch.testing.assert_close(short.encode_text(tokens).sentence, tiny.encode_text(tokens).sentence,
                                   atol=1e-5, rtol=0)
    with pytest.raises(CheckpointError, match="have 32 text positions .* use context_length <= 32"):
        build_clip("tiny", weights=path, context_length=40)


def test_wrong_architecture_names_the_tensor_and_the_fitting_config(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    cfg = clip_config("tiny")
    cfg["vision_cfg"]["patch_size"] = 12  # a 4×4 grid: same widths, other patch embedding
    other = ClipBackbone("tiny-p12", _instantiate("tiny-p12", cfg))
    with pytest.raises(CheckpointError) as err:
        load_clip_weights(other, path)
    assert str(err.value) == (f"weights {path} do not fit tiny-p12: visual.conv1.weight has shape [96,3,8,8], "
                              "expected [96,3,12,12]; these weights fit tiny: build that CLIP architecture")
    assert guess_clip_name(tiny.model.state_dict()) == "tiny"


def test_missing_tensor_is_reported(tiny, tmp_path):
    state = dict(tiny.model.state_dict())
    del state["visual.proj"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"do not fit tiny: 1 tensors missing \(first: visual.proj\)"):
        build_clip("tiny", weights=path)


def test_non_clip_state_dict_is_reported(tmp_path):
    path = tmp_path / "resnet.pt"
    torch.save(nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"do not fit tiny: \d+ tensors missing .*not a CLIP ViT checkpoint"):
        build_clip("tiny", weights=path)


@pytest.mark.parametrize("name, content, message", [
    ("garbage.pt", b"this is not a checkpoint\n" * 10, "not a PyTorch checkpoint"),
    ("garbage.safetensors", b"\x00\x01junk", "not a readable safetensors file"),
])
def test_garbage_files_are_one_line_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as err:
        build_clip("tiny", weights=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_pickled_objects_are_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "obj": _NotATensor()}, path)
    with pytest.raises(CheckpointError, match="hold Python objects besides tensors and cannot be loaded safely"):
        build_clip("tiny", weights=path)


class _NotATensor:
    pass


def test_vidseek_model_checkpoint_is_named_as_such(tiny, tmp_path):
    import numpy as np

    path = tmp_path / "best.pt"  # the shape of train/checkpoint.py's payload
    torch.save({"format": 1, "vidseek_version": "0.1", "model": {"clip._extra_state": torch.zeros(2)},
                "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(CheckpointError, match="are a vidseek model checkpoint, not CLIP weights"):
        build_clip("tiny", weights=path)


def test_sharded_weights_with_index(tiny, images, tmp_path):
    import json

    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: state[k] for k in names}, str(tmp_path / shard))
    index = {"weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_same_outputs(tiny, build_clip("tiny", weights=tmp_path).eval(), images)


def test_missing_file_and_empty_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        build_clip("tiny", weights=tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="holds no CLIP weights"):
        build_clip("tiny", weights=tmp_path)
