"""PIG — Hybrid-Tower text-to-video retrieval (Lan et al., "Hybrid-Tower: Fine-grained
Pseudo-query Interaction and Generation for Text-to-Video Retrieval", 2025; METHODS.md "PIG").

Each video generates its own *pseudo-query* (a continuous text-space vector, no decoding) and
interacts with it before any real query arrives; the result is one D vector per video, so the
index size and the query cost are those of a two-tower model (the paper's central claim)::

    frames ─► video ViT (CLIP-ViP layout) ─► 4 global + T frame-CLS + patch tokens
                    │ ITS: top-k patches by the video CLS's last-layer attention (max over heads)
                    ▼
    generator: Linear(D, D_text) → [BOS] tokens [EOS] → copy of the CLIP text transformer (causal)
               → ln_final at EOS = pseudo-query q̂ [D_text] (the release: no text projection)
                    ▼
    fusion (X-Pool, 1 head): query q̂, keys/values the 4 + T CLS-type tokens
               LN1 → attention → out-proj → LN2 → a + Dropout(Linear(a)) → LN3 = video vector
    loss: symmetric InfoNCE (the release SUMS both directions) + w · mean(2 − 2·cos(q̂, caption EOT))

Backbones (`PIGConfig.backbone`):

* ``"vip"`` — the released CLIP-ViP-style video ViT on the CLIP image tower's own modules
  (conv1, positional embedding, ln_pre, residual blocks, ln_post, proj are *shared* with
  `clip.model.visual`, so they train at the CLIP learning rate). Sequence =
  [video CLS (CLIP's class embedding)] + `num_extra_cls` extra CLS (initialised from the class
  embedding) + per frame [frame CLS (a new token initialised from the class embedding) +
  patches]. Every CLS-type token gets positional row 0, patch i gets row 1+i, and a learnable
  temporal embedding (zero-initialised, row t for frame t) is added to frame t's CLS and
  patches. Attention (`vip_attention_mask`): the global tokens attend to every token; frame
  tokens attend to their own frame and the global tokens; padded frames are nobody's keys.
* ``"frames"`` — the release's CLIP4Clip variant (`clip_vision_additional_config.type =
  "CLIP4clip+pig"`): each frame through the unchanged image tower (`clip.encode_image(...,
  patches=True)`; works from extracted features too). The generator reads the time-mean of
  every token position — [frame CLS, patch 1 … patch P] averaged over the (real) frames, 1 + P
  tokens — with no ITS; the fusion keys are the T frame CLS features; the pooled token g (the
  baseline's video vector and the query of a fusion without generator) is the mean frame CLS.

`generator=False, fusion=False` is PIG's own two-tower baseline on the same backbone: the
video vector is the pooled token (video CLS for "vip", g for "frames"). With only
the generator, the video vector is the pseudo-query (the release without a fusioner); with
only the fusion, the pooled token is the query.

The pseudo-query lives in the text tower's width (the release feeds it, unprojected, to the
fusion and the generation loss, which needs text width = D as in every OpenAI CLIP). Where the
widths differ (our `tiny` CLIP: 96 vs 64), set `pseudo_query_projection=True` to map it
through a copy of the text projection, as the caption's sentence feature is.

The logit scale starts at exp(4.60) ≈ 99.5, the release's `logit_scale_init_value` (it
overwrites the checkpoint's value, with or without pretrained weights).

Training stages (supp. Table S3): stage 1 pre-trains the generator alone (generation loss
only, every other parameter frozen); stage 2 fine-tunes everything. A stage-1 checkpoint
loads into a stage-2 model unchanged (same parameter names); `load_stage1` copies only the
generator. In stage 1 the video vector is the normalised pseudo-query, so validation R@1
measures what stage 1 trains.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vidseek.encoders.temporal import masked_mean
from vidseek.encoders.tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID
from vidseek.encoders.weights import MLP_ACTIVATIONS, mlp_activation, set_mlp_activation
from vidseek.errors import CheckpointError, ConfigError
from vidseek.models.base import FrameFeatures, LossOutput, RetrievalModel, TextFeatures
from vidseek.models.losses import LogitScale, symmetric_infonce


@dataclass
class PIGConfig:
    """PIG settings; defaults are the released MSR-VTT configuration (`pig_base_32.json`)."""

    backbone: Literal["vip", "frames"] = "vip"
    num_extra_cls: int = 3  # CLIP-ViP "added_cls": 1 video CLS + 3 = 4 global tokens
    its_topk: int = 16  # patches the informativeness token selector keeps (supp. Fig. S1)
    generation_weight: float = 1.0  # weight of the generation loss in stage 2 (supp. Fig. S1); stage 1 uses it alone
    stage: int = 2  # 1: generator pre-training, 2: full fine-tuning
    fusion_dropout: float = 0.1
    generator: bool = True
    fusion: bool = True
    infonce_reduction: Literal["sum", "mean"] = "sum"  # the release sums t2v and v2t
    max_frames: int = 64  # rows of the temporal embedding ("vip")
    pseudo_query_projection: bool = False  # release: final-LN state at EOS, no text projection
    logit_scale_init: float = math.exp(4.60)  # release `logit_scale_init_value` 4.60 (log space)


@dataclass
class PIGFrameFeatures(FrameFeatures):
    """What the "vip" backbone hands to `encode_video_features` (all post-ln_post + proj, D)."""

    global_tokens: Tensor | None = None  # [B, G, D] video CLS + extra CLS
    selected_patches: Tensor | None = None  # [B, k, D] ITS-selected patches, best first


@dataclass
class PIGTokens:
    """A backbone's tokens as the generator and the fusion read them (all D wide)."""

    generator_tokens: Tensor  # [B, N, D] the generator's input, between BOS and EOS
    generator_valid: Tensor  # [B, N] bool, False at padded frames' tokens
    keys: Tensor  # [B, K, D] the fusion's keys / values
    key_mask: Tensor  # [B, K] bool
    pooled: Tensor  # [B, D] the baseline's video vector; the fusion's query without a generator


