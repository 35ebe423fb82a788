"""Load CLIP weights from a local file into an open_clip `CLIP` module (never from a hub).

Accepted layouts (all end up in open_clip's key names, which are OpenAI's original names):

1. OpenAI's released `.pt` — a TorchScript archive (read with `torch.jit.load(...).state_dict()`)
   or a plain state dict with the same keys. OpenAI trained with QuickGELU (CLIP code release,
   `model.py`), so a TorchScript archive switches the MLP activations to QuickGELU.
2. open_clip checkpoints: `{"state_dict": ...}` or a raw state dict, optionally with DDP's
   `module.` prefix or the CustomTextCLIP `text.` prefix; `.pt` / `.bin` / `.safetensors`.
3. Hugging Face `CLIPModel` weights (`model.safetensors`, `pytorch_model.bin`, sharded via
   `*.index.json`, or a folder holding them): keys are renamed and the separate q/k/v
   projections fused into `nn.MultiheadAttention`'s `in_proj`. A `config.json` beside the
   weights gives the activation (`hidden_act`) and head counts, which the state dict cannot.

Every mismatch ends in one `CheckpointError` line that names the file and the first thing that
did not fit, plus the architecture the file does fit when we can tell.
"""
from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vidseek.encoders.configs import CLIP_CONFIGS, clip_config, known_config_names
from vidseek.errors import CheckpointError

#: Non-weight entries some checkpoints carry (OpenAI's TorchScript attributes, HF's buffers).
_IGNORED_KEYS = {"input_resolution", "context_length", "vocab_size"}
_IGNORED_SUFFIXES = ("position_ids",)

#: File names tried, in order, when the weights path is a folder.
_FOLDER_CANDIDATES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)

#: MLP activations a CLIP tower can use (the order is their code in `ClipBackbone`'s extra state).
MLP_ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")
#: HF `hidden_act` → our activation names.
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh"}


@dataclass
class ClipCheckpoint:
    """A checkpoint read from disk and converted to open_clip's `CLIP` key layout."""

    path: Path
    source: str  # "openai", "open_clip" or "huggingface"
    state_dict: dict[str, Tensor]
    #: Tower ("visual" / "text") → MLP activation the weights were trained with, when the format says.
    activations: dict[str, str] = field(default_factory=dict)
    #: Tower → attention heads, when the format says (HF config.json); shapes cannot tell.
    heads: dict[str, int] = field(default_factory=dict)


# --- reading files ------------------------------------------------------------------------------

def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _is_vidseek_checkpoint(path: Path) -> bool:
    # train/checkpoint.py pickles RNG states (needs full unpickling); its payload names this key.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
        return bool(pickles) and b"vidseek_version" in archive.read(pickles[0])


def _load_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for every corruption
        raise CheckpointError(f"weights {path} are not a readable safetensors file "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                              "pass a CLIP checkpoint") from err


