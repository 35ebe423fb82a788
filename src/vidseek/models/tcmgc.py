"""TC-MGC: text-conditioned multi-grained contrast (seed paper 004, §3.1–3.7; METHODS.md, TC-MGC).

Pipeline for a (text, video) pair::

    words [W,D], sentence [D]           frames [T,D] ─► temporal encoder (§3.2 Eq. 1, seqTransf)
            │                                           │
            └──► language-video attention (LVA, §3.2 Eq. 2–11): query = sentence → video f_v [D]
                                                        query = each word → "frames" f_j [W,D]
    four similarities (§3.3 Eq. 12–15): s_vs = (sent·W_g)·f_v, video–word [W], sentence–frame [W],
    frame–word [W,W] = (word·W_l)·f_j
    similarity reorganisation SR / Bi-SR (§3.4 Eq. 16–17) → ISA / Bi-ISA (§3.5 Eq. 18–30)
    → linear softmax aggregation LSA (§3.6 Eq. 31–32) → s(t, v)
    loss = symmetric InfoNCE on logit-scaled s + α·SDR (§3.7 Eq. 33–37)

Released behaviour is the default ("faithful"); `text_mask` / `frame_mask` are named
improvements. The pairwise score is computed in memory-bounded blocks; with the residual FC's
dropout inactive (evaluation, reranking) it uses the exact fast algebra of `tcmgc_fast`, which
never materialises the [B_t, W, B_v, D] word-conditioned frames.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vidseek.encoders.temporal import TemporalTransformer, masked_mean
from vidseek.errors import ConfigError
from vidseek.models import tcmgc_fast
from vidseek.models.base import FrameFeatures, LossOutput, RetrievalModel, TextFeatures, tree_slice
from vidseek.models.losses import LogitScale, symmetric_infonce
from vidseek.models.tcmgc_fast import LVAVideoCache

SRMode = Literal["remove", "fuse", "none"]
Aggregation = Literal["lsa", "softmax", "avg"]

#: The four granularities in the order LSA stacks them (§3.6: [s_vs, s_vw, s_sf, s_fw]).
GRANULARITIES: tuple[str, ...] = ("video_sentence", "video_word", "sentence_frame", "frame_word")


def kept_count(length: int, keep_rate: float) -> int:
    """k = int(m·r) of §3.4 (the release truncates; at least one similarity is kept)."""
    return max(1, int(length * keep_rate))


def reorganized_length(length: int, keep_rate: float, mode: str) -> int:
    """Length of a vector after SR: k (removal), k+1 (fusion) or unchanged (no SR)."""
    if mode == "none":
        return length
    k = kept_count(length, keep_rate)
    return k + 1 if mode == "fuse" else k


@dataclass
class TCMGCConfig:
    """Every switch the paper ablates (METHODS item 6). Defaults = the released MSR-VTT model."""

    max_words: int = 32  # W: word positions of the text tower (context length)
    max_frames: int = 12  # T: videos are padded (mask False) up to this many frames
    # granularities (Table 9)
    video_sentence: bool = True
    video_word: bool = True
    sentence_frame: bool = True
    frame_word: bool = True
    # text-conditioned contrast (Table 4): off = masked-mean video and plain frames, no LVA
    text_conditioned: bool = True
    unconditioned_frames: Literal["clip", "temporal"] = "clip"  # release: CLIP frames before the temporal encoder
    # similarity reorganisation (Tables 5–8): "remove" inattentive similarities, "fuse" them, or "none"
    video_word_sr: SRMode = "remove"
    video_word_keep: float = 0.1
    sentence_frame_sr: SRMode = "fuse"
    sentence_frame_keep: float = 0.1
    frame_word_word_sr: SRMode = "remove"  # Bi-SR step 1, along words
    frame_word_frame_sr: SRMode = "remove"  # Bi-SR step 2, along (word-conditioned) frames
    frame_word_keep: float = 0.1
    # objective (§3.7) and aggregation (§3.6, Figs 7–8)
    sdr: bool = True
    sdr_weight: float = 0.5  # α
    aggregation: Aggregation = "lsa"
    # video side (Table 10) and LVA block (Tables 11–12)
    temporal_encoder: bool = True
    temporal_layers: int = 4
    temporal_heads: int | None = None  # None: width // 64, as the release (8 for D = 512)
    residual_fc: bool = True
    attention_heads: int = 1
    dropout: float = 0.3  # on the residual FC of the LVA block
    isa_lambda: float = 100.0  # λ of ISA / Bi-ISA (Table 13; the release's `softmax_lambda`)
    logit_scale_init: float | None = None  # None: the loaded checkpoint's (release: clip.logit_scale), 1/0.07 from random init
    # named improvements (off = faithful to the release)
    text_mask: bool = False  # padding word positions get zero weight everywhere
    frame_mask: bool = False  # padded frames are never attended to / never counted
    # pairwise scoring memory budget (elements of the largest intermediate per block)
    max_block_elements: int = 1 << 25

    def __post_init__(self) -> None:
        if not self.granularities:
            raise ConfigError("TC-MGC needs at least one granularity: enable one of " + ", ".join(GRANULARITIES))
        for name in ("video_word_sr", "sentence_frame_sr", "frame_word_word_sr", "frame_word_frame_sr"):
            if getattr(self, name) not in ("remove", "fuse", "none"):
                raise ConfigError(f"TC-MGC {name}={getattr(self, name)!r}: use 'remove', 'fuse' or 'none'")
        if self.aggregation not in ("lsa", "softmax", "avg"):
            raise ConfigError(f"TC-MGC aggregation={self.aggregation!r}: use 'lsa', 'softmax' or 'avg'")
        if self.unconditioned_frames not in ("clip", "temporal"):
            raise ConfigError(f"TC-MGC unconditioned_frames={self.unconditioned_frames!r}: use 'clip' or 'temporal'")
        for name in ("video_word_keep", "sentence_frame_keep", "frame_word_keep"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ConfigError(f"TC-MGC {name}={getattr(self, name)} must be in (0, 1]")
        axes = [("video_word", self.video_word_sr, self.max_words, self.video_word_keep),
                ("sentence_frame", self.sentence_frame_sr, self.frame_axis, self.sentence_frame_keep),
                ("frame_word (words)", self.frame_word_word_sr, self.max_words, self.frame_word_keep),
                ("frame_word (frames)", self.frame_word_frame_sr, self.frame_axis, self.frame_word_keep)]
        for label, mode, length, keep in axes:
            if mode == "fuse" and kept_count(length, keep) >= length:
                raise ConfigError(f"TC-MGC {label}: fusion needs a keep rate that leaves something to fuse "
                                  f"(k={kept_count(length, keep)} of {length}); lower the keep rate")
        if self.max_words < 1 or self.max_frames < 1 or self.attention_heads < 1:
            raise ConfigError("TC-MGC max_words, max_frames and attention_heads must be positive")
        if self.isa_lambda <= 0 or (self.logit_scale_init is not None and self.logit_scale_init <= 0):
            raise ConfigError("TC-MGC isa_lambda and logit_scale_init must be positive")

    @property
    def granularities(self) -> tuple[str, ...]:
        return tuple(g for g in GRANULARITIES if getattr(self, g))

    @property
    def frame_axis(self) -> int:
        """Length of the 'frame' axis: W word-conditioned frames, or T plain frames (Table 4 off)."""
        return self.max_words if self.text_conditioned else self.max_frames

    @classmethod
    def paper(cls, dataset: str, **overrides: Any) -> "TCMGCConfig":
        """The paper's settings (§4.1): MSR-VTT / VATEX 12 frames, 32 words; DiDeMo 64 / 64;
        1 LVA head, λ = 100, r = 0.1, α = 0.5, dropout 0.3, 4 temporal layers."""
        key = dataset.lower().replace("-", "").replace("_", "")
        sizes = PAPER_SIZES.get(key)
        if sizes is None:
            raise ConfigError(f"no TC-MGC paper settings for dataset {dataset!r}: choose one of {sorted(PAPER_SIZES)}")
        return cls(max_frames=sizes[0], max_words=sizes[1], **overrides)


#: dataset → (frames, words) of §4.1 "Implementation Details".
PAPER_SIZES: dict[str, tuple[int, int]] = {
    "msrvtt": (12, 32), "msrvtt9k": (12, 32), "msrvtt7k": (12, 32), "vatex": (12, 32), "didemo": (64, 64),
}


# --- similarity reorganisation and aggregation (plain tensors) ----------------------------------

#: up to this length, softmax is spelled out (max, exp, sum, divide): torch's CPU softmax kernel
#: pays ~0.1 µs per row, which dominated the ISA heads (rows of 3–4 similarities).
_SHORT_SOFTMAX_MAX = 8


def short_softmax(logits: Tensor, dim: int = -1) -> Tensor:
    """`logits.softmax(dim)` (same formula: shift by the max, exponentiate, normalise), faster for
    short rows, and in whatever memory layout `logits` has."""
    if logits.shape[dim] > _SHORT_SOFTMAX_MAX:
        return logits.softmax(dim)
    shifted = (logits - logits.amax(dim, keepdim=True)).exp()
    return shifted / shifted.sum(dim, keepdim=True)


def masked_softmax(logits: Tensor, valid: Tensor | None) -> Tensor:
    """Softmax over the last dim; invalid entries (and all-invalid rows) get weight exactly 0."""
    if valid is None:
        return short_softmax(logits)
    weights = short_softmax(logits.masked_fill(~valid, torch.finfo(logits.dtype).min))
    return weights * valid


#: up to this k, top-k values come from an insertion network (2k elementwise ops per entry,
#: vectorised across rows) — several times faster than `torch.topk` on short CPU rows.
_INSERTION_TOPK_MAX = 6


def top_values(x: Tensor, k: int, dim: int = -1) -> Tensor:
    """The k largest values along `dim`, sorted descending (ties kept, like `topk(...).values`)."""
    n = x.shape[dim]
    if k > _INSERTION_TOPK_MAX or k >= n:
        return x.topk(k, dim=dim, largest=True, sorted=True).values
    # The network's elementwise ops run fastest on dense rows: bring `dim` to the front and copy
    # only if its rows are not already dense blocks of memory (e.g. `dim` innermost). The result
    # is stacked the same way (its `dim` outermost in memory), so a later call along it is free.
    front = x.movedim(dim, 0)
    if not front[0].is_contiguous():
        front = front.contiguous()
    rows = front.unbind(0)
    best = [rows[0].clone()] + [torch.full_like(rows[0], float("-inf")) for _ in range(k - 1)]
    # Without autograd, update in place: ~2× faster, as every fresh [.., rows] result would be a
    # new large allocation (mmap + page faults) — 2k of them per entry of `dim`.
    in_place = not (torch.is_grad_enabled() and x.requires_grad)
    scratch = torch.empty_like(rows[0]) if in_place else None
    for row in rows[1:]:
        for i in range(k - 1, 0, -1):  # descending i, so best[i-1] is still the old value
            if in_place:
                torch.maximum(best[i], torch.minimum(best[i - 1], row, out=scratch), out=best[i])
            else:
                best[i] = torch.maximum(best[i], torch.minimum(best[i - 1], row))
        best[0] = torch.maximum(best[0], row, out=best[0] if in_place else None)
    return torch.stack(best).movedim(0, dim)


def similarity_reorganization(s: Tensor, keep: int, mode: str, valid: Tensor | None = None
                              ) -> tuple[Tensor, Tensor | None]:
    """SR along the last dim (§3.4, Fig. 5a/b).

    "remove": the k largest similarities, sorted descending (identities are not kept).
    "fuse": those k plus one entry Σ softmax(rest)·rest fusing the other m−k (the release's
    softmax has no temperature). "none": unchanged. Returns (values, validity or None); values at
    invalid positions are 0.
    """
    if mode == "none":
        return (s if valid is None else s.masked_fill(~valid, 0.0)), valid
    ranked = s if valid is None else s.masked_fill(~valid, float("-inf"))
    if mode == "remove":
        top = top_values(ranked, keep)
        if valid is None:
            return top, None
        top_valid = torch.isfinite(top)
        return top.masked_fill(~top_valid, 0.0), top_valid
    if valid is None and keep < _INSERTION_TOPK_MAX:
        return _fuse_without_sort(s, keep), None
    ordered = ranked.sort(dim=-1, descending=True).values
    top, rest = ordered[..., :keep], ordered[..., keep:]
    rest_valid = None if valid is None else torch.isfinite(rest)
    if rest_valid is not None:
        rest = rest.masked_fill(~rest_valid, 0.0)
    fused = (masked_softmax(rest, rest_valid) * rest).sum(-1, keepdim=True)
    values = torch.cat([top, fused], dim=-1)
    if valid is None:
        return values, None
    values_valid = torch.cat([torch.isfinite(top), rest_valid.any(-1, keepdim=True)], dim=-1)
    return values.masked_fill(~values_valid, 0.0), values_valid


def _fuse_without_sort(s: Tensor, keep: int) -> Tensor:
    """SR "fuse" without masks and without sorting (a full CPU sort of short rows costs ~30 ns
    per entry): [top k ; Σ softmax(rest)·rest], where rest = the m − k entries left after the top k.

    With t = the (k+1)-th largest (rest's maximum, the softmax shift), rest is every entry < t plus
    c = (m − k) − #{entries < t} copies of t (ties at t split between top and rest), so
    fused = (Σ_{x<t} e^(x−t)·x + c·t) / (Σ_{x<t} e^(x−t) + c) — the same softmax, term by term.
    """
    top = top_values(s, keep + 1)
    shift = top[..., keep:]  # [..., 1]
    below = s < shift
    weights = (s - shift).exp().masked_fill(~below, 0.0)
    ties = (s.shape[-1] - keep) - below.sum(-1, keepdim=True).to(s.dtype)
    fused = ((weights * s).sum(-1, keepdim=True) + ties * shift) / (weights.sum(-1, keepdim=True) + ties)
    return torch.cat([top[..., :keep], fused], dim=-1)


def interactive_similarity_aggregation(s: Tensor, interaction: Tensor, lam: float, valid: Tensor | None = None
                                       ) -> tuple[Tensor, Tensor | None]:
    """ISA along the last dim (§3.5 Eq. 18–19, from UCoFiA): w = softmax(λ·(softmax(λ·s)·A)),
    score = Σ w·s. `interaction` is A [n, n] (identity-initialised). Returns (score, any-valid)."""
    relevance = masked_softmax(lam * s, valid)
    # contiguous: a strided left operand sends `@` down a ~100× slower path (this runs per block)
    weights = masked_softmax(lam * (relevance.contiguous() @ interaction), valid)
    return (weights * s).sum(-1), (None if valid is None else valid.any(-1))


def bidirectional_similarity_reorganization(
    s: Tensor, word_keep: int, frame_keep: int, word_mode: str, frame_mode: str, valid: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """Bi-SR (§3.4 Eq. 16–17, Fig. 5c) on s [..., words, frames]: SR along words for every frame
    column, then SR along frames for every resulting row → [..., k_w(+1), k_f(+1)]."""
    by_column, valid_c = similarity_reorganization(
        s.transpose(-1, -2), word_keep, word_mode, None if valid is None else valid.transpose(-1, -2))
    return similarity_reorganization(
        by_column.transpose(-1, -2), frame_keep, frame_mode, None if valid_c is None else valid_c.transpose(-1, -2))


def bidirectional_isa(s: Tensor, interactions: dict[str, Tensor], lam: float, valid: Tensor | None = None) -> Tensor:
    """Bi-ISA (§3.5 Eq. 22–30) on s [..., words, frames]: ISA over words then over frames, and
    over frames then over words, averaged. `interactions` holds the four A matrices:
    words_first, frames_second, frames_first, words_second."""
    per_frame, frame_valid = interactive_similarity_aggregation(
        s.transpose(-1, -2), interactions["words_first"], lam, None if valid is None else valid.transpose(-1, -2))
    words_then_frames, _ = interactive_similarity_aggregation(
        per_frame, interactions["frames_second"], lam, frame_valid)
    per_word, word_valid = interactive_similarity_aggregation(s, interactions["frames_first"], lam, valid)
    frames_then_words, _ = interactive_similarity_aggregation(per_word, interactions["words_second"], lam, word_valid)
    return 0.5 * (words_then_frames + frames_then_words)


def aggregate_granularities(scores: Tensor, mode: str, lsa: Tensor | None = None) -> Tensor:
    """Combine the G instance-level scores [G, ...] (§3.6): "avg" = mean; "softmax" =
    Σ softmax(s)·s; "lsa" = Σ softmax(s·L)·s with L [G, G] identity-initialised (Eq. 31–32)."""
    if mode == "avg":
        return scores.mean(0)
    logits = scores if mode == "softmax" else torch.einsum("g...,gh->h...", scores, lsa)
    return (logits.softmax(0) * scores).sum(0)


# --- language-video attention -------------------------------------------------------------------

class LanguageVideoAttention(nn.Module):
    """LVA block (§3.2 Eq. 2–11, Fig. 3), as released: X-Pool attention without q/k/v/out
    projections. LN1 on text queries and frames → softmax(k·q/√d_h) over frames → LN2 →
    a + Dropout(FC(a)) (FC identity-initialised) → LN3. `residual=False` gives LN3(FC(a)) (Table 11)."""

    def __init__(self, width: int, heads: int = 1, dropout: float = 0.3, residual: bool = True):
        super().__init__()
        if width % heads:
            raise ConfigError(f"TC-MGC attention_heads={heads} must divide the embedding width {width}")
        self.heads = heads
        self.residual = residual
        self.ln_query_key = nn.LayerNorm(width)  # LN1, shared by queries and frames (release)
        self.ln_attended = nn.LayerNorm(width)  # LN2
        self.fc = nn.Linear(width, width)
        self.dropout = nn.Dropout(dropout)
        self.ln_out = nn.LayerNorm(width)  # LN3
        nn.init.eye_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    @property
    def dropout_active(self) -> bool:
        return self.training and self.residual and self.dropout.p > 0

    def forward(self, queries: Tensor, frames: Tensor, frame_valid: Tensor | None = None) -> Tensor:
        """queries [Bt,Q,D], frames [Bv,T,D] → conditioned outputs z [Bt,Bv,Q,D] (un-normalised),
        every query of every text against every video in one batched op."""
        d, h = queries.shape[-1], self.heads
        q = self.ln_query_key(queries).unflatten(-1, (h, d // h))
        k = self.ln_query_key(frames).unflatten(-1, (h, d // h))
        logits = torch.einsum("tqhe,vshe->tvqhs", q, k) / math.sqrt(d // h)
        if frame_valid is not None:
            logits = logits.masked_fill(~frame_valid.bool()[None, :, None, None, :], torch.finfo(logits.dtype).min)
        att = logits.softmax(-1)  # over frames, per head
        attended = self.ln_attended(torch.einsum("tvqhs,vshe->tvqhe", att, k).flatten(-2))
        projected = self.fc(attended)
        mixed = attended + self.dropout(projected) if self.residual else projected
        return self.ln_out(mixed)


# --- video representations ----------------------------------------------------------------------

@dataclass
class TCMGCVideo(FrameFeatures):
    """`encode_video_features` output: temporal-encoded frames [B,T,D] + mask [B,T]; with text
    conditioning off and `unconditioned_frames="clip"`, also the CLIP frames before the temporal
    encoder (the release's frame-level features in that setting)."""

    clip_frames: Tensor | None = None


@dataclass
class UnconditionedVideo:
    """Precomputed video side when text conditioning is off (Table 4)."""

    video: Tensor  # [B, D] L2-normalised masked mean of the normalised temporal-encoded frames
    frames: Tensor  # [B, T, D] L2-normalised frame features
    frame_valid: Tensor  # [B, T] bool


@dataclass
class _TextSide:
    queries: Tensor  # [B, Q, D] raw LVA queries: [sentence][words]
    probes: Tensor  # [B, 2(W+1), D]: video probes [sent·W_g, words], frame probes [sent, words·W_l]
    word_valid: Tensor | None  # [B, W] when text_mask is on
    fast_cache: tcmgc_fast.LVATextCache | None = None  # LN1(queries), p⊙γ3, ... for the fast path


class TCMGC(RetrievalModel):
    """Text-conditioned multi-grained reranker (paper 004). `score` gives s(t, v) without the
    logit scale; `loss` the InfoNCE + α·SDR objective. Rerank-only: no dense index vector."""

    name: ClassVar[str] = "tcmgc"
    supports_dense_recall: ClassVar[bool] = False

    @property
    def reads_padding_words(self) -> bool:  # type: ignore[override]
        """As released, the word granularities weigh every position, padding included (the
        tower's outputs there are real vectors); with `text_mask` padding gets zero weight."""
        return not self.config.text_mask

    def __init__(self, clip: nn.Module, config: TCMGCConfig | None = None):
        super().__init__(clip)
        cfg = self.config = config or TCMGCConfig()
        width = self.width = int(clip.embed_dim)
        self.temporal = (TemporalTransformer(width, layers=cfg.temporal_layers, heads=cfg.temporal_heads,
                                             max_frames=cfg.max_frames) if cfg.temporal_encoder else None)
        self.lva = (LanguageVideoAttention(width, cfg.attention_heads, cfg.dropout, cfg.residual_fc)
                    if cfg.text_conditioned else None)
        # W_g and W_l (§3.3; the release's global_mat_weight / local_mat_weight), identity-initialised
        self.global_projection = nn.Parameter(torch.eye(width)) if cfg.video_sentence else None
        self.local_projection = nn.Parameter(torch.eye(width)) if cfg.frame_word else None
        sizes = self.isa_sizes()
        self.isa = nn.ParameterDict({name: nn.Parameter(torch.eye(n)) for name, n in sizes.items()})
        groups = len(cfg.granularities)
        self.lsa = nn.Parameter(torch.eye(groups)) if cfg.aggregation == "lsa" else None
        self.logit_scale = LogitScale(init=cfg.logit_scale_init or 1 / 0.07, max_value=100.0)

    def start_from_pretrained_clip(self) -> None:
        """The release (CLIP4Clip's loader) starts the temporal encoder from the text tower and
        scores with the checkpoint's own logit scale."""
        if self.temporal is not None:
            self.temporal.init_from_text_tower(self.clip.model)
        if self.config.logit_scale_init is None:
            self.logit_scale.copy_from_clip(self.clip.model)

    def isa_sizes(self) -> dict[str, int]:
        """Side of each ISA matrix A (§3.5; the 'Params' columns of Tables 5–8 are their squares)."""
        cfg, sizes = self.config, {}
        if cfg.video_word:
            sizes["video_word"] = reorganized_length(cfg.max_words, cfg.video_word_keep, cfg.video_word_sr)
        if cfg.sentence_frame:
            sizes["sentence_frame"] = reorganized_length(cfg.frame_axis, cfg.sentence_frame_keep, cfg.sentence_frame_sr)
        if cfg.frame_word:
            words = reorganized_length(cfg.max_words, cfg.frame_word_keep, cfg.frame_word_word_sr)
            frames = reorganized_length(cfg.frame_axis, cfg.frame_word_keep, cfg.frame_word_frame_sr)
            sizes.update(frame_word_words_first=words, frame_word_frames_second=frames,
                         frame_word_frames_first=frames, frame_word_words_second=words)
        return sizes

    # video side -------------------------------------------------------------------------------
    def encode_video_features(self, feats: FrameFeatures) -> TCMGCVideo:
        """Frames [B,T,D] → padded to max_frames (mask False) → temporal encoder (§3.2 Eq. 1)."""
        frames, mask = feats.frames, feats.mask.bool()
        b, t, d = frames.shape
        if d != self.width:
            raise ConfigError(f"frame features have width {d} but this TC-MGC model expects {self.width}; "
                              "extract features with the same CLIP backbone")
        if t > self.config.max_frames:
            raise ConfigError(f"video has {t} frames but TC-MGC max_frames is {self.config.max_frames}; "
                              "sample fewer frames or raise max_frames")
        if t < self.config.max_frames:  # the release pads every video to max_frames
            pad = self.config.max_frames - t
            frames = torch.cat([frames, frames.new_zeros(b, pad, d)], dim=1)
            mask = torch.cat([mask, mask.new_zeros(b, pad)], dim=1)
        encoded = frames if self.temporal is None else self.temporal(frames, mask)
        keep_clip = not self.config.text_conditioned and self.config.unconditioned_frames == "clip"
        return TCMGCVideo(frames=encoded, mask=mask, clip_frames=frames if keep_clip else None)

    def precompute_video(self, video: FrameFeatures) -> LVAVideoCache | UnconditionedVideo:
        """What scoring needs from a video, computed once (index time). `video` = the output of
        `encode_video_features`. Text-conditioned: the per-video matrices of METHODS item 7."""
        mask = video.mask.bool()
        if self.lva is not None:
            return tcmgc_fast.precompute_video(self.lva, video.frames, mask)
        pooled = F.normalize(masked_mean(F.normalize(video.frames, dim=-1), mask), dim=-1)
        source = getattr(video, "clip_frames", None)
        frames = video.frames if source is None else source
        return UnconditionedVideo(video=pooled, frames=F.normalize(frames, dim=-1), frame_valid=mask)

    # text side --------------------------------------------------------------------------------
    def _check_text(self, text: TextFeatures) -> None:
        words, w = text.words, self.config.max_words
        if words.shape[1] != w:
            raise ConfigError(f"text features have {words.shape[1]} word positions but TC-MGC max_words is {w}; "
                              f"tokenize with context length {w}")
        if words.shape[-1] != self.width:
            raise ConfigError(f"text features have width {words.shape[-1]} but this TC-MGC model expects {self.width}")

    def _text_side(self, text: TextFeatures, fast: bool = False) -> _TextSide:
        """Probe vectors and LVA queries of a block of texts (+ the fast path's text cache)."""
        self._check_text(text)
        words = text.words
        sentence_n, words_n = F.normalize(text.sentence, dim=-1), F.normalize(words, dim=-1)
        global_probe = sentence_n if self.global_projection is None else sentence_n @ self.global_projection
        local_probes = words_n if self.local_projection is None else words_n @ self.local_projection
        probes = torch.cat([global_probe[:, None], words_n, sentence_n[:, None], local_probes], dim=1)
        queries = torch.cat([text.sentence[:, None], words], dim=1)
        w = self.config.max_words
        cache = (tcmgc_fast.precompute_text(self.lva, queries, probes, key_space=slice(w + 1, 2 * w + 2))
                 if fast and self.lva is not None else None)
        return _TextSide(queries=queries, probes=probes,
                         word_valid=text.mask.bool() if self.config.text_mask else None, fast_cache=cache)

    # pairwise scores ----------------------------------------------------------------------------
    def _pair_elements(self, frames: int, fast: bool) -> int:
        """Largest intermediate elements per (text, video) pair, to size blocks."""
        w, f = self.config.max_words, self.config.frame_axis
        probes = 2 * (w + 1)
        tail = probes * f + 8 * w * f  # probe dots, SR sort values/indices, ISA temporaries
        if self.lva is None:
            return tail
        n = self.config.attention_heads * frames
        queries = w + 1
        if fast:
            return queries * (7 * n + 3) + probes * (n + 1) + self.width + tail
        return queries * (6 * self.width + 2 * n) + tail

    #: texts per block the planner keeps before widening the video side (see `plan_blocks`)
    MIN_BLOCK_TEXTS: ClassVar[int] = 16

    def plan_blocks(self, n_text: int, n_video: int, frames: int, max_block_elements: int, fast: bool
                    ) -> tuple[int, int]:
        """(texts, videos) per block so that block pairs × per-pair elements ≤ the budget
        (a single pair is always allowed). Prefers wide video blocks (one GEMM covers them) with
        at least `MIN_BLOCK_TEXTS` texts where the budget allows: the GEMMs' narrow side is
        texts × (W+1) columns; MKL ran ~2× slower at 2 texts (66 columns) than at 8 (264), and 16
        texts beat 8 by a further ~15% (benchmarks/rerank.py shapes, one thread)."""
        pairs = max(1, max_block_elements // self._pair_elements(frames, fast))
        videos = max(1, min(n_video, pairs // min(n_text, self.MIN_BLOCK_TEXTS, pairs)))
        texts = max(1, min(n_text, pairs // videos))
        return texts, videos

    def _probe_scores(self, side: _TextSide, video: Any, fast: bool, frame_valid: Tensor | None
                      ) -> tuple[Tensor, Tensor]:
        """video probes · f_v → [Bt,Bv,W+1]; frame probes · f_j → [Bt,Bv,W+1,F]."""
        w = self.config.max_words
        video_probes, frame_probes = slice(0, w + 1), slice(w + 1, 2 * w + 2)
        if isinstance(video, UnconditionedVideo):
            v = torch.einsum("tpd,vd->tvp", side.probes[:, video_probes], video.video)
            f = torch.einsum("tpd,vqd->tvpq", side.probes[:, frame_probes], video.frames)
            return v, f
        if fast:
            text_cache = side.fast_cache
            if text_cache is None:
                text_cache = tcmgc_fast.precompute_text(self.lva, side.queries, side.probes, key_space=frame_probes)
            v, f = tcmgc_fast.probe_dots(self.lva, text_cache, video,
                                         [(video_probes, slice(0, 1)), (frame_probes, slice(1, w + 1))],
                                         use_frame_mask=self.config.frame_mask)
            return v.squeeze(-1), f
        outputs = F.normalize(self.lva(side.queries, video.frames, frame_valid), dim=-1)  # [Bt,Bv,Q,D]
        v = torch.einsum("tpd,tvd->tvp", side.probes[:, video_probes], outputs[:, :, 0])
        f = torch.einsum("tpd,tvqd->tvpq", side.probes[:, frame_probes], outputs[:, :, 1:])
        return v, f

    def _granular_scores(self, video_dots: Tensor, frame_dots: Tensor, word_valid: Tensor | None,
                         frame_valid: Tensor | None) -> Tensor:
        """The enabled instance-level scores (§3.3–3.5), logit-scaled, stacked [G, Bt, Bv]."""
        cfg, lam = self.config, self.config.isa_lambda
        bt, bv = video_dots.shape[:2]
        w, f = cfg.max_words, cfg.frame_axis
        words_valid = None if word_valid is None else word_valid[:, None, :].expand(bt, bv, w)
        if cfg.text_conditioned:  # frame j is conditioned on word j
            axis_valid = words_valid
        else:
            axis_valid = None if frame_valid is None else frame_valid[None].expand(bt, bv, f)
        scores = []
        if cfg.video_sentence:  # Eq. 12
            scores.append(video_dots[..., 0])
        if cfg.video_word:  # Eq. 13, SR, Eq. 18–19
            values, valid = similarity_reorganization(video_dots[..., 1:], kept_count(w, cfg.video_word_keep),
                                                      cfg.video_word_sr, words_valid)
            scores.append(interactive_similarity_aggregation(values, self.isa["video_word"], lam, valid)[0])
        if cfg.sentence_frame:  # Eq. 14, SR, Eq. 20–21
            values, valid = similarity_reorganization(frame_dots[:, :, 0], kept_count(f, cfg.sentence_frame_keep),
                                                      cfg.sentence_frame_sr, axis_valid)
            scores.append(interactive_similarity_aggregation(values, self.isa["sentence_frame"], lam, valid)[0])
        if cfg.frame_word:  # Eq. 15, Bi-SR (Eq. 16–17), Bi-ISA (Eq. 22–30)
            matrix_valid = None
            if words_valid is not None or axis_valid is not None:
                rows = words_valid if words_valid is not None else video_dots.new_ones(bt, bv, w, dtype=torch.bool)
                cols = axis_valid if axis_valid is not None else video_dots.new_ones(bt, bv, f, dtype=torch.bool)
                matrix_valid = rows[..., :, None] & cols[..., None, :]
            values, valid = bidirectional_similarity_reorganization(
                frame_dots[:, :, 1:], kept_count(w, cfg.frame_word_keep), kept_count(f, cfg.frame_word_keep),
                cfg.frame_word_word_sr, cfg.frame_word_frame_sr, matrix_valid)
            interactions = {k: self.isa[f"frame_word_{k}"]
                            for k in ("words_first", "frames_second", "frames_first", "words_second")}
            scores.append(bidirectional_isa(values, interactions, lam, valid))
        return self.logit_scale() * torch.stack(scores)

    def _score_block(self, side: _TextSide, video: Any, fast: bool) -> tuple[Tensor, Tensor]:
        frame_valid = None
        if self.config.frame_mask:
            precomputed = isinstance(video, (LVAVideoCache, UnconditionedVideo))
            frame_valid = video.frame_valid if precomputed else video.mask.bool()
        video_dots, frame_dots = self._probe_scores(side, video, fast, frame_valid)
        parts = self._granular_scores(video_dots, frame_dots, side.word_valid, frame_valid)
        final = aggregate_granularities(parts, self.config.aggregation, self.lsa)
        return final, parts

    def pairwise(self, text: TextFeatures, video: Any, max_block_elements: int | None = None,
                 exact_fast: bool | None = None) -> tuple[Tensor, Tensor]:
        """(logit-scaled final scores [Bt,Bv], logit-scaled granular scores [G,Bt,Bv]).

        `video`: `encode_video_features` output, or `precompute_video` output (always fast path).
        `exact_fast=None` picks the fast path unless the LVA dropout is active (training).
        """
        budget = max_block_elements or self.config.max_block_elements
        self._check_text(text)
        fast = exact_fast if exact_fast is not None else not (self.lva is not None and self.lva.dropout_active)
        if self.lva is None or isinstance(video, LVAVideoCache):
            fast = True
        if fast and not isinstance(video, (LVAVideoCache, UnconditionedVideo)):
            video = self.precompute_video(video)
        if isinstance(video, LVAVideoCache):
            n_video, frames = video.keys.shape[0], video.keys.shape[1] // self.config.attention_heads
        else:
            n_video, frames = video.frames.shape[:2]
        n_text = text.sentence.shape[0]
        per_texts, per_videos = self.plan_blocks(n_text, n_video, frames, budget, fast)
        finals, parts = [], []
        for t0 in range(0, n_text, per_texts):  # text-side tensors are built per block (memory)
            block_side = self._text_side(tree_slice(text, t0, t0 + per_texts), fast)
            row = [self._score_block(block_side, tree_slice(video, v0, v0 + per_videos), fast)
                   for v0 in range(0, n_video, per_videos)]
            finals.append(torch.cat([r[0] for r in row], dim=1))
            parts.append(torch.cat([r[1] for r in row], dim=2))
        return torch.cat(finals, dim=0), torch.cat(parts, dim=1)

    def score_blocked(self, text: TextFeatures, video: Any, max_block_elements: int,
                      exact_fast: bool | None = None) -> Tensor:
        """s(t, v) [Bt,Bv] without the logit scale, computed in blocks whose largest intermediate
        holds about `max_block_elements` elements (METHODS item 7 fast path when dropout is off)."""
        final, _ = self.pairwise(text, video, max_block_elements, exact_fast)
        return final / self.logit_scale()

    def score(self, text: TextFeatures, video: Any) -> Tensor:
        """Final similarity (§3.6 Eq. 32) divided by the logit scale. The LSA weights see the
        logit-scaled scores, as released, so ranking equals the release's."""
        return self.score_blocked(text, video, self.config.max_block_elements)

    def rerank(self, text: TextFeatures, candidate_frames: FrameFeatures) -> Tensor:
        """Scores [n_queries, n_candidates] of raw per-frame features (as stored in the feature
        store): temporal encoder, then the exact fast path, without gradients."""
        with torch.no_grad():
            video = self.encode_video_features(candidate_frames)
            return self.score_blocked(text, video, self.config.max_block_elements, exact_fast=True)

    # training -----------------------------------------------------------------------------------
    def loss(self, text: TextFeatures, video: Any) -> LossOutput:
        """§3.7: symmetric InfoNCE (mean of both directions, as released) on the logit-scaled
        matrix + α·SDR, SDR = mean over matching pairs of the unbiased variance of the G scores."""
        final, parts = self.pairwise(text, video)
        if final.shape[0] != final.shape[1]:
            raise ConfigError(f"TC-MGC loss needs matching text/video batches, got {final.shape[0]} texts "
                              f"and {final.shape[1]} videos")
        infonce = symmetric_infonce(final)
        terms = {"infonce": float(infonce.detach()), "logit_scale": float(self.logit_scale().detach())}
        loss = infonce
        if self.config.sdr and parts.shape[0] > 1:
            sdr = parts.diagonal(dim1=1, dim2=2).var(dim=0, unbiased=True).mean()
            loss = loss + self.config.sdr_weight * sdr
            terms["sdr"] = float(sdr.detach())
        terms["loss"] = float(loss.detach())
        return LossOutput(loss, terms, final)


# --- presets (called by vidseek.models.registry) ------------------------------------------------

_PAPER_ANCHORS = {
    ("msrvtt9k", "b32"): "TC-MGC Table 1b, MSR-VTT 1k-A: T2V 47.4/74.8/84.2 MnR 12.8, V2T 45.9/74.5/83.3, SumR 410.1",
    ("msrvtt9k", "b16"): "TC-MGC Table 1b (ViT-B/16), MSR-VTT 1k-A: T2V R@1 49.0, SumR 418.9",
    ("didemo", "b32"): "TC-MGC Table 2, DiDeMo: T2V R@1 45.7, V2T R@1 45.4, SumR 401.9",
    ("didemo", "b16"): "TC-MGC Table 2 (ViT-B/16), DiDeMo: T2V R@1 48.6, SumR 415.0",
    ("vatex", "b32"): "TC-MGC Table 3, VATEX: T2V R@1 60.0",
    ("vatex", "b16"): "TC-MGC Table 3 (ViT-B/16), VATEX: T2V R@1 63.4, SumR 526.6",
}

#: the synthetic-benchmark preset's model settings (tiny random-init CLIP, embed 64)
SYNTH_TINY_CONFIG: dict[str, Any] = {
    "max_words": 32, "max_frames": 8, "temporal_layers": 2, "logit_scale_init": 1 / 0.07,
}


def register_presets(register: Callable[[Any], Any], Preset: type, synth_train: Callable[..., Any],
                     paper_train: Callable[..., Any], datasets: list[tuple]) -> None:
    """Paper presets `<dataset>-tcmgc-<b32|b16>` (MSR-VTT 9k/7k, DiDeMo, VATEX) and
    `synth-tcmgc-tiny`. A name the registry already holds is left as it is."""

    def add(preset: Any) -> None:
        try:
            register(preset)
        except ConfigError:  # registered by the registry itself: that definition wins
            pass

    for ds, fmt, opts, frames, words, epochs, desc in datasets:
        key = ds.replace("-", "")
        if key not in PAPER_SIZES:
            continue
        paper_frames, paper_words = PAPER_SIZES[key]
        # §4.1: DiDeMo trains 20 epochs at batch 64; MSR-VTT / VATEX 5 epochs at batch 128
        train = paper_train(epochs=20, batch_size=64) if key == "didemo" else paper_train(epochs=epochs)
        for backbone, clip in (("b32", "ViT-B-32"), ("b16", "ViT-B-16")):
            add(Preset(
                name=f"{ds}-tcmgc-{backbone}",
                description=f"TC-MGC on {desc}, {clip}",
                model="tcmgc",
                clip=clip,
                frames=paper_frames,
                words=paper_words,
                model_config=dataclasses.asdict(TCMGCConfig.paper(key)),
                data_format=fmt,
                data_options=dict(opts),
                train=train,
                reference=_PAPER_ANCHORS.get((key, backbone), ""),
            ))
    add(Preset(
        name="synth-tcmgc-tiny",
        description="TC-MGC on the synthetic benchmark, tiny random-init CLIP (CPU minutes)",
        model="tcmgc",
        clip="tiny",
        frames=SYNTH_TINY_CONFIG["max_frames"],
        words=SYNTH_TINY_CONFIG["max_words"],
        model_config=dict(SYNTH_TINY_CONFIG),
        data_format="jsonl",
        train=synth_train(),
    ))