@dataclass
class PIGVideo:
    """A batch of videos as PIG represents them."""

    embedding: Tensor  # [B, D] L2-normalised video vector: the dense index entry
    pseudo_query: Tensor | None  # [B, D] generator output (not normalised); None without generator


# --- the video ViT (CLIP-ViP layout) -----------------------------------------------------------

def vip_attention_mask(num_frames: int, num_patches: int, num_global: int = 4,
                       frame_mask: Tensor | None = None) -> Tensor:
    """Which query may attend which key in the video ViT: bool [B | 1, L, L], True = allowed.

    Layout: L = num_global + num_frames·(1 + num_patches); the global tokens come first, then
    each frame's [frame CLS, patches]. Global tokens attend to every token; a frame's tokens
    attend to the global tokens and to their own frame (CLIP-ViP "in-frame attention", the
    release's `CLIPAttention.forward2`). Tokens of padded frames (frame_mask False) are no
    query's keys; their own queries still see the global tokens, so no softmax row is empty.
    """
    per_frame = 1 + num_patches
    length = num_global + num_frames * per_frame
    frame_of = torch.full((length,), -1, dtype=torch.long)  # -1: a global token
    frame_of[num_global:] = torch.arange(num_frames).repeat_interleave(per_frame)
    query_is_global = (frame_of < 0).unsqueeze(1)
    key_is_global = (frame_of < 0).unsqueeze(0)
    same_frame = frame_of.unsqueeze(1) == frame_of.unsqueeze(0)
    allowed = (query_is_global | key_is_global | same_frame).unsqueeze(0)  # [1, L, L]
    if frame_mask is None:
        return allowed
    frame_mask = frame_mask.bool().cpu()
    key_real = torch.cat([torch.ones(frame_mask.shape[0], num_global, dtype=torch.bool),
                          frame_mask.repeat_interleave(per_frame, dim=1)], dim=1)  # [B, L]
    return allowed & key_real.unsqueeze(1)


def select_informative_tokens(cls_attention: Tensor, candidates: Tensor, k: int) -> Tensor:
    """ITS (informativeness token selector): indices [B, k] of the k candidate positions the
    video CLS attends to most, best first.

    cls_attention [B, H, L]: the last vision layer's attention probabilities from the video CLS
    to every token, per head; they are reduced by the max over heads (release:
    `select_attention_scores_type="max"`). candidates: bool [L] or [B, L], False at the CLS /
    frame-CLS positions and at padded frames.
    """
    scores = cls_attention.amax(dim=1)
    candidates = candidates.expand_as(scores)
    available = int(candidates.sum(dim=1).min())
    if k > available:
        raise ConfigError(f"ITS keeps its_topk={k} patches but a video has only {available}; "
                          "lower its_topk or use more frames")
    scores = scores.masked_fill(~candidates, float("-inf"))
    return scores.topk(k, dim=1, largest=True, sorted=True).indices


