"""CLIP text and image towers (Radford et al. 2021) on top of open_clip's `CLIP` module.

`ClipBackbone` exposes what the retrieval models need beyond open_clip's pooled features:

* text: the projected feature of *every* token (word-level features, e.g. for TCMGC / PIG) next
  to the sentence feature read at the EOT token (CLIP §2.4);
* image: the projected patch tokens (ViT §3.1 tokens after `ln_post`, mapped by the same `proj`
  as the CLS token — the "dense CLIP" reading used by patch-level methods) and the attention
  probabilities of the last residual block.

Pooled outputs are computed with the same operations as open_clip, so `sentence` and `cls` equal
`CLIP.encode_text` / `CLIP.encode_image` bit for bit. Nothing is downloaded: `build_clip` starts
from random init and loads weights only from a local path (`vidseek.encoders.weights`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vidseek.encoders.configs import CLIP_CONFIGS, clip_config, known_config_names  # noqa: F401 - re-exported
from vidseek.encoders.tokenizer import tokenize as _tokenize
from vidseek.encoders.tokenizer import used_length
from vidseek.encoders.weights import MLP_ACTIVATIONS, load_clip_weights, mlp_activation, set_mlp_activation
from vidseek.errors import ConfigError
from vidseek.models.base import TextFeatures

#: Top-level config keys `build_clip` understands; others (CoCa's multimodal_cfg, custom_text …)
#: belong to architectures without the CLIP text tower layout.
_CONFIG_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "init_logit_scale", "init_logit_bias"}


@dataclass
class ImageFeatures:
    """Image tower outputs. D = joint embedding width, P = grid² patches."""

    cls: Tensor  # [N, D] projected CLS token (ln_post, then @ proj): open_clip's encode_image
    patches: Tensor | None = None  # [N, P, D] projected patch tokens (ln_post, then @ proj)
    attention: Tensor | None = None  # [N, heads, 1+P, 1+P] last block's attention probabilities


def _unsupported(name: str, why: str) -> ConfigError:
    return ConfigError(f"CLIP architecture '{name}' is not supported ({why}); vidseek needs a ViT image "
                       f"tower with a class token and CLIP's text tower, e.g. {', '.join(CLIP_CONFIGS)}")


def _instantiate(name: str, cfg: dict[str, Any]) -> nn.Module:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    extra = set(cfg) - _CONFIG_KEYS
    if extra:
        raise _unsupported(name, f"config has {', '.join(sorted(extra))}")
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    if "timm_model_name" in vision or not isinstance(vision.get("layers", 12), int):
        raise _unsupported(name, "its image tower is not a ViT")
    if "hf_model_name" in text:
        raise _unsupported(name, "its text tower is a Hugging Face model")
    if vision.get("attentional_pool") or vision.get("pool_type", "tok") != "tok" \
            or vision.get("final_ln_after_pool") or vision.get("patch_dropout", 0.0) > 0:
        raise _unsupported(name, "its image features are not the CLS token after ln_post")
    return CLIP(
        embed_dim=cfg["embed_dim"],
        vision_cfg=CLIPVisionCfg(**vision),
        text_cfg=CLIPTextCfg(**text),
        quick_gelu=cfg.get("quick_gelu", False),
        init_logit_bias=cfg.get("init_logit_bias"),
        **({"init_logit_scale": cfg["init_logit_scale"]} if "init_logit_scale" in cfg else {}),
    )


def _check_blocks(name: str, model: nn.Module) -> None:
    from open_clip.transformer import ResidualAttentionBlock

    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        if not isinstance(block, ResidualAttentionBlock) or not isinstance(block.attn, nn.MultiheadAttention):
            raise _unsupported(name, "it uses custom attention blocks")


class ClipBackbone(nn.Module):
    """CLIP's two towers with token-level outputs. `model` is the open_clip `CLIP` module itself
    (PIG and others reuse `model.visual`, `model.transformer`, `model.token_embedding` directly)."""

    def __init__(self, name: str, model: nn.Module):
        super().__init__()
        _check_blocks(name, model)
        self.name = name
        self.model = model
        visual = model.visual
        self.embed_dim: int = int(visual.output_dim)
        self.image_size: int = int(visual.image_size[0])
        self.patch_size: int = int(visual.patch_size[0])
        self.grid: int = int(visual.grid_size[0])
        self.context_length: int = int(model.context_length)

    # The MLP activation is architecture, not a weight, yet OpenAI / HF weights need QuickGELU.
    # Saving it as the module's extra state (a small tensor, so tensor-only checkpoint code keeps
    # it) makes any checkpoint holding this backbone's state dict restore it on load_state_dict.
    _TOWERS = ("visual", "text")

    @property
    def activations(self) -> dict[str, str]:
        """Tower → MLP activation ("gelu" | "quick_gelu" | "gelu_tanh")."""
        return {tower: mlp_activation(self.model, tower) for tower in self._TOWERS}

    def get_extra_state(self) -> Tensor:
        return torch.tensor([MLP_ACTIVATIONS.index(mlp_activation(self.model, t)) for t in self._TOWERS])

    def set_extra_state(self, state: Tensor) -> None:
        for tower, code in zip(self._TOWERS, state.tolist()):
            set_mlp_activation(self.model, tower, MLP_ACTIVATIONS[int(code)])

    # text tower ------------------------------------------------------------------------------
    def tokenize(self, texts: list[str], context_length: int | None = None) -> Tensor:
        """Texts → LongTensor [B, L] (L = context_length or the tower's); truncation keeps EOT last."""
        length = context_length or self.context_length
        if length > self.context_length:
            raise ConfigError(f"context_length {length} exceeds the text tower's {self.context_length} "
                              f"positions; use at most {self.context_length}")
        return _tokenize(texts, length)

    def _project_text(self, x: Tensor) -> Tensor:
        proj = self.model.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(self, tokens: Tensor, skip_padding: bool = False) -> TextFeatures:
        """tokens [B, L ≤ context_length] → sentence [B, D] (EOT token, CLIP §2.4), words [B, L, D]
        (every position after ln_final, projected) and mask [B, L] (True from SOT to EOT).

        `skip_padding=True` runs the tower only on the positions up to the batch's last EOT
        (`used_length`): sentence and the words at SOT .. EOT are the same (causal attention), the
        words after the batch's last EOT are zeros instead of the tower's padding outputs. For
        models that never read padding positions (pooled-sentence recall, masked attention)."""
        from open_clip.transformer import text_global_pool

        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ConfigError(f"text tokens must be [batch, <= {self.context_length}], got {list(tokens.shape)}; "
                              "tokenize with ClipBackbone.tokenize")
        if skip_padding:
            full = tokens.shape[1]
            used = self.encode_text(tokens[:, :used_length(tokens)])
            pad = full - used.words.shape[1]
            return TextFeatures(sentence=used.sentence, words=F.pad(used.words, (0, 0, 0, pad)),
                                mask=F.pad(used.mask, (0, pad), value=False))
        m = self.model
        length = tokens.shape[1]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype)
        # Causal attention: the first L positions of a shorter sequence equal those of a padded one.
        x = x + m.positional_embedding[:length].to(cast_dtype)
        attn_mask = None if m.attn_mask is None else m.attn_mask[:length, :length]
        x = m.transformer(x, attn_mask=attn_mask)
        x = m.ln_final(x)
        # Pool before projecting, exactly as open_clip, so `sentence` matches encode_text bitwise.
        pooled = text_global_pool(x, tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        eot_index = tokens.argmax(dim=-1, keepdim=True)
        # Not `tokens != 0`: id 0 is a real BPE token ("!"), so padding is "after EOT".
        mask = torch.arange(length, device=tokens.device).unsqueeze(0) <= eot_index
        return TextFeatures(sentence=self._project_text(pooled), words=self._project_text(x), mask=mask)

    # image tower -----------------------------------------------------------------------------
    def _embed_patches(self, images: Tensor) -> Tensor:
        v = self.model.visual
        x = v.conv1(images)  # [N, width, grid, grid]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [N, P, width]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)
        return v.ln_pre(x)

    def encode_image(self, images: Tensor, patches: bool = False, attention: bool = False) -> ImageFeatures:
        """images [N, 3, S, S] (CLIP-normalised) → CLS feature [N, D]; optionally patch features
        [N, P, D] and the last block's per-head attention probabilities [N, heads, 1+P, 1+P]."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (self.image_size, self.image_size):
            raise ConfigError(f"images must be [N, 3, {self.image_size}, {self.image_size}] for {self.name}, "
                              f"got {list(images.shape)}; resize frames to the model's image size")
        v = self.model.visual
        x = self._embed_patches(images)
        last_block = v.transformer.resblocks[-1]
        captured: list[Tensor] = []
        handle = last_block.register_forward_pre_hook(lambda _mod, args: captured.append(args[0])) \
            if attention else None
        try:
            x = v.transformer(x)  # the stock forward, so grad checkpointing etc. behave as in open_clip
        finally:
            if handle is not None:
                handle.remove()
        x = v.ln_post(x)
        cls = x[:, 0] @ v.proj
        patch_feats = x[:, 1:] @ v.proj if patches else None
        attn = None
        if attention:
            # The stock block asks MHA for need_weights=False (fused kernel); recompute the same
            # attention on the same block input, keeping each head's probabilities.
            h = last_block.ln_1(captured[-1])
            attn = last_block.attn(h, h, h, need_weights=True, average_attn_weights=False)[1]
        return ImageFeatures(cls=cls, patches=patch_feats, attention=attn)

    def forward(self, images: Tensor | None = None, tokens: Tensor | None = None
                ) -> tuple[ImageFeatures | None, TextFeatures | None]:
        return (None if images is None else self.encode_image(images),
                None if tokens is None else self.encode_text(tokens))


def build_clip(name: str, weights: str | Path | None = None, context_length: int | None = None) -> ClipBackbone:
    """Build the CLIP architecture `name` (random init), then load local `weights` if given.

    `context_length` shortens (or, for random init, sets) the text tower's positions; loaded
    weights keep their first `context_length` positional embeddings. Never downloads anything.
    """
    cfg = clip_config(name)
    if context_length is not None:
        if context_length < 2:
            raise ConfigError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        cfg["text_cfg"]["context_length"] = context_length
    backbone = ClipBackbone(name, _instantiate(name, cfg))
    if weights is not None:
        load_clip_weights(backbone, weights)
    return backbone
