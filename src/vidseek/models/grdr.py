"""GRDR: generative recall with multi-view semantic IDs (seed `003_*`; METHODS.md, "GRDR").

Pieces, in the order data flows through them::

    pooled video feature x [D] ─► MultiViewTokenizer: N_v views z_v = W_v·x ─► residual quantiser
        (L levels × K codes, tables shared by all views, cosine assignment, STE) ─► codes [N_v, L]
        └─► per-view Linear decoder, mean over views ─► reconstruction of x
    query text ─► text encoder (CLIP text tower, or a tiny transformer) ─► GenerativeRetriever:
        decoder input at step i = codebook_(i-1)[previous code] (a learned start vector at step 0),
        logits_i = scale · cos(h_i, codebook_i rows)  — the SAME tables as the tokenizer
    inference: trie-constrained beam search (`vidseek.index.trie`) → IDs → candidate videos.

Faithful to the authors' release (`JasonCodeMaker/GRDR`) unless an option says otherwise:
- the residual passed to the next level is `r − e` with r the *unnormalised* residual and e the
  chosen codebook row, while assignment and the quantiser loss use the L2-normalised residual;
- quantiser loss per level MSE(e, sg r̂) + β·MSE(sg e, r̂), averaged over levels (β = 0.65);
- logit scale = exp(s), s initialised at ln 100, clamped to [20, 100], shared by the query-side
  and video-side code logits;
- the contrastive loss is an unnormalised dot product between the summed decoder states and the
  routed view's latent, cross-entropy over the batch in the query→video direction only.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vidseek.encoders.tokenizer import used_length
from vidseek.errors import CheckpointError, ConfigError, SearchIndexError
from vidseek.index.trie import SemanticIdTrie
from vidseek.models.base import LossOutput

#: Codebook size K per level used by the release for each benchmark (METHODS.md).
CODEBOOK_SIZE_BY_DATASET = {"msrvtt": 128, "activitynet": 128, "didemo": 96, "lsmdc": 200}

#: Loss weights of the three phases of each progressive loop (release `run.py` defaults).
#: cl = contrastive, ce = current-code CE, earlier = CE on earlier codes (query + video side),
#: rec = reconstruction, rq = quantiser.
DEFAULT_PHASE_LOSS_WEIGHTS: dict[str, dict[str, float]] = {
    "pretrain": {"cl": 0.5, "ce": 0.0, "earlier": 0.5, "rec": 0.0, "rq": 0.0},
    "main": {"cl": 0.2, "ce": 0.5, "earlier": 0.8, "rec": 0.1, "rq": 0.3},
    "fit": {"cl": 0.0, "ce": 1.0, "earlier": 1.0, "rec": 0.0, "rq": 0.0},
}
LOSS_TERMS = ("cl", "ce", "earlier", "rec", "rq")

CHECKPOINT_FORMAT = "vidseek.grdr"
CHECKPOINT_VERSION = 1


@dataclass
class GRDRConfig:
    """Hyper-parameters of GRDR. Defaults = the release's MSR-VTT configuration."""

    embed_dim: int = 512  # D: width of the pooled video feature
    num_views: int = 4  # N_v
    levels: int = 3  # L: codes per semantic ID
    codebook_size: int = 128  # K per level (CODEBOOK_SIZE_BY_DATASET)
    beta: float = 0.65  # commitment weight of the quantiser loss
    label_smoothing: float = 0.1  # on the current-code CE
    logit_scale_init: float = 100.0
    logit_scale_min: float = 20.0
    logit_scale_max: float = 100.0
    latent_dim: int | None = None  # view latent = codebook = decoder width; None → embed_dim
    decoder_layers: int = 2
    decoder_heads: int = 8
    dropout: float = 0.1  # T5's dropout rate
    text_encoder: str = "tiny"  # "clip" (a ClipBackbone passed in) | "tiny" (own transformer)
    text_width: int = 256  # tiny text encoder only
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 32  # tokens per query for the tiny encoder
    #: what the summed decoder states are contrasted with: "latent" (the routed view's latent,
    #: METHODS.md) or "residual" (the residual entering the level being trained).
    contrastive_target: str = "latent"
    #: cluster→view mapping of query-guided routing: "release" (view = k-means label as sklearn
    #: numbers it) or "first_appearance" (clusters numbered by their first caption).
    route_order: str = "release"
    loss_weights: dict[str, dict[str, float]] = field(
        default_factory=lambda: {p: dict(w) for p, w in DEFAULT_PHASE_LOSS_WEIGHTS.items()})
    lr: float = 1e-4  # AdamW, constant
    new_codebook_lr_scale: float = 10.0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    kmeans_iters: int = 50

    def __post_init__(self) -> None:
        if self.text_encoder not in ("clip", "tiny"):
            raise ConfigError(f"GRDR text_encoder must be 'clip' or 'tiny', got '{self.text_encoder}'")
        if self.contrastive_target not in ("latent", "residual"):
            raise ConfigError(
                f"GRDR contrastive_target must be 'latent' or 'residual', got '{self.contrastive_target}'")
        if self.route_order not in ("release", "first_appearance"):
            raise ConfigError(
                f"GRDR route_order must be 'release' or 'first_appearance', got '{self.route_order}'")
        for name in ("num_views", "levels", "codebook_size", "embed_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GRDR {name} must be >= 1, got {getattr(self, name)}")
        if not self.logit_scale_min <= self.logit_scale_init <= self.logit_scale_max:
            raise ConfigError("GRDR logit_scale_init must lie within [logit_scale_min, logit_scale_max]")
        for phase, weights in self.loss_weights.items():
            unknown = set(weights) - set(LOSS_TERMS)
            if unknown:
                raise ConfigError(f"GRDR loss weights for '{phase}' name unknown terms {sorted(unknown)}; "
                                  f"use {list(LOSS_TERMS)}")

    @property
    def width(self) -> int:
        return self.latent_dim or self.embed_dim

    @classmethod
    def for_dataset(cls, dataset: str, **overrides: Any) -> "GRDRConfig":
        """The release's configuration for a benchmark (codebook size per dataset)."""
        key = dataset.lower()
        if key not in CODEBOOK_SIZE_BY_DATASET:
            raise ConfigError(f"no GRDR codebook size for dataset '{dataset}'; "
                              f"choose one of {sorted(CODEBOOK_SIZE_BY_DATASET)} or set codebook_size")
        return cls(codebook_size=CODEBOOK_SIZE_BY_DATASET[key], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GRDRConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --- tokenizer -----------------------------------------------------------------------------------

@dataclass
class LevelQuantization:
    """One residual-quantiser level applied to every view."""

    quantized: Tensor  # [B, N_v, W] straight-through output (value = codebook row, grad → input)
    codes: Tensor  # [B, N_v] long
    cosine: Tensor  # [B, N_v, K] cos(normalised residual, normalised codebook rows)
    loss: Tensor  # scalar MSE(e, sg r̂) + β·MSE(sg e, r̂)


@dataclass
class TokenizerOutput:
    latents: Tensor  # [B, N_v, W] view latents z_v = W_v·x
    residuals: list[Tensor]  # per level, the (unnormalised) residual entering it, [B, N_v, W]
    cosine: list[Tensor]  # per level, [B, N_v, K]
    codes: Tensor  # [B, N_v, levels]
    quantized: Tensor  # [B, N_v, W] Σ over levels of the STE outputs
    reconstruction: Tensor  # [B, D]
    rq_loss: Tensor  # scalar, mean over levels


class MultiViewTokenizer(nn.Module):
    """Query-guided multi-view video tokenizer (paper §"multi-view tokenizer"; release VideoRQVAE).

    N_v Linear(D, W) view projections, L codebooks [K, W] shared by all views, N_v Linear(W, D)
    decoders whose outputs are averaged into the reconstruction.
    """

    def __init__(self, config: GRDRConfig):
        super().__init__()
        self.config = config
        d, w, k = config.embed_dim, config.width, config.codebook_size
        self.views = nn.ModuleList([nn.Linear(d, w) for _ in range(config.num_views)])
        # Release init: uniform(±1/K); the level's table is re-initialised by k-means before use.
        self.codebooks = nn.ParameterList(
            [nn.Parameter(torch.empty(k, w).uniform_(-1.0 / k, 1.0 / k)) for _ in range(config.levels)])
        self.decoders = nn.ModuleList([nn.Linear(w, d) for _ in range(config.num_views)])

    def latents(self, video_feats: Tensor) -> Tensor:
        """[B, D] → view latents [B, N_v, W]."""
        return torch.stack([view(video_feats) for view in self.views], dim=1)

    def quantize_level(self, residual: Tensor, level: int) -> LevelQuantization:
        """Quantise a residual [..., W] with codebook `level` (assignment on its L2 normalisation)."""
        return self.quantize_normalized(F.normalize(residual, dim=-1, eps=1e-12), level)

    def quantize_normalized(self, r_hat: Tensor, level: int) -> LevelQuantization:
        """Quantise a unit-norm residual r̂: cosine argmax over codebook `level`, straight-through
        output r̂ + sg(e − r̂) (value e, gradient passed to r̂ unchanged)."""
        table = self.codebooks[level]
        cosine = r_hat @ F.normalize(table, dim=-1, eps=1e-12).t()
        codes = cosine.argmax(dim=-1)
        chosen = table[codes]
        loss = F.mse_loss(chosen, r_hat.detach()) + self.config.beta * F.mse_loss(chosen.detach(), r_hat)
        quantized = r_hat + (chosen - r_hat).detach()
        return LevelQuantization(quantized=quantized, codes=codes, cosine=cosine, loss=loss)

    def reconstruct(self, quantized: Tensor) -> Tensor:
        """Per-view decoders, mean over views: [B, N_v, W] → [B, D]."""
        return torch.stack([dec(quantized[:, v]) for v, dec in enumerate(self.decoders)], dim=1).mean(dim=1)

    def forward(self, video_feats: Tensor, levels: int | None = None) -> TokenizerOutput:
        levels = self.config.levels if levels is None else levels
        latents = self.latents(video_feats)
        residual = latents
        residuals, cosines, codes, losses = [], [], [], []
        quantized = torch.zeros_like(latents)
        for level in range(levels):
            residuals.append(residual)
            out = self.quantize_level(residual, level)
            cosines.append(out.cosine)
            codes.append(out.codes)
            losses.append(out.loss)
            quantized = quantized + out.quantized
            residual = residual - self.codebooks[level][out.codes].detach()
        return TokenizerOutput(
            latents=latents, residuals=residuals, cosine=cosines, codes=torch.stack(codes, dim=-1),
            quantized=quantized, reconstruction=self.reconstruct(quantized),
            rq_loss=torch.stack(losses).mean())

    @torch.no_grad()
    def encode(self, video_feats: Tensor, levels: int | None = None, batch_size: int = 8192) -> Tensor:
        """Semantic IDs of every video under every view: [N, D] → LongTensor [N, N_v, L]."""
        levels = self.config.levels if levels is None else levels
        device = self.codebooks[0].device
        out = []
        for start in range(0, len(video_feats), batch_size):
            x = video_feats[start:start + batch_size].to(device=device, dtype=torch.float32)
            residual = self.latents(x)
            codes = []
            for level in range(levels):
                c = self.quantize_level(residual, level).codes
                codes.append(c)
                residual = residual - self.codebooks[level][c]
            out.append(torch.stack(codes, dim=-1).cpu())
        if not out:
            return torch.zeros(0, self.config.num_views, levels, dtype=torch.long)
        return torch.cat(out)


# --- query-guided view routing ---------------------------------------------------------------------

def route_captions(
    caption_embs_per_video: Sequence[Tensor | np.ndarray],
    num_views: int,
    seed: int,
    order: str = "release",
) -> list[list[int]]:
    """Query-guided views: k-means (k = min(N_v, #captions)) over each video's caption embeddings;
    caption j of video n supervises only view `routes[n][j]`.

    Cluster→view mapping: with `order="release"` the view is the k-means label exactly as
    scikit-learn numbers the clusters (the release: `KMeans(k, random_state, n_init=3,
    max_iter=20)`; a video with one caption, or one whose k-means fails, routes everything to
    view 0). With `order="first_appearance"` clusters are renumbered by their first caption, so
    caption 0 always routes to view 0 and the mapping no longer depends on sklearn's numbering.
    """
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    if order not in ("release", "first_appearance"):
        raise ConfigError(f"route order must be 'release' or 'first_appearance', got '{order}'")
    routes: list[list[int]] = []
    for embs in caption_embs_per_video:
        embs = np.asarray(embs.detach().cpu() if isinstance(embs, Tensor) else embs, dtype=np.float64)
        n = len(embs)
        k = min(num_views, n)
        if k <= 1:
            routes.append([0] * n)
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                labels = KMeans(n_clusters=k, random_state=seed, n_init=3, max_iter=20,
                                algorithm="lloyd").fit_predict(embs)
        except ValueError:
            labels = np.zeros(n, dtype=int)
        if order == "first_appearance":
            _, first = np.unique(labels, return_index=True)
            rank = {int(labels[i]): r for r, i in enumerate(np.sort(first))}
            labels = np.array([rank[int(lab)] for lab in labels])
        routes.append([int(v) for v in labels])
    return routes


# --- text encoders -----------------------------------------------------------------------------------

class TinyTextEncoder(nn.Module):
    """Small randomly initialised transformer over CLIP BPE ids (vocab 49408) for tiny presets."""

    def __init__(self, config: GRDRConfig):
        super().__init__()
        from vidseek.encoders.tokenizer import CLIP_VOCAB_SIZE

        w = config.text_width
        self.context_length = config.context_length
        self.token_embedding = nn.Embedding(CLIP_VOCAB_SIZE, w)
        self.position = nn.Parameter(torch.randn(config.context_length, w) * 0.01)
        layer = nn.TransformerEncoderLayer(w, config.text_heads, 4 * w, config.dropout,
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(w)
        self.out_dim = w

    def tokenize(self, texts: list[str]) -> Tensor:
        from vidseek.encoders.tokenizer import tokenize

        return tokenize(texts, self.context_length)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        from vidseek.encoders.tokenizer import EOT_TOKEN_ID

        tokens = tokens[:, : self.context_length]
        # Real tokens: SOT .. EOT (padding id 0 is also a real BPE id, so use the EOT position).
        eot = (tokens == EOT_TOKEN_ID).int().argmax(dim=1)
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot[:, None]
        x = self.token_embedding(tokens) + self.position[: tokens.shape[1]]
        x = self.transformer(x, src_key_padding_mask=~mask)
        return self.final_norm(x), mask


class ClipTextEncoder(nn.Module):
    """Adapter over the lead's `ClipBackbone`: word states [B, L, D] and mask from `encode_text`."""

    def __init__(self, backbone: nn.Module, out_dim: int):
        super().__init__()
        self.backbone = backbone
        self.out_dim = out_dim

    def tokenize(self, texts: list[str]) -> Tensor:
        return self.backbone.tokenize(texts)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.backbone.encode_text(tokens)
        return feats.words, feats.mask.bool()


# --- generative retriever ------------------------------------------------------------------------------

class BeamDecoderBlock(nn.Module):
    """Pre-norm transformer decoder block (causal self-attention, cross-attention, MLP) over
    x [B, M, S, W]: M hypotheses (beams) per query share that query's memory, so the memory's
    keys/values are projected once per query instead of once per beam — at 100 beams the
    per-beam projection would dominate decoding cost."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ConfigError(f"GRDR decoder width {width} is not divisible by decoder_heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.norm_self, self.norm_cross, self.norm_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_qkv, self.self_out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.cross_q, self.cross_kv, self.cross_out = nn.Linear(width, width), nn.Linear(width, 2 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys/values of the memory [B, L, W] → two [B, H, L, W/H]."""
        b, length, w = memory.shape
        k, v = self.cross_kv(memory).reshape(b, length, 2, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        return k, v

    def cross_query(self, x: Tensor) -> Tensor:
        """Cross-attention queries of the residual stream x [..., W] (before the head split)."""
        return self.cross_q(self.norm_cross(x))

    def cross_and_mlp(self, x: Tensor, kv: tuple[Tensor, Tensor], mask: Tensor, query: Tensor | None = None
                      ) -> Tensor:
        """Cross-attention to the memory, then the MLP, on x [B, M, S, W]; `query` = the
        precomputed `cross_query(x)` when the caller has it."""
        b, m, s, w = x.shape
        p = self.dropout if self.training else 0.0
        query = self.cross_query(x) if query is None else query
        q = query.reshape(b, m * s, self.heads, w // self.heads).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask[:, None, None, :], dropout_p=p)
        x = x + self.drop(self.cross_out(a.transpose(1, 2).reshape(b, m, s, w)))
        return x + self.drop(self.mlp(self.norm_mlp(x)))

    def _self_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, m, s, w = x.shape
        q, k, v = self.self_qkv(self.norm_self(x)).reshape(b, m, s, 3, self.heads, w // self.heads).permute(3, 0, 1, 4, 2, 5)
        return q, k, v  # each [B, M, H, S, W/H]

    def forward(self, x: Tensor, memory: Tensor, mask: Tensor) -> Tensor:
        """All S positions at once (training, teacher forcing), causal self-attention."""
        return self.cross_and_mlp(self.self_attention(x), self.memory_kv(memory), mask)

    def self_attention(self, x: Tensor) -> Tensor:
        """Residual stream after causal self-attention, all S positions of x [B, M, S, W]."""
        b, m, s, w = x.shape
        q, k, v = (t.reshape(b * m, self.heads, s, w // self.heads) for t in self._self_qkv(x))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return x + self.drop(self.self_out(a.transpose(1, 2).reshape(b, m, s, w)))

    def step(self, x: Tensor, past: list[tuple[Tensor, Tensor]], kv: tuple[Tensor, Tensor],
             mask: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One new position x [B, M, 1, W] attending to the cached keys/values of the earlier
        positions (past: per position, two [B, M, H, W/H]) → output and this position's keys and
        values (two [B, M, H, W/H])."""
        b, m, _, w = x.shape
        q, k, v = (t[:, :, :, 0] for t in self._self_qkv(x))  # [B, M, H, d]
        keys = torch.stack([p[0] for p in past] + [k], dim=3)  # [B, M, H, i+1, d]
        values = torch.stack([p[1] for p in past] + [v], dim=3)
        # One query against ≤ L keys per beam: elementwise products and a short softmax cost less
        # than a fused attention call over B·M·H tiny problems.
        weights = ((keys * q.unsqueeze(3)).sum(-1) * (w // self.heads) ** -0.5).softmax(-1)  # [B, M, H, i+1]
        a = (weights.unsqueeze(-1) * values).sum(3)
        x = x + self.drop(self.self_out(a.reshape(b, m, 1, w)))
        return self.cross_and_mlp(x, kv, mask), (k, v)


class GenerativeRetriever(nn.Module):
    """Text encoder + small causal transformer decoder over semantic-ID codes (release: T5).

    Decoder input at step i: the start vector (i = 0) or codebook_(i-1)[c_(i-1)]; output logits at
    step i: scale · cos(h_i, codebook_i rows). `codebooks` is the tokenizer's ParameterList —
    the same tensors, not copies (the "shared codebook" that bridges text and video).
    """

    def __init__(self, config: GRDRConfig, text_encoder: nn.Module, codebooks: nn.ParameterList):
        super().__init__()
        self.config = config
        w = config.width
        self.text_encoder = text_encoder
        self.text_proj = nn.Identity() if text_encoder.out_dim == w else nn.Linear(text_encoder.out_dim, w)
        self.codebooks = codebooks
        self.start = nn.Parameter(torch.randn(w) * 0.02)
        self.step_position = nn.Parameter(torch.randn(config.levels, w) * 0.02)
        self.blocks = nn.ModuleList(
            [BeamDecoderBlock(w, config.decoder_heads, config.dropout) for _ in range(config.decoder_layers)])
        self.final_norm = nn.LayerNorm(w)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(config.logit_scale_init)))

    def logit_scale(self) -> Tensor:
        return self.log_logit_scale.exp().clamp(self.config.logit_scale_min, self.config.logit_scale_max)

    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """tokens [B, L] → decoder memory [B, L', W] and mask [B, L'] (True at real tokens), L' =
        positions up to the batch's last EOT: the decoder's cross-attention masks padding, so
        dropping trailing padding before the text encoder changes nothing but its cost."""
        states, mask = self.text_encoder(tokens[:, :used_length(tokens)])
        return self.text_proj(states), mask

    def decoder_inputs(self, prefixes: Tensor) -> Tensor:
        """prefixes [B, M, i] → decoder inputs [B, M, i+1, W]: the start vector, then
        codebook_j[c_j], plus the step positions."""
        b, m, i = prefixes.shape
        inputs = [self.start.expand(b, m, -1)]
        inputs += [self.codebooks[j][prefixes[:, :, j]] for j in range(i)]
        return torch.stack(inputs, dim=2) + self.step_position[: i + 1]

    def decode_beams(self, memory: Tensor, mask: Tensor, prefixes: Tensor) -> Tensor:
        """prefixes [B, M, i] (M hypotheses per query) → hidden states [B, M, i+1, W]."""
        x = self.decoder_inputs(prefixes)
        for block in self.blocks:
            x = block(x, memory, mask)
        return self.final_norm(x)

    def decode(self, memory: Tensor, mask: Tensor, prev_codes: Tensor) -> Tensor:
        """Teacher forcing: prev_codes [B, i] → hidden states [B, i+1, W]."""
        return self.decode_beams(memory, mask, prev_codes.unsqueeze(1))[:, 0]

    def code_logits(self, hidden: Tensor) -> Tensor:
        """hidden [B, S, W] → logits [B, S, K], step j scored against codebook j."""
        h = F.normalize(hidden, dim=-1, eps=1e-12)
        logits = [h[:, j] @ F.normalize(self.codebooks[j], dim=-1, eps=1e-12).t() for j in range(h.shape[1])]
        return torch.stack(logits, dim=1) * self.logit_scale()

    def step_logits(self, memory: Tensor, mask: Tensor, prefixes: Tensor) -> Tensor:
        """Beam-search step without a cache: prefixes [B, M, i] → logits of code i [B, M, K]."""
        i = prefixes.shape[2]
        hidden = self.decode_beams(memory, mask, prefixes.to(memory.device))[:, :, -1]
        return self.level_logits(hidden, i)

    def level_logits(self, hidden: Tensor, level: int) -> Tensor:
        """scale · cos(hidden [..., W], codebook_level rows) → [..., K]."""
        h = F.normalize(hidden, dim=-1, eps=1e-12)
        return h @ F.normalize(self.codebooks[level], dim=-1, eps=1e-12).t() * self.logit_scale()


class PrefixStates:
    """Decoder block 0's prefix-only work, precomputed once per trie node (index time).

    Block 0's input at step i is codebook_(i-1)[c_(i-1)] + position i and its causal
    self-attention sees only the earlier inputs, so everything up to its cross-attention query
    depends on the ID prefix c_0..c_(i-1) alone, not on the text: per node of trie level i, the
    residual stream after self-attention and the cross-attention query. Beam search then reads
    them by node instead of running block 0's self-attention (its QKV and output projections and
    the cross-query projection: ~18% of the decoder's multiply-adds at width 256), and block 0
    needs no key/value cache. Memory: 2·W floats per prefix node (trie levels 0 … L−1).
    """

    def __init__(self, retriever: "GenerativeRetriever", trie: SemanticIdTrie, batch: int = 4096):
        self.trie = trie
        block = retriever.blocks[0]
        device = retriever.start.device
        self.residual: list[Tensor] = []  # per level i: [nodes at level i, W]
        self.cross_query: list[Tensor] = []
        with torch.no_grad():
            for level in range(trie.levels):
                prefixes = torch.from_numpy(trie.node_prefixes(level)).to(device)
                residual = []
                for first in range(0, len(prefixes), batch):  # bounded memory: [batch, level+1, W]
                    x = block.self_attention(retriever.decoder_inputs(prefixes[first:first + batch, None]))
                    residual.append(x[:, 0, level])
                self.residual.append(torch.cat(residual))
                self.cross_query.append(block.cross_query(self.residual[-1]))

    def lookup(self, prefixes: Tensor) -> tuple[Tensor, Tensor]:
        """prefixes [r, c, i] → (residual, cross query) [r, c, W] of each beam's trie node. A prefix
        outside the trie (a dead beam, whose scores the search discards) reads node 0."""
        r, c, i = prefixes.shape
        node = self.trie.nodes(prefixes.reshape(r * c, i).cpu()).clamp(min=0).to(self.residual[i].device)
        return self.residual[i][node].view(r, c, -1), self.cross_query[i][node].view(r, c, -1)


class IncrementalDecoder:
    """Step function for `SemanticIdTrie.constrained_beam_search` with a key/value cache.

    Each call decodes only the newest position of the beams it is given (any subset of queries,
    any contiguous run of beams). The self-attention keys/values of every decoded position are
    kept per level, `[B, beams, H, d]`, and a beam's past is gathered from its ancestors' slots;
    the memory's cross-attention keys/values are projected once per query. With `prefix_states`
    (built for the trie being searched) block 0's self-attention is read per trie node instead
    of computed, and only the later blocks keep a cache. Same logits as `step_logits` (which
    recomputes every position), to float rounding.
    """

    def __init__(self, retriever: GenerativeRetriever, memory: Tensor, mask: Tensor,
                 prefix_states: PrefixStates | None = None):
        self.retriever, self.mask, self.prefix_states = retriever, mask, prefix_states
        self.memory_kv = [block.memory_kv(memory) for block in retriever.blocks]
        #: first block with a key/value cache (block 0 comes from the prefix table when given)
        self.first_cached = 0 if prefix_states is None else 1
        #: per level, per cached block: (keys, values) [B, beams so far, H, d] of that level's position
        self.levels: list[list[tuple[Tensor, Tensor]]] = []

    def _store(self, level: int, block: int, rows: Tensor, first: int, k: Tensor, v: Tensor) -> None:
        if level == len(self.levels):
            self.levels.append([])
        slots = self.levels[level]
        c = k.shape[1]
        if block == len(slots):
            b = self.mask.shape[0]
            slots.append(tuple(t.new_zeros(b, first + c, *t.shape[2:]) for t in (k, v)))
        stored = slots[block]
        if stored[0].shape[1] < first + c:  # a later chunk of beams: grow the level's slots (doubling)
            grow = max(first + c, 2 * stored[0].shape[1]) - stored[0].shape[1]
            stored = tuple(torch.cat([t, t.new_zeros(t.shape[0], grow, *t.shape[2:])], dim=1) for t in stored)
            slots[block] = stored
        stored[0][rows, first:first + c] = k
        stored[1][rows, first:first + c] = v

    @torch.no_grad()
    def __call__(self, prefixes: Tensor, ancestors: Tensor, rows: Tensor, first: int) -> Tensor:
        r = self.retriever
        _, _, i = prefixes.shape
        device = self.mask.device
        rows_d = rows.to(device)
        every_query = len(rows) == self.mask.shape[0]
        if first == 0:  # a new level (or a new search): forget states from level i on
            del self.levels[i:]
        mask = self.mask if every_query else self.mask[rows_d]

        def memory_kv(n: int) -> tuple[Tensor, Tensor]:
            kv = self.memory_kv[n]
            return kv if every_query else (kv[0][rows_d], kv[1][rows_d])

        if self.prefix_states is not None:
            residual, query = self.prefix_states.lookup(prefixes)
            x = r.blocks[0].cross_and_mlp(residual.unsqueeze(2), memory_kv(0), mask, query=query.unsqueeze(2))
        elif i == 0:
            x = (r.start.expand(*prefixes.shape[:2], -1) + r.step_position[i]).unsqueeze(2)
        else:
            x = (r.codebooks[i - 1][prefixes[:, :, i - 1].to(device)] + r.step_position[i]).unsqueeze(2)
        anc = ancestors.to(device)
        for n in range(self.first_cached, len(r.blocks)):
            slot = n - self.first_cached
            # the cached position-j keys/values [r, c, H, d] of each beam's ancestor at level j
            past = [tuple(t[rows_d[:, None], anc[:, :, j]] for t in self.levels[j][slot]) for j in range(i)]
            x, (keys, values) = r.blocks[n].step(x, past, memory_kv(n), mask)
            self._store(i, slot, rows_d, first, keys, values)
        return r.level_logits(r.final_norm(x[:, :, 0]), i)


# --- the bundle -------------------------------------------------------------------------------------

class GRDR(nn.Module):
    """Tokenizer + generative retriever sharing one set of codebooks."""

    def __init__(self, config: GRDRConfig, clip_backbone: nn.Module | None = None):
        super().__init__()
        self.config = config
        if config.text_encoder == "clip":
            if clip_backbone is None:
                raise ConfigError("GRDR text_encoder='clip' needs a ClipBackbone; pass clip_backbone= "
                                  "or set text_encoder='tiny'")
            text_encoder: nn.Module = ClipTextEncoder(clip_backbone, config.embed_dim)
        else:
            text_encoder = TinyTextEncoder(config)
        self.tokenizer = MultiViewTokenizer(config)
        self.retriever = GenerativeRetriever(config, text_encoder, self.tokenizer.codebooks)
        #: training record (losses, code drift, diagnostics) filled by `train_grdr`.
        self.history: dict[str, Any] = {}

    # inference helpers -----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> Tensor:
        return self.retriever.text_encoder.tokenize(texts)

    def encode(self, video_feats: Tensor, levels: int | None = None) -> Tensor:
        """Index time: pooled video features [N, D] → semantic IDs [N, N_v, L]."""
        return self.tokenizer.encode(video_feats, levels)

    # training ------------------------------------------------------------------------------------------
    def compute_losses(
        self,
        video_feats: Tensor,
        tokens: Tensor,
        views: Tensor,
        prev_codes: Tensor,
        weights: dict[str, float],
    ) -> LossOutput:
        """GRDR's training losses for one batch of (caption, video, routed view) triples.

        `prev_codes [B, l]` are the routed view's codes for the l levels learned in earlier loops
        (stored at the end of the previous loop); level l is the one being learned now. Terms:
        cl — CE over the batch of ⟨Σ_i h_i, routed latent⟩; ce — CE(query logits at step l,
        video's current level-l code), label-smoothed; earlier — CE of query and video code logits
        at steps < l against `prev_codes` (anti-drift); rec — 1 − cos(x, reconstruction);
        rq — quantiser loss.
        """
        cfg = self.config
        level = prev_codes.shape[1]
        rows = torch.arange(len(video_feats), device=video_feats.device)
        tok = self.tokenizer(video_feats, levels=level + 1)
        target = tok.latents if cfg.contrastive_target == "latent" else tok.residuals[level]
        target = target[rows, views]

        memory, mask = self.retriever.encode_text(tokens)
        hidden = self.retriever.decode(memory, mask, prev_codes)
        query_logits = self.retriever.code_logits(hidden)

        terms: dict[str, Tensor] = {}
        sim = hidden.sum(dim=1) @ target.t()
        terms["cl"] = F.cross_entropy(sim, rows)
        current = tok.codes[rows, views, level]
        terms["ce"] = F.cross_entropy(query_logits[:, level], current.detach(), label_smoothing=cfg.label_smoothing)
        if level > 0:
            k = cfg.codebook_size
            video_logits = torch.stack([tok.cosine[j][rows, views] for j in range(level)], dim=1)
            video_logits = video_logits * self.retriever.logit_scale()
            flat_prev = prev_codes.reshape(-1)
            terms["earlier"] = (F.cross_entropy(query_logits[:, :level].reshape(-1, k), flat_prev)
                                + F.cross_entropy(video_logits.reshape(-1, k), flat_prev))
        else:
            terms["earlier"] = torch.zeros((), device=video_feats.device)
        recon = tok.reconstruction
        terms["rec"] = (1 - F.cosine_similarity(video_feats, recon, dim=-1)).mean()
        terms["rq"] = tok.rq_loss
        loss = sum(weights.get(name, 0.0) * value for name, value in terms.items())
        return LossOutput(loss=loss, terms={name: float(value.detach()) for name, value in terms.items()})

    # persistence --------------------------------------------------------------------------------------
    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "config": self.config.to_dict(),
                "state_dict": self.state_dict(), "history": self.history, **extra}

    def save(self, path: str | Path, **extra: Any) -> None:
        """One file: {format, version, config, state_dict, history, **extra}, written atomically."""
        from vidseek.utils import atomic_torch_save

        atomic_torch_save(self.checkpoint(**extra), path)

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], clip_backbone: nn.Module | None = None,
                        source: str = "checkpoint") -> "GRDR":
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"{source} is not a GRDR checkpoint; pass a file written by GRDR.save")
        if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
            raise CheckpointError(f"{source} was written by a newer vidseek (GRDR v{ckpt['version']}); upgrade")
        model = cls(GRDRConfig.from_dict(ckpt["config"]), clip_backbone=clip_backbone)
        try:
            model.load_state_dict(ckpt["state_dict"])
        except RuntimeError as err:
            raise CheckpointError(f"{source} does not match its GRDR config ({str(err).splitlines()[0]}); "
                                  "it may be corrupt") from err
        model.history = dict(ckpt.get("history") or {})
        return model

    @classmethod
    def load(cls, path: str | Path, clip_backbone: nn.Module | None = None,
             map_location: str | torch.device = "cpu") -> "GRDR":
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"GRDR checkpoint {path} not found; train one with train_grdr or check the path")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:  # torch raises many types for a corrupt file
            raise CheckpointError(f"GRDR checkpoint {path} is unreadable ({type(err).__name__}); "
                                  "re-save or retrain it") from err
        model = cls.from_checkpoint(ckpt, clip_backbone=clip_backbone, source=str(path))
        model.eval()
        return model


# --- recall backend ------------------------------------------------------------------------------

#: Beams scored per decoder call in recall: small enough that the exact early-stopping bound of
#: `constrained_beam_search` skips most unpromising beams, large enough to keep GEMMs efficient.
RECALL_BEAM_CHUNK = 16


class GRDRRecall:
    """The search engine's generative recall stage: texts → candidate video indices, beam order."""

    def __init__(self, model: GRDR, trie: SemanticIdTrie, text_tokenizer: Callable[[list[str]], Tensor] | None = None):
        cfg = model.config
        if trie.codebook_size != cfg.codebook_size or trie.levels != cfg.levels:
            raise SearchIndexError(
                f"semantic-ID index has K={trie.codebook_size}, L={trie.levels} but the GRDR model has "
                f"K={cfg.codebook_size}, L={cfg.levels}; rebuild the index with this model")
        self.model = model.eval()
        self.trie = trie
        self.text_tokenizer = text_tokenizer or model.tokenize
        self._prefix_states: PrefixStates | None = None  # built on the first search

    @property
    def prefix_states(self) -> PrefixStates:
        """Block 0's per-trie-node states (built once, on first use: ~0.3 s per 10k prefix nodes
        at width 256 on one core)."""
        if self._prefix_states is None:
            self._prefix_states = PrefixStates(self.model.retriever, self.trie)
        return self._prefix_states

    @torch.no_grad()
    def recall_ids(self, texts: list[str], beams: int, chunk: int | None = RECALL_BEAM_CHUNK) -> tuple[Tensor, Tensor]:
        """Constrained beam search: IDs [B, beams, L] (-1 rows when fewer exist) and scores.
        `chunk`: beams per decoder call (None: all at once); the result does not depend on it."""
        for text in texts:
            if not text.strip():
                raise ConfigError("empty search query; type some words describing the video")
        device = next(self.model.parameters()).device
        tokens = self.text_tokenizer(list(texts)).to(device)
        memory, mask = self.model.retriever.encode_text(tokens)
        return self.trie.constrained_beam_search(
            IncrementalDecoder(self.model.retriever, memory, mask, self.prefix_states), num_queries=len(texts),
            beams=beams, chunk=chunk)

    def recall(self, texts: list[str], beams: int) -> list[list[int]]:
        """Candidate video indices per query: each beam ID expanded to its videos, de-duplicated."""
        if not texts:
            return []
        ids, _ = self.recall_ids(texts, beams)
        return self.trie.candidates(ids)


# --- diagnostics -----------------------------------------------------------------------------------------

def view_diversity(codes: Tensor | np.ndarray) -> dict[str, list[float]]:
    """How much the N_v views of a video differ (the release's known weakness: view collapse).

    Per level l: `same_code` = share of videos whose views all got the same level-l code;
    `same_prefix` = share whose views all got the same ID prefix c_0..c_l (identical IDs at l=L-1).
    """
    codes = np.asarray(codes.cpu() if isinstance(codes, Tensor) else codes)
    same_code = (codes == codes[:, :1]).all(axis=1)  # [N, L]
    same_prefix = np.logical_and.accumulate(same_code, axis=1)
    return {"same_code": same_code.mean(axis=0).tolist(), "same_prefix": same_prefix.mean(axis=0).tolist()}


def codebook_usage(codes: Tensor | np.ndarray, codebook_size: int) -> dict[str, list[float]]:
    """Per level: share of the K codes used by any (video, view), and perplexity exp(H(code))."""
    codes = np.asarray(codes.cpu() if isinstance(codes, Tensor) else codes)
    flat = codes.reshape(-1, codes.shape[-1])
    used, perplexity = [], []
    for level in range(flat.shape[1]):
        counts = np.bincount(flat[:, level], minlength=codebook_size)
        p = counts[counts > 0] / counts.sum()
        used.append(float((counts > 0).sum() / codebook_size))
        perplexity.append(float(np.exp(-(p * np.log(p)).sum())))
    return {"used_fraction": used, "perplexity": perplexity}


def candidate_size_stats(candidates: Sequence[Sequence[int]]) -> dict[str, float]:
    """Distribution of candidate-set sizes over queries: min, mean, median, p90, max."""
    sizes = np.array([len(c) for c in candidates], dtype=np.float64)
    if len(sizes) == 0:
        return {"min": 0.0, "mean": 0.0, "median": 0.0, "p90": 0.0, "max": 0.0}
    return {"min": float(sizes.min()), "mean": float(sizes.mean()), "median": float(np.median(sizes)),
            "p90": float(np.percentile(sizes, 90)), "max": float(sizes.max())}


def candidate_hit_rate(candidates: Sequence[Sequence[int]], ground_truth: Sequence[int | Sequence[int]]) -> float:
    """Share of queries with (any of) their ground-truth video(s) among the candidates."""
    if len(candidates) != len(ground_truth):
        raise ConfigError(f"{len(candidates)} candidate lists but {len(ground_truth)} ground-truth entries")
    if not candidates:
        return 0.0
    hits = 0
    for cands, gt in zip(candidates, ground_truth):
        wanted = {int(gt)} if np.isscalar(gt) else {int(g) for g in gt}
        hits += bool(wanted & set(int(c) for c in cands))
    return hits / len(candidates)



# --- presets -------------------------------------------------------------

#: model_config keys a GRDR preset carries besides GRDRConfig fields (read by the run/eval code).
#: beams: beam width when only the evaluated split is indexed (the release's test-only pool);
#: beams_full_corpus: beam width for a whole collection (20–50 in the release); dense_preset: the
#: dense preset whose `index_video` vector GRDR tokenizes (its run goes to `--init`).
RUN_CONFIG_KEYS = ("beams", "beams_full_corpus", "dense_preset")

#: The paper benchmarks GRDR reports (METHODS.md "GRDR"): preset dataset name → codebook key.
_GRDR_PAPER_DATASETS = {"msrvtt9k": "msrvtt", "msrvtt7k": "msrvtt", "didemo": "didemo", "lsmdc": "lsmdc",
                        "activitynet": "activitynet"}


def split_model_config(model_config: dict[str, Any]) -> tuple[GRDRConfig, dict[str, Any]]:
    """A GRDR preset's model_config → (GRDRConfig, run settings from RUN_CONFIG_KEYS).

    Unknown keys are an error (a typo must not silently fall back to a default)."""
    names = {f.name for f in dataclasses.fields(GRDRConfig)}
    unknown = set(model_config) - names - set(RUN_CONFIG_KEYS)
    if unknown:
        raise ConfigError(f"GRDR model_config has unknown keys {sorted(unknown)}; use GRDRConfig fields or "
                          f"{list(RUN_CONFIG_KEYS)}")
    config = GRDRConfig(**{k: v for k, v in model_config.items() if k in names})
    return config, {k: model_config[k] for k in RUN_CONFIG_KEYS if k in model_config}


def register_presets(register: Callable[[Any], Any], Preset: type, synth_train: Callable[..., Any],
                     paper_train: Callable[..., Any], datasets: list[tuple]) -> None:
    """Paper presets `<dataset>-grdr-<b32|b16>` (N_v 4, L 3, K per dataset: 128 MSR-VTT /
    ActivityNet, 96 DiDeMo, 200 LSMDC; AdamW 1e-4 constant, batch 512; beams 100 test-only pool,
    50 full corpus; the query encoder starts from the dense model's CLIP text tower, standing in
    for the release's T5-small) and `synth-grdr-tiny` (K 24 so ~420 training videos fill the
    codebooks; ≈ 1–2 min on 2 cores). Each phase of each loop runs `train.epochs` passes over the
    training captions, or `train.max_steps / (3·L)` steps when max_steps is set."""
    for ds, fmt, opts, frames, words, _epochs, desc in datasets:
        if ds not in _GRDR_PAPER_DATASETS:
            continue
        k = CODEBOOK_SIZE_BY_DATASET[_GRDR_PAPER_DATASETS[ds]]
        for backbone, clip in (("b32", "ViT-B-32"), ("b16", "ViT-B-16")):
            register(Preset(
                name=f"{ds}-grdr-{backbone}",
                description=f"GRDR generative recall (4 views × 3 levels × K={k}) on {desc}, "
                            f"over {ds}-seqtransf-{backbone} video vectors",
                model="grdr",
                clip=clip,
                frames=frames,
                words=words,
                model_config={"num_views": 4, "levels": 3, "codebook_size": k, "text_encoder": "clip",
                              "beams": 100, "beams_full_corpus": 50, "dense_preset": f"{ds}-seqtransf-{backbone}"},
                data_format=fmt,
                data_options=dict(opts),
                train=paper_train(epochs=5, batch_size=512, lr=1e-4, weight_decay=0.0, warmup_fraction=0.0,
                                  grad_clip=1.0, select_metric="val.grdr.hit_rate"),
                reference=("GRDR + X-Pool rerank, MSR-VTT T2V R@1 46.0 (test-only pool, release README)"
                           if ds == "msrvtt9k" else ""),
            ))
    register(Preset(
        name="synth-grdr-tiny",
        description="GRDR generative recall on the synthetic benchmark over synth-meanp/seqtransf-tiny "
                    "video vectors (4 views × 3 levels × K=24, CPU minutes)",
        model="grdr",
        clip="tiny",
        frames=8,
        words=32,
        model_config={"embed_dim": 64, "num_views": 4, "levels": 3, "codebook_size": 24, "text_encoder": "clip",
                      "decoder_layers": 2, "decoder_heads": 4, "dropout": 0.1, "kmeans_iters": 30,
                      "beams": 100, "beams_full_corpus": 20, "dense_preset": "synth-seqtransf-tiny"},
        data_format="jsonl",
        train=synth_train(epochs=100, max_steps=540, batch_size=64, lr=1e-3, weight_decay=0.0, warmup_fraction=0.0,
                          hard_negatives=False, eval_every=None, select_metric="val.grdr.hit_rate"),
    ))