class VideoViT(nn.Module):
    """The video-only parameters of the CLIP-ViP video ViT; the image tower's modules are passed
    in at call time (shared with `clip.model.visual`, not registered twice)."""

    def __init__(self, visual: nn.Module, num_extra_cls: int, max_frames: int):
        super().__init__()
        width = visual.class_embedding.shape[-1]
        self.extra_cls = nn.Parameter(torch.empty(num_extra_cls, width))
        self.frame_cls = nn.Parameter(torch.empty(width))
        self.temporal_embedding = nn.Parameter(torch.zeros(max_frames, width))
        self.copy_from(visual)

    @torch.no_grad()
    def copy_from(self, visual: nn.Module) -> None:
        """(Re)initialise the extra and frame CLS tokens from the image tower's class embedding."""
        self.extra_cls.copy_(visual.class_embedding.expand_as(self.extra_cls))
        self.frame_cls.copy_(visual.class_embedding)

    @property
    def num_global(self) -> int:
        return 1 + self.extra_cls.shape[0]

    def embed(self, visual: nn.Module, pixels: Tensor) -> Tensor:
        """pixels [B, T, 3, S, S] → token sequence [B, L, width] after ln_pre."""
        b, t = pixels.shape[:2]
        if t > self.temporal_embedding.shape[0]:
            raise ConfigError(f"PIG's video ViT has {self.temporal_embedding.shape[0]} temporal positions, "
                              f"got {t} frames; raise PIGConfig.max_frames or sample fewer frames")
        x = visual.conv1(pixels.flatten(0, 1))  # [B·T, width, grid, grid]
        x = x.flatten(2).transpose(1, 2).unflatten(0, (b, t))  # [B, T, P, width]
        pos = visual.positional_embedding.to(x.dtype)
        temporal = self.temporal_embedding[:t].to(x.dtype).unsqueeze(1)  # [T, 1, width]
        patches = x + pos[1:] + temporal
        frame_cls = (self.frame_cls + pos[0]).expand(b, t, 1, -1) + temporal
        frames = torch.cat([frame_cls, patches], dim=2).flatten(1, 2)  # [B, T·(1+P), width]
        global_tokens = torch.cat([visual.class_embedding.unsqueeze(0), self.extra_cls]) + pos[0]
        x = torch.cat([global_tokens.to(x.dtype).expand(b, -1, -1), frames], dim=1)
        return visual.ln_pre(x)

    def forward(self, visual: nn.Module, pixels: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """→ every token after ln_post + proj [B, L, D], and the last block's attention from the
        video CLS, per head [B, H, L]."""
        b, t = pixels.shape[:2]
        x = self.embed(visual, pixels)
        num_patches = (x.shape[1] - self.num_global) // t - 1
        padded = not bool(frame_mask.all())
        allowed = vip_attention_mask(t, num_patches, self.num_global, frame_mask if padded else None).to(x.device)
        blocks = visual.transformer.resblocks
        heads = blocks[0].attn.num_heads
        # open_clip casts attn_mask to the activations' dtype, so pass it additive (0 / -inf);
        # a per-video mask is only built when some video has padded frames.
        additive = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill(~allowed, float("-inf"))
        attn_mask = additive.repeat_interleave(heads, dim=0) if padded else additive[0]
        for block in blocks[:-1]:
            x = block(x, attn_mask=attn_mask)
        last_input = x
        x = blocks[-1](x, attn_mask=attn_mask)
        with torch.no_grad():  # ITS only needs the ranking: the video CLS row, keys as masked above
            h = blocks[-1].ln_1(last_input)
            cls_attention = blocks[-1].attn(h[:, :1], h, h, need_weights=True, average_attn_weights=False,
                                            key_padding_mask=~allowed[:, 0].expand(b, -1))[1][:, :, 0]
        return visual.ln_post(x) @ visual.proj, cls_attention


# --- pseudo-query generator ---------------------------------------------------------------------

class PseudoQueryGenerator(nn.Module):
    """Video tokens → one pseudo-query in the text embedding space (release `FeatureReconstructor`
    with `fr_model_type="CLIP-text-encoder"`, `use_bos_embeds=1`, `pick_eot`).

    Linear(D, D_text) maps each token into the text tower's input space; the sequence is
    [BOS] tokens [EOS] (BOS/EOS = the CLIP token-embedding rows of SOT 49406 / EOT 49407, fixed
    as in the release) plus the text positional embedding sliced to its length, through a
    SEPARATE copy of the CLIP text transformer (causal mask, initialised from the text tower),
    and its final LN, read at the EOS position: the pseudo-query in the text width (release
    `pick_eot` of `final_layer_norm`, no projection). With `project=True` it is then mapped by a
    copy of the text projection to D (for CLIPs whose text width differs from D).

    `positions`: rows of the positional embedding. The first rows copy the text tower's; a
    longer input (the "frames" backbone's 1 + P tokens + BOS/EOS, more than a `tiny` text
    tower's 32 positions) gets extra rows, initialised N(0, 0.01) as CLIP's own.
    """

    def __init__(self, clip: nn.Module, project: bool = False, positions: int = 0):
        super().__init__()
        text = clip.model
        width = text.transformer.width
        self.mapper = nn.Linear(clip.embed_dim, width)
        self.transformer = copy.deepcopy(text.transformer)
        self.ln_final = copy.deepcopy(text.ln_final)
        rows = max(positions, text.positional_embedding.shape[0])
        self.positional_embedding = nn.Parameter(torch.empty(rows, width).normal_(std=0.01))
        proj = text.text_projection
        if not project:
            self.text_projection = None
        elif isinstance(proj, nn.Parameter):
            self.text_projection = nn.Parameter(proj.detach().clone())
        else:
            self.text_projection = copy.deepcopy(proj)
        self.register_buffer("bos_embedding", torch.empty(width))
        self.register_buffer("eos_embedding", torch.empty(width))
        self.copy_from(clip)

    @torch.no_grad()
    def copy_from(self, clip: nn.Module) -> None:
        """(Re)initialise everything but the mapper from the CLIP text tower (weights, BOS/EOS
        rows and the MLP activation); positional rows beyond the text tower's are kept."""
        text = clip.model
        self.transformer.load_state_dict(text.transformer.state_dict())
        self.ln_final.load_state_dict(text.ln_final.state_dict())
        self.positional_embedding[: text.positional_embedding.shape[0]].copy_(text.positional_embedding)
        proj = text.text_projection
        if isinstance(self.text_projection, nn.Module):
            self.text_projection.load_state_dict(proj.state_dict())
        elif self.text_projection is not None:
            self.text_projection.copy_(proj)
        self.bos_embedding.copy_(text.token_embedding.weight[SOT_TOKEN_ID])
        self.eos_embedding.copy_(text.token_embedding.weight[EOT_TOKEN_ID])
        set_mlp_activation(self, "text", mlp_activation(text, "text"))

    # The MLP activation (QuickGELU for OpenAI weights) is no weight: keep it in checkpoints, as
    # ClipBackbone does for its towers, so a reloaded generator matches the trained one.
    def get_extra_state(self) -> Tensor:
        return torch.tensor([MLP_ACTIVATIONS.index(mlp_activation(self, "text"))])

    def set_extra_state(self, state: Tensor) -> None:
        set_mlp_activation(self, "text", MLP_ACTIVATIONS[int(state.reshape(-1)[0])])

    def forward(self, tokens: Tensor, valid: Tensor) -> Tensor:
        """tokens [B, N, D], valid bool [B, N] → pseudo-query [B, D].

        Each video's valid tokens are moved to the front (order kept) and EOS follows the last
        of them; the invalid ones (padded frames) land after EOS, where the causal mask makes
        them invisible to the EOS position.
        """
        b, n, _ = tokens.shape
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        tokens = torch.gather(tokens, 1, order.unsqueeze(-1).expand_as(tokens))
        mapped = self.mapper(tokens)
        seq = torch.cat([self.bos_embedding.to(mapped.dtype).expand(b, 1, -1), mapped,
                         self.eos_embedding.to(mapped.dtype).expand(b, 1, -1)], dim=1)
        eos_index = valid.sum(dim=1) + 1
        at_eos = torch.arange(n + 2, device=seq.device).unsqueeze(0) == eos_index.unsqueeze(1)
        seq = torch.where(at_eos.unsqueeze(-1), self.eos_embedding.to(seq.dtype), seq)
        return self.read_at(seq, eos_index)

    def read_at(self, embeds: Tensor, eos_index: Tensor) -> Tensor:
        """Input embeddings [B, L, D_text] → final-LN state at eos_index [B] → [B, D_text]
        (→ [B, D] through the text projection copy when the generator has one)."""
        length = embeds.shape[1]
        if length > self.positional_embedding.shape[0]:
            raise ConfigError(f"PIG's generator needs {length} positions but the text tower has "
                              f"{self.positional_embedding.shape[0]} (the preset's words); use more words, "
                              "fewer frames or a smaller its_topk")
        x = embeds + self.positional_embedding[:length].to(embeds.dtype)
        causal = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        x = self.ln_final(self.transformer(x, attn_mask=causal))
        x = x[torch.arange(x.shape[0], device=x.device), eos_index]
        proj = self.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Module) else x @ proj