def _load_torch_file(path: Path) -> tuple[Any, bool]:
    """(loaded object, whether it was a TorchScript archive — the container OpenAI released)."""
    if _is_torchscript_archive(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").state_dict(), True
        except Exception as err:
            raise CheckpointError(f"weights {path} are a TorchScript archive that cannot be loaded "
                                  f"({type(err).__name__}); pass a CLIP checkpoint") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError as err:
        # weights_only refuses arbitrary Python objects: we never execute a checkpoint's pickle code.
        if _is_vidseek_checkpoint(path):
            raise CheckpointError(f"weights {path} are a vidseek model checkpoint, not CLIP weights; load it "
                                  "with vidseek.load(...) or pass it to `vidseek train --init`") from err
        raise CheckpointError(f"weights {path} hold Python objects besides tensors and cannot be "
                              "loaded safely; save just the state dict (torch.save(model.state_dict()))"
                              ) from err
    except Exception as err:
        raise CheckpointError(f"weights {path} are not a PyTorch checkpoint ({type(err).__name__}); "
                              "pass an OpenAI .pt, open_clip or Hugging Face CLIP weights file") from err


def _load_sharded(index_path: Path) -> dict[str, Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"weights index {index_path} is not a valid shard index "
                              "(needs a 'weight_map'); pass the folder of a CLIPModel save") from err
    state: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        state.update(_load_raw(index_path.parent / shard)[0])
    return state


def _load_raw(path: Path) -> tuple[Any, bool]:
    if not path.exists():
        raise CheckpointError(f"weights file {path} not found; pass the path of a local CLIP checkpoint")
    if path.name.endswith(".index.json"):
        return _load_sharded(path), False
    if path.suffix == ".safetensors":
        return _load_safetensors(path), False
    return _load_torch_file(path)


def weights_file(path: str | Path) -> Path:
    """The file holding the weights at `path` (a folder means its model file); CheckpointError if none."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _resolve_folder(path)
    if not path.is_file():
        raise CheckpointError(f"CLIP weights {path} not found; pass the path of a local weights file")
    return path


def _resolve_folder(folder: Path) -> Path:
    for name in _FOLDER_CANDIDATES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"folder {folder} holds no CLIP weights (looked for {', '.join(_FOLDER_CANDIDATES)}); "
                          "pass the weights file itself")


def _as_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"weights {path} hold a {type(obj).__name__}, not a state dict; "
                              "pass a CLIP checkpoint")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise CheckpointError(f"weights {path} contain no tensors; pass a CLIP checkpoint")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}  # saved from a DDP wrapper
    return {k: v for k, v in state.items()
            if k not in _IGNORED_KEYS and not k.endswith(_IGNORED_SUFFIXES)}


def _read_hf_config(weights_path: Path) -> dict[str, Any] | None:
    config_path = weights_path.parent / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or "text_config" not in config or "vision_config" not in config:
        return None  # some other model's config.json: not ours to interpret
    return config


def _hf_tower_settings(config: dict[str, Any] | None, path: Path) -> tuple[dict[str, str], dict[str, int]]:
    # CLIPConfig defaults (transformers' configuration_clip.py): quick_gelu, heads from the checkpoint.
    activations = {"visual": "quick_gelu", "text": "quick_gelu"}
    heads: dict[str, int] = {}
    if config is None:
        return activations, heads
    for tower, key in (("visual", "vision_config"), ("text", "text_config")):
        sub = config.get(key) or {}
        act = sub.get("hidden_act", "quick_gelu")
        if act not in _HF_ACTIVATIONS:
            raise CheckpointError(f"weights {path} use activation '{act}' in the {tower} tower, which a "
                                  f"CLIP ViT cannot run (supported: {', '.join(_HF_ACTIVATIONS)})")
        activations[tower] = _HF_ACTIVATIONS[act]
        if "num_attention_heads" in sub:
            heads[tower] = int(sub["num_attention_heads"])
    return activations, heads


# --- Hugging Face → open_clip key conversion ------------------------------------------------------

_HF_TOWER_PREFIX = {"text_model.": "", "vision_model.": "visual."}
_HF_LAYER = re.compile(r"^(text_model|vision_model)\.encoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER_PARTS = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
_HF_SINGLE = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF's spelling
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
# nn.Linear stores [out, in]; open_clip's projections are parameters used as `x @ proj`: [in, out].
_HF_TRANSPOSED = {"text_projection.weight": "text_projection",
                  "visual_projection.weight": "visual.proj"}


def is_hf_state_dict(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("text_model.", "vision_model.")) for k in state)


def convert_hf_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """HF `CLIPModel` keys → open_clip `CLIP` keys; q/k/v fused in that order (MHA's in_proj layout).

    Keys this conversion does not know keep their HF name, so the fit check reports them.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, tuple[str, Tensor]]] = {}
    for key, value in state.items():
        if key in _HF_SINGLE:
            out[_HF_SINGLE[key]] = value
        elif key in _HF_TRANSPOSED:
            out[_HF_TRANSPOSED[key]] = value.t().contiguous()
        elif (match := _HF_LAYER.match(key)) is not None:
            tower, layer, part = match.groups()
            block = f"{_HF_TOWER_PREFIX[tower + '.']}transformer.resblocks.{layer}."
            proj = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", part)
            if proj is not None:
                qkv.setdefault((block, proj.group(2)), {})[proj.group(1)] = (key, value)
            elif part in _HF_LAYER_PARTS:
                out[block + _HF_LAYER_PARTS[part]] = value
            else:
                out[key] = value
        else:
            out[key] = value
    for (block, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            out.update(dict(parts.values()))  # incomplete: the fit check reports in_proj as missing
            continue
        out[f"{block}attn.in_proj_{kind}"] = torch.cat([parts[p][1] for p in "qkv"], dim=0)
    return out


def _strip_custom_text_prefix(state: dict[str, Tensor]) -> dict[str, Tensor]:
    # open_clip's CustomTextCLIP keeps the text tower under `text.`; CLIP keeps it at the top level.
    if "text.token_embedding.weight" not in state:
        return state
    return {k[len("text."):] if k.startswith("text.") else k: v for k, v in state.items()}


def read_clip_checkpoint(path: str | Path) -> ClipCheckpoint:
    """Read any supported weights file (or folder) into open_clip's `CLIP` key layout."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = _resolve_folder(path)
    raw, is_torchscript = _load_raw(path)
    carries_openai_attrs = isinstance(raw, Mapping) and "input_resolution" in raw
    state = _as_state_dict(raw, path)
    if is_hf_state_dict(state):
        activations, heads = _hf_tower_settings(_read_hf_config(path), path)
        return ClipCheckpoint(path, "huggingface", convert_hf_state_dict(state), activations, heads)
    state = _strip_custom_text_prefix(state)
    if is_torchscript or carries_openai_attrs:
        return ClipCheckpoint(path, "openai", state, {"visual": "quick_gelu", "text": "quick_gelu"})
    return ClipCheckpoint(path, "open_clip", state)


# --- architecture of a state dict ---------------------------------------------------------------

def _count_blocks(state: Mapping[str, Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in state if (m := pattern.match(k))})


def state_dict_architecture(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """Shape-determined numbers of a CLIP ViT state dict (open_clip layout), or None if not one."""
    needed = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "ln_final.weight",
              "token_embedding.weight", "positional_embedding", "text_projection")
    if not all(k in state for k in needed):
        return None
    conv = state["visual.conv1.weight"]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vision_layers = _count_blocks(state, "visual.transformer.resblocks.")
    fc = state.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    return {
        "embed_dim": int(state["visual.proj"].shape[1]),
        "vision_width": int(conv.shape[0]),
        "patch_size": int(conv.shape[-1]),
        "image_size": int(conv.shape[-1]) * grid,
        "vision_layers": vision_layers,
        "vision_mlp_ratio": None if fc is None else fc.shape[0] / conv.shape[0],
        "text_width": int(state["ln_final.weight"].shape[0]),
        "text_layers": _count_blocks(state, "transformer.resblocks."),
        "vocab_size": int(state["token_embedding.weight"].shape[0]),
        "context_length": int(state["positional_embedding"].shape[0]),
    }


def config_architecture(config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The same numbers from an open_clip-style config dict, or None for non-ViT / non-CLIP configs."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    if (not isinstance(vision.get("layers", 12), int) or "timm_model_name" in vision
            or "hf_model_name" in text or not isinstance(vision.get("image_size", 224), int)):
        return None
    width = vision.get("width", 768)
    return {
        "embed_dim": config["embed_dim"],
        "vision_width": width,
        "patch_size": vision.get("patch_size", 16),
        "image_size": vision.get("image_size", 224),
        "vision_layers": vision.get("layers", 12),
        "vision_mlp_ratio": vision.get("mlp_ratio", 4.0),
        "text_width": text.get("width", 512),
        "text_layers": text.get("layers", 12),
        "vocab_size": text.get("vocab_size", 49408),
        "context_length": text.get("context_length", 77),
    }


def guess_clip_name(state: Mapping[str, Tensor]) -> str | None:
    """The first known CLIP config (ours first, then open_clip's, shortest name first) whose
    shapes match this state dict; None if none does."""
    arch = state_dict_architecture(state)
    if arch is None:
        return None
    others = sorted((n for n in known_config_names() if n not in CLIP_CONFIGS), key=lambda n: (len(n), n))
    for name in [*CLIP_CONFIGS, *others]:
        cand = config_architecture(clip_config(name))
        if cand is None:
            continue
        # A shorter text context fits (we keep the first positions); everything else must be equal.
        if all(cand[k] == arch[k] for k in arch if k not in ("context_length", "vision_mlp_ratio")) \
                and cand["context_length"] <= arch["context_length"] \
                and (arch["vision_mlp_ratio"] is None or cand["vision_mlp_ratio"] == arch["vision_mlp_ratio"]):
            return name
    return None


# --- fitting and loading ------------------------------------------------------------------------

def _shape(t: Tensor | torch.Size) -> str:
    return "[" + ",".join(str(s) for s in (t.shape if isinstance(t, Tensor) else t)) + "]"


def _fit_error(ckpt: ClipCheckpoint, model_name: str, what: str) -> CheckpointError:
    guess = guess_clip_name(ckpt.state_dict)
    if guess is not None and guess != model_name:
        hint = f"these weights fit {guess}: build that CLIP architecture"
    elif state_dict_architecture(ckpt.state_dict) is None:
        hint = "this is not a CLIP ViT checkpoint"
    else:
        hint = "pass weights saved from the same architecture"
    return CheckpointError(f"weights {ckpt.path} do not fit {model_name}: {what}; {hint}")


def _fit_text_context(ckpt: ClipCheckpoint, expected: Mapping[str, Tensor], model_name: str) -> None:
    # A shorter context (e.g. 32 words for video captions) keeps the first positional embeddings:
    # with CLIP's causal mask, positions < L never see later ones, so they are unchanged.
    have, want = ckpt.state_dict.get("positional_embedding"), expected.get("positional_embedding")
    if have is None or want is None or have.ndim != 2 or have.shape[1:] != want.shape[1:]:
        return
    if have.shape[0] > want.shape[0]:
        ckpt.state_dict["positional_embedding"] = have[: want.shape[0]].clone()
    elif have.shape[0] < want.shape[0]:
        raise CheckpointError(f"weights {ckpt.path} have {have.shape[0]} text positions but {model_name} was "
                              f"built with context_length {want.shape[0]}; use context_length <= {have.shape[0]}")


def _check_fits(ckpt: ClipCheckpoint, clip: nn.Module, model_name: str) -> None:
    expected = clip.state_dict()
    # Derived buffers (the causal attn_mask) are not weights, but TorchScript archives store them.
    for name, _ in clip.named_buffers():
        if name not in expected:
            ckpt.state_dict.pop(name, None)
    _fit_text_context(ckpt, expected, model_name)
    provided = ckpt.state_dict
    # Report the patch embedding first: its shape names the patch size, the likeliest mix-up.
    for key in sorted(expected, key=lambda k: k != "visual.conv1.weight"):
        want, have = expected[key], provided.get(key)
        if have is not None and have.shape != want.shape:
            raise _fit_error(ckpt, model_name, f"{key} has shape {_shape(have)}, expected {_shape(want)}")
    missing = [k for k in expected if k not in provided]
    if missing:
        raise _fit_error(ckpt, model_name, f"{len(missing)} tensors missing (first: {missing[0]})")
    unexpected = [k for k in provided if k not in expected]
    if unexpected:
        raise _fit_error(ckpt, model_name, f"{len(unexpected)} tensors {model_name} does not have "
                                           f"(first: {unexpected[0]})")
    towers = {"visual": clip.visual.transformer.resblocks, "text": clip.transformer.resblocks}
    for tower, heads in ckpt.heads.items():
        have_heads = towers[tower][0].attn.num_heads
        if have_heads != heads:
            raise CheckpointError(f"weights {ckpt.path} use {heads} attention heads in the {tower} tower, "
                                  f"{model_name} has {have_heads}; pass the matching --clip architecture")


def _activation_module(name: str) -> nn.Module:
    from open_clip.transformer import QuickGELU

    return {"quick_gelu": QuickGELU, "gelu": nn.GELU,
            "gelu_tanh": lambda: nn.GELU(approximate="tanh")}[name]()


def _tower_blocks(clip: nn.Module, tower: str) -> nn.ModuleList:
    return clip.visual.transformer.resblocks if tower == "visual" else clip.transformer.resblocks


def set_mlp_activation(clip: nn.Module, tower: str, activation: str) -> None:
    """Use `activation` (one of `MLP_ACTIVATIONS`) in every MLP of one tower ("visual" | "text").

    The activation is not stored in a state dict, yet weights are only right with the one they
    were trained with (OpenAI CLIP: QuickGELU, x·σ(1.702x)).
    """
    if activation not in MLP_ACTIVATIONS:
        raise ValueError(f"unknown MLP activation {activation!r}; use one of {MLP_ACTIVATIONS}")
    for block in _tower_blocks(clip, tower):
        block.mlp.gelu = _activation_module(activation)


def mlp_activation(clip: nn.Module, tower: str) -> str:
    """The activation (one of `MLP_ACTIVATIONS`) used by the MLPs of one tower."""
    from open_clip.transformer import QuickGELU

    act = _tower_blocks(clip, tower)[0].mlp.gelu
    if isinstance(act, QuickGELU):
        return "quick_gelu"
    if isinstance(act, nn.GELU):
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    raise ValueError(f"{tower} tower uses {type(act).__name__}, not one of {MLP_ACTIVATIONS}")


def load_clip_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local CLIP checkpoint (OpenAI .pt, open_clip, Hugging Face) into `model` in place.

    `model` is a `ClipBackbone` or an open_clip `CLIP`. Raises `CheckpointError` (one line) when
    the file is missing, unreadable, or does not fit the architecture.
    """
    clip = getattr(model, "model", model)
    model_name = getattr(model, "name", type(clip).__name__)
    ckpt = read_clip_checkpoint(path)
    _check_fits(ckpt, clip, model_name)
    with torch.no_grad():
        clip.load_state_dict(ckpt.state_dict, strict=True)  # copy_ casts fp16 OpenAI weights to fp32
    for tower, activation in ckpt.activations.items():
        set_mlp_activation(clip, tower, activation)