# --- fusion -------------------------------------------------------------------------------------

class PseudoQueryFusion(nn.Module):
    """X-Pool-style single-head cross-attention of the pseudo-query over the CLS-type tokens
    (release `XPoolCrossAttentionPooler`, attn_temp 1). The same LN1 normalises query and keys;
    q/k/v/out and the residual Linear start as identities with zero bias (release
    `_init_parameters`: every "proj"/"linear" weight `eye_`)."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.linear = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        for layer in (self.q_proj, self.k_proj, self.v_proj, self.out_proj, self.linear):
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)

    def attention(self, query: Tensor, keys: Tensor, key_mask: Tensor) -> Tensor:
        """Softmax weights [B, K] of query [B, D] over keys [B, K, D] (masked keys get 0)."""
        q = self.q_proj(self.ln1(query))
        k = self.k_proj(self.ln1(keys))
        logits = (k @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.shape[-1])
        return logits.masked_fill(~key_mask, float("-inf")).softmax(dim=-1)

    def forward(self, query: Tensor, keys: Tensor, key_mask: Tensor) -> Tensor:
        """query [B, D], keys [B, K, D], key_mask bool [B, K] → fused vector [B, D]."""
        weights = self.attention(query, keys, key_mask)
        values = self.v_proj(self.ln1(keys))
        a = self.ln2(self.out_proj((weights.unsqueeze(-1) * values).sum(dim=1)))
        return self.ln3(a + self.dropout(self.linear(a)))


# --- the model ----------------------------------------------------------------------------------

class PIG(RetrievalModel):
    name: ClassVar[str] = "pig"

    def __init__(self, clip: nn.Module, config: PIGConfig | None = None):
        super().__init__(clip)
        self.config = cfg = config or PIGConfig()
        if cfg.backbone not in ("vip", "frames"):
            raise ConfigError(f"unknown PIG backbone {cfg.backbone!r}: use 'vip' or 'frames'")
        if cfg.stage not in (1, 2):
            raise ConfigError(f"PIG stage must be 1 (generator pre-training) or 2 (fine-tuning), got {cfg.stage}")
        if cfg.stage == 1 and not cfg.generator:
            raise ConfigError("PIG stage 1 pre-trains the generator: set generator=True or use stage 2")
        if cfg.infonce_reduction not in ("sum", "mean"):
            raise ConfigError(f"unknown infonce_reduction {cfg.infonce_reduction!r}: use 'sum' or 'mean'")
        if cfg.its_topk < 1 or cfg.num_extra_cls < 0:
            raise ConfigError(f"PIG needs its_topk >= 1 and num_extra_cls >= 0, got {cfg.its_topk}, {cfg.num_extra_cls}")
        text_width = clip.model.transformer.width
        if cfg.generator and not cfg.pseudo_query_projection and text_width != clip.embed_dim:
            raise ConfigError(f"PIG's pseudo-query is the text tower's final-LN state (width {text_width}) but "
                              f"{clip.name}'s joint width is {clip.embed_dim}; set pseudo_query_projection=True "
                              "to map it through the text projection")
        # The frame backbone reads patch tokens from the unchanged image tower (and from extracted features).
        self.needs_patches = cfg.backbone == "frames"
        # The "vip" backbone is its own video ViT: it cannot start from stored per-frame features,
        # so whoever embeds videos must decode frames and call `encode_frames`.
        self.needs_video_frames = cfg.backbone == "vip"
        self.vit = VideoViT(clip.model.visual, cfg.num_extra_cls, cfg.max_frames) if cfg.backbone == "vip" else None
        # "frames" feeds all 1 + P time-averaged token positions, wrapped in BOS/EOS.
        positions = 1 + clip.grid ** 2 + 2 if cfg.backbone == "frames" else 0
        self.generator = PseudoQueryGenerator(clip, cfg.pseudo_query_projection, positions) if cfg.generator else None
        self.fusion = PseudoQueryFusion(clip.embed_dim, cfg.fusion_dropout) if cfg.fusion else None
        self.logit_scale = LogitScale(init=cfg.logit_scale_init)
        self.register_load_state_dict_post_hook(PIG._rederive_clip_copies)
        if cfg.stage == 1:
            for name, param in self.named_parameters():
                param.requires_grad_(name.startswith("generator."))

    @staticmethod
    def _rederive_clip_copies(model: "PIG", incompatible: Any) -> None:
        """After a load that brought CLIP weights but not PIG's copies of them — `--init` from a
        two-tower checkpoint such as synth-clip-tiny — copy them again from the loaded towers, so
        the generator starts as *this* text tower (METHODS.md) rather than the one PIG was built on."""
        missing = set(incompatible.missing_keys)

        def absent(module_name: str, module: nn.Module) -> bool:
            return all(f"{module_name}.{key}" in missing for key in module.state_dict())

        if model.generator is not None and absent("generator", model.generator) \
                and not absent("clip.model.transformer", model.clip.model.transformer):
            model.generator.copy_from(model.clip)
        if model.vit is not None and {"vit.extra_cls", "vit.frame_cls"} <= missing \
                and "clip.model.visual.class_embedding" not in missing:
            model.vit.copy_from(model.clip.model.visual)

    # video side ------------------------------------------------------------------------------
    def encode_frames(self, frames: Tensor, mask: Tensor) -> FrameFeatures:
        if self.vit is None:
            return super().encode_frames(frames, mask)
        b, t = frames.shape[:2]
        if frames.ndim != 5 or frames.shape[-2:] != (self.clip.image_size, self.clip.image_size):
            raise ConfigError(f"frames must be [B, T, 3, {self.clip.image_size}, {self.clip.image_size}], "
                              f"got {list(frames.shape)}; resize frames to the model's image size")
        mask = mask.bool()
        tokens, cls_attention = self.vit(self.clip.model.visual, frames, mask)
        g = self.vit.num_global
        per_frame = (tokens.shape[1] - g) // t
        frame_cls_pos = g + per_frame * torch.arange(t, device=tokens.device)
        candidates = torch.ones(b, tokens.shape[1], dtype=torch.bool, device=tokens.device)
        candidates[:, :g] = False
        candidates[:, frame_cls_pos] = False
        candidates[:, g:] &= mask.repeat_interleave(per_frame, dim=1)
        chosen = select_informative_tokens(cls_attention, candidates, self.config.its_topk)
        return PIGFrameFeatures(
            frames=tokens[:, frame_cls_pos], mask=mask, patches=None, global_tokens=tokens[:, :g],
            selected_patches=torch.gather(tokens, 1, chosen.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])),
        )

    def video_tokens(self, feats: FrameFeatures) -> "PIGTokens":
        """What the generator reads and the fusion attends to, per backbone (module docstring)."""
        frame_mask = feats.mask.bool()
        b = frame_mask.shape[0]
        ones = lambda n: torch.ones(b, n, dtype=torch.bool, device=frame_mask.device)  # noqa: E731
        if isinstance(feats, PIGFrameFeatures) and feats.global_tokens is not None:  # "vip"
            keys = torch.cat([feats.global_tokens, feats.frames], dim=1)  # the 4 + T CLS-type tokens
            key_mask = torch.cat([ones(feats.global_tokens.shape[1]), frame_mask], dim=1)
            patches = feats.selected_patches
            return PIGTokens(generator_tokens=torch.cat([keys, patches], dim=1),
                             generator_valid=torch.cat([key_mask, ones(patches.shape[1])], dim=1),
                             keys=keys, key_mask=key_mask, pooled=feats.global_tokens[:, 0])
        if self.config.backbone == "vip":
            raise ConfigError("PIG with backbone 'vip' runs its own video ViT on decoded frames: train in mode "
                              "'frames', or use backbone 'frames' for extracted per-frame features")
        if feats.patches is None:
            raise ConfigError("PIG with backbone 'frames' needs patch tokens: extract features with patches "
                              "(the model sets needs_patches) or train in mode 'frames'")
        # Release "CLIP4clip+pig": every token position averaged over the frames, no ITS.
        tokens = torch.cat([feats.frames.unsqueeze(2), feats.patches], dim=2)  # [B, T, 1+P, D]
        tokens = masked_mean(tokens.flatten(2), frame_mask).unflatten(-1, tokens.shape[2:])
        return PIGTokens(generator_tokens=tokens, generator_valid=ones(tokens.shape[1]),
                         keys=feats.frames, key_mask=frame_mask, pooled=tokens[:, 0])

    def encode_video_features(self, feats: FrameFeatures) -> PIGVideo:
        tokens = self.video_tokens(feats)
        pseudo_query = None
        if self.generator is not None:
            pseudo_query = self.generator(tokens.generator_tokens, tokens.generator_valid)
        if self.config.stage == 1:
            video = pseudo_query
        elif self.fusion is not None:
            query = pseudo_query if pseudo_query is not None else tokens.pooled
            video = self.fusion(query, tokens.keys, tokens.key_mask)
        else:
            video = pseudo_query if pseudo_query is not None else tokens.pooled
        return PIGVideo(embedding=F.normalize(video, dim=-1), pseudo_query=pseudo_query)

    # scoring / training ----------------------------------------------------------------------
    def score(self, text: TextFeatures, video: PIGVideo) -> Tensor:
        return F.normalize(text.sentence, dim=-1) @ video.embedding.t()

    def generation_loss(self, pseudo_query: Tensor, caption: Tensor) -> Tensor:
        """mean(2 − 2·cos(q̂, caption EOT feature)) — the release's "l2" loss on normalised vectors."""
        return (2 - 2 * F.cosine_similarity(pseudo_query, caption, dim=-1)).mean()

    def loss(self, text: TextFeatures, video: PIGVideo) -> LossOutput:
        terms: dict[str, float] = {}
        total, logits = None, None
        if self.config.stage == 2:
            scale = self.logit_scale()
            logits = scale * self.score(text, video)
            infonce = symmetric_infonce(logits)  # mean of the two directions
            if self.config.infonce_reduction == "sum":
                infonce = 2 * infonce
            total = infonce
            terms.update(infonce=float(infonce.detach()), logit_scale=float(scale.detach()))
        if video.pseudo_query is not None:
            generation = self.generation_loss(video.pseudo_query, text.sentence)
            weight = 1.0 if self.config.stage == 1 else self.config.generation_weight
            total = weight * generation if total is None else total + weight * generation
            terms["generation"] = float(generation.detach())
        return LossOutput(total, terms, logits)

    def index_video(self, video: PIGVideo) -> Tensor:
        return video.embedding


def load_stage1(model: PIG, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Copy a stage-1 checkpoint's generator into a (stage-2) PIG model; returns the keys copied.

    Every `generator.*` entry of the model must be present with the same shape (strict for the
    generator); everything else keeps its current weights. A full stage-1 state dict also
    loads with `model.load_state_dict(state, strict=True)`: the stages share parameter names.
    """
    if model.generator is None:
        raise ConfigError("this PIG model has no generator (generator=False): nothing to hand over from stage 1")
    own = {k: v for k, v in model.state_dict().items() if k.startswith("generator.")}
    missing = [k for k in own if k not in state_dict]
    wrong = [k for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    if missing or wrong:
        raise CheckpointError(f"not a stage-1 PIG checkpoint of this backbone: missing {missing[:3]}, "
                              f"shape mismatch {wrong[:3]}; pass the stage-1 run's best.pt")
    model.load_state_dict({k: state_dict[k] for k in own}, strict=False)
    return sorted(own)


# --- presets ------------------------------------------------------------------------------------

#: Datasets of the paper's tables (MSR-VTT-1k = 9k/1k-A, MSR-VTT-3k = 7k/full test, MSVD, VATEX,
#: DiDeMo) → (data-option overrides, frames, words). Supp. Table S3: 12 frames / 50 words;
#: DiDeMo 32 / 64 (the CLIP-ViP setting).
_PAPER_DATASETS: dict[str, tuple[dict[str, Any], int, int]] = {
    "msrvtt9k": ({}, 12, 50),
    "msrvtt7k": ({"test_split": "full"}, 12, 50),
    "msvd": ({}, 12, 50),
    "vatex": ({}, 12, 50),
    "didemo": ({}, 32, 64),
}

_PAPER_ANCHORS = {
    "msrvtt9k": "PIG, MSR-VTT-1k: +1.6–3.9 T2V R@1 over its baseline (abstract); V2T R@1 47.5 with B/32 (supp. Table S2)",
    "msrvtt7k": "PIG, MSR-VTT-3k: +1.6–3.9 T2V R@1 over its baseline (abstract); V2T R@1 56.6 with B/32 (supp. Table S2)",
    "msvd": "PIG, MSVD: +1.6–3.9 T2V R@1 over its baseline across the five benchmarks (abstract)",
    "vatex": "PIG, VATEX: +1.6–3.9 T2V R@1 over its baseline across the five benchmarks (abstract)",
    "didemo": "PIG, DiDeMo: +1.6–3.9 T2V R@1 over its baseline across the five benchmarks (abstract)",
}

#: (name part, model_config, what it is)
_VARIANTS: list[tuple[str, dict[str, Any], str]] = [
    ("pig-stage1", {"stage": 1}, "PIG stage 1 (generator pre-training, generation loss only)"),
    ("pig", {"stage": 2}, "PIG stage 2 (full fine-tuning; start from stage 1 with --init)"),
    ("pig-baseline", {"generator": False, "fusion": False}, "PIG's two-tower baseline (same video ViT, no generator/fusion)"),
]


def register_presets(register: Callable[[Any], Any], Preset: type, synth_train: Callable[..., Any],
                     paper_train: Callable[..., Any], datasets: list[tuple]) -> None:
    """Paper presets `<dataset>-pig[-stage1|-baseline]-<b32|b16>` (supp. Table S3: batch 128,
    AdamW wd 0.2, cosine with 1 % warmup, 100 epochs, lr 1e-4 stage 1 / 1e-6 stage 2 on every
    parameter) and the tiny synthetic presets `synth-pig-stage1-tiny`, `synth-pig-tiny`,
    `synth-pig-baseline-tiny` (tiny CLIP, "frames" backbone, CPU minutes)."""
    for ds, fmt, opts, _frames, _words, _epochs, desc in datasets:
        if ds not in _PAPER_DATASETS:
            continue
        overrides, frames, words = _PAPER_DATASETS[ds]
        for backbone, clip in (("b32", "ViT-B-32"), ("b16", "ViT-B-16")):
            for part, model_config, what in _VARIANTS:
                lr = 1e-4 if model_config.get("stage") == 1 else 1e-6
                register(Preset(
                    name=f"{ds}-{part}-{backbone}",
                    description=f"{what} on {desc}, {clip}",
                    model="pig",
                    clip=clip,
                    frames=frames,
                    words=words,
                    model_config=dict(model_config),
                    data_format=fmt,
                    data_options={**opts, **overrides},
                    train=paper_train(epochs=100, batch_size=128, lr=lr, clip_lr_coef=1.0, weight_decay=0.2,
                                      warmup_fraction=0.01, grad_clip=1.0),
                    reference=_PAPER_ANCHORS.get(ds, "") if part == "pig" else "",
                ))
    # The synth recipe trains methods on frozen image-tower features (start from synth-clip-tiny
    # with --init; stage 2 from stage 1), which only the "frames" backbone can read; the "vip"
    # backbone re-runs its own video ViT on pixels (mode "frames"). "frames" is the release's
    # CLIP4Clip variant. The tiny CLIP's text width (96) is not its joint width (64), so the
    # pseudo-query goes through the text projection (the release assumes equal widths).
    for part, model_config, what in _VARIANTS:
        projection = {"pseudo_query_projection": True} if model_config.get("generator", True) else {}
        register(Preset(
            name=f"synth-{part}-tiny",
            description=f"{what} on the synthetic benchmark, tiny CLIP, frame backbone (CPU minutes)",
            model="pig",
            clip="tiny",
            frames=8,
            words=32,
            model_config={"backbone": "frames", **projection, **model_config},
            data_format="jsonl",
            train=synth_train(lr=1e-3, clip_lr_coef=1.0, hard_negatives=True),
        ))


__all__ = [
    "PIG",
    "PIGConfig",
    "PIGFrameFeatures",
    "PIGTokens",
    "PIGVideo",
    "PseudoQueryFusion",
    "PseudoQueryGenerator",
    "VideoViT",
    "load_stage1",
    "select_informative_tokens",
    "vip_attention_mask",
]
