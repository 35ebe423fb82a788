"""Exact fast scoring of the TC-MGC language-video attention (METHODS.md, TC-MGC item 7).

Every TC-MGC similarity is a dot product p·f between a text-side *probe* vector p (the sentence,
a word, or their W_g / W_l projections) and a normalised LVA output f = z/‖z‖ (paper §3.2,
Eq. 5–11). For a query q and a video's LN1'd frames K (T×D)::

    att = softmax(K·LN1(q)/√d_h)             a = Kᵀ·att             b = LN2(a)
    c   = M·b + l0   (M = I + W_fc, or W_fc without the residual; dropout off)   z = LN3(c)

Because `a` is a convex combination of K's rows, every LayerNorm statistic is a quadratic form in
`att`. With y = [att, −μ(a)]/σ(a) and the per-video design matrix X = [M·diag(γ2)·K̃ᵀ | M·γ2]
(D × (n+1)), c = X·y + e with e = M·β2 + l0, hence

    μ(c) = (1ᵀX·y + 1ᵀe)/D,   ‖c‖² = yᵀ(XᵀX)y + 2(Xᵀe)ᵀy + ‖e‖²,
    ‖z‖² = [cᵀΓc − 2μ(c)·Γᵀc + μ(c)²·ΣΓ]/σ(c)² + 2[hᵀc − μ(c)·Σh]/σ(c) + ‖β3‖²   (Γ = γ3², h = γ3⊙β3)
    p·z  = [(p⊙γ3)ᵀX·y + (p⊙γ3)ᵀe − μ(c)·Σ(p⊙γ3)]/σ(c) + p·β3.

So per (text, video) pair the only D-sized work is two GEMM-shaped products (LN1(Q)·K̃ᵀ and
(P⊙γ3)·X, each ~W×n×D) plus, for the single sentence query, one D-vector X·y; the rest is
O(W·n²) and no [B_t, W, B_v, D] tensor is ever built. X's first n columns are K̃ mapped by
M·diag(γ2), so (P⊙γ3)·X_{<n} = U·K̃ᵀ with U = (P⊙γ3)·M·diag(γ2), computed once per text: both
products then share K̃ and run as ONE GEMM, K̃·[LN1(Q) ; U]ᵀ (and X's last column, M·γ2, is the
same for every video, so its dots are per-text scalars).
With H heads, K̃ (n = H·T rows) holds each frame once per head with the other heads' channels
zeroed, so the same algebra covers multi-head attention (Table 12).

Everything here is differentiable torch code; `TCMGC` uses it whenever the residual FC's
dropout is inactive (evaluation, reranking), and the direct path otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

#: The LVA block (`vidseek.models.tcmgc.LanguageVideoAttention`) is typed structurally here:
#: this module reads its ln_query_key / ln_attended / ln_out / fc / residual / heads and must not
#: import tcmgc.py, which imports this one.
LVAModule = nn.Module


@dataclass
class LVAVideoCache:
    """What one video contributes to every LVA score; computable once per video at index time.

    n = heads × frames. All tensors have the video batch first, so `tree_cat`/`tree_slice` apply.
    """

    keys: Tensor  # [B, n, D] LN1(frames) per head (other heads' channels zero), scaled by 1/√d_h
    mean_weights: Tensor  # [B, n] μ(a) = att · mean_weights
    key_gram: Tensor  # [B, n, n] K̃K̃ᵀ/D, so ‖a‖²/D = attᵀ·key_gram·att
    design: Tensor  # [B, n+1, D] Xᵀ = [K̃·diag(γ2)·Mᵀ ; (M·γ2)ᵀ]
    design_gram: Tensor  # [B, 2, n+1, n+1] XᵀX and Xᵀ·diag(γ3²)·X
    design_linear: Tensor  # [B, n+1, 5] Xᵀ·[1, γ3², γ3⊙β3, e, γ3²⊙e]
    frame_valid: Tensor  # [B, n] bool, True at real frames


@dataclass
class LVATextCache:
    """Text-side quantities for the fast path (per text; batch first)."""

    queries: Tensor  # [B, Q, D] LN1(queries)
    probes: Tensor  # [B, P, D] p ⊙ γ3
    probe_bias: Tensor  # [B, P] p·β3
    probe_e: Tensor  # [B, P] (p ⊙ γ3)·e
    probe_sum: Tensor  # [B, P] Σ (p ⊙ γ3)
    key_probes: Tensor | None = None  # [B, P_k, D] the probes `key_space` in key space, see `key_space_probes`
    key_space: slice | None = None


def _layer_norm(x: Tensor, ln: torch.nn.LayerNorm) -> Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight.to(x.dtype), ln.bias.to(x.dtype), ln.eps)


def lva_constants(lva: LVAModule, dtype: torch.dtype) -> dict[str, Tensor]:
    """Video-independent pieces of the algebra: M, r = M·γ2, e = M·β2 + l0, γ3 terms."""
    weight = lva.fc.weight.to(dtype)
    eye = torch.eye(weight.shape[0], dtype=dtype, device=weight.device)
    mix = eye + weight if lva.residual else weight  # c = M·b + l0
    gamma2, beta2 = lva.ln_attended.weight.to(dtype), lva.ln_attended.bias.to(dtype)
    gamma3, beta3 = lva.ln_out.weight.to(dtype), lva.ln_out.bias.to(dtype)
    e = mix @ beta2 + lva.fc.bias.to(dtype)
    gamma3_sq = gamma3 * gamma3
    h = gamma3 * beta3
    return {
        "mix": mix,
        "r": mix @ gamma2,
        "e": e,
        "gamma2": gamma2,
        "gamma3": gamma3,
        "beta3": beta3,
        "gamma3_sq": gamma3_sq,
        "h": h,
        "e_sum": e.sum(),
        "e_sq": e @ e,
        "e_gamma_e": e @ (gamma3_sq * e),
        "gamma_e": gamma3_sq @ e,
        "h_e": h @ e,
        "gamma_sum": gamma3_sq.sum(),
        "h_sum": h.sum(),
        "beta3_sq": beta3 @ beta3,
    }


def head_expanded_keys(keys: Tensor, heads: int) -> Tensor:
    """[B,T,D] → [B, heads·T, D]: row (h, t) keeps only head h's channels of frame t."""
    b, t, d = keys.shape
    head_of_channel = torch.arange(d, device=keys.device) // (d // heads)
    selector = (head_of_channel[None, :] == torch.arange(heads, device=keys.device)[:, None]).to(keys.dtype)
    return (keys[:, None, :, :] * selector[None, :, None, :]).reshape(b, heads * t, d)


def precompute_video(lva: LVAModule, frames: Tensor, frame_valid: Tensor) -> LVAVideoCache:
    """Per-video matrices of METHODS item 7 from frames [B,T,D] (temporal-encoded) and mask [B,T]."""
    c = lva_constants(lva, frames.dtype)
    d = frames.shape[-1]
    keys = head_expanded_keys(_layer_norm(frames, lva.ln_query_key), lva.heads)  # K̃ [B,n,D]
    key_gram = keys @ keys.transpose(1, 2) / d
    mean_weights = keys.sum(-1) / d
    a_t = (keys * c["gamma2"]) @ c["mix"].t()  # Aᵀ = K̃·diag(γ2)·Mᵀ  [B,n,D]
    design = torch.cat([a_t, c["r"].expand(a_t.shape[0], 1, d)], dim=1)  # Xᵀ [B,n+1,D]
    design_gram = torch.stack(
        [design @ design.transpose(1, 2), (design * c["gamma3_sq"]) @ design.transpose(1, 2)], dim=1
    )
    functionals = torch.stack(
        [torch.ones_like(c["e"]), c["gamma3_sq"], c["h"], c["e"], c["gamma3_sq"] * c["e"]], dim=1
    )  # [D,5]
    valid = frame_valid.bool().repeat(1, lva.heads)  # same (h, t) order as K̃
    return LVAVideoCache(
        keys=keys / math.sqrt(d // lva.heads),
        mean_weights=mean_weights,
        key_gram=key_gram,
        design=design,
        design_gram=design_gram,
        design_linear=design @ functionals,
        frame_valid=valid,
    )


def key_space_probes(lva: LVAModule, scaled_probes: Tensor) -> Tensor:
    """u = √d_h·γ2 ⊙ (Mᵀ·(p⊙γ3)) for probes [B,P,D] given as p⊙γ3, so that X_j·(p⊙γ3) = keys_j·u
    for every per-video design row j < n (X_j = M·(γ2 ⊙ K̃_j), keys = K̃/√d_h): the probe
    projection then shares its left operand, the keys, with the attention logits — one GEMM."""
    c = lva_constants(lva, scaled_probes.dtype)
    d = scaled_probes.shape[-1]
    return (scaled_probes @ c["mix"]) * (c["gamma2"] * math.sqrt(d // lva.heads))


def precompute_text(lva: LVAModule, queries: Tensor, probes: Tensor, key_space: slice | None = None
                    ) -> LVATextCache:
    """queries [B,Q,D] (raw text features: LN1 is applied here), probes [B,P,D] (the p vectors);
    `key_space`: the probes scored against many queries (word-conditioned frames), whose key-space
    form is computed here once per text rather than per video block."""
    c = lva_constants(lva, probes.dtype)
    scaled = probes * c["gamma3"]
    return LVATextCache(
        queries=_layer_norm(queries, lva.ln_query_key),
        probes=scaled,
        probe_bias=probes @ c["beta3"],
        probe_e=scaled @ c["e"],
        probe_sum=scaled.sum(-1),
        key_probes=None if key_space is None else key_space_probes(lva, scaled[:, key_space]),
        key_space=key_space,
    )


def small_batched_matmul(left: Tensor, right: Tensor) -> Tensor:
    """`left @ right` for many tiny matrices ([..., P, J] @ [..., J, Q], P, J, Q ~ 10–40), with the
    result laid out P-major in memory (a [P, ..., Q] buffer seen as [..., P, Q]).

    torch's CPU bmm pays a per-matrix overhead that dominates at this size (≈ 2 GFLOP/s here);
    numpy's matmul loops the BLAS kernel over the batch with less of it (≈ 2.5× faster), reading
    strided operands (e.g. a transposed left) in place and writing into a strided output. P-major
    output: the similarity heads reduce over P (top-k over words), and rows of a P-major tensor are
    dense, so they need no transposing copy. Same products, so the same values; torch is used
    whenever autograd needs the graph or off the CPU.
    """
    needs_graph = torch.is_grad_enabled() and (left.requires_grad or right.requires_grad)
    if needs_graph or left.device.type != "cpu" or right.device.type != "cpu":
        return left @ right
    *batch, p_count, _ = left.shape
    out = torch.empty((p_count, *batch, right.shape[-1]), dtype=left.dtype)
    out_view = out.movedim(0, -2)
    np.matmul(left.numpy(), right.numpy(), out=out_view.numpy())
    return out_view


def probe_dots(
    lva: LVAModule,
    text: LVATextCache,
    video: LVAVideoCache,
    groups: list[tuple[slice, slice]],
    use_frame_mask: bool,
) -> list[Tensor]:
    """p·f for every probe p in a group against every LVA output of that group's queries.

    `groups` pairs a probe slice with a query slice; returns one [Bt, Bv, P_g, Q_g] per group,
    equal to `einsum('tpd,tvqd->tvpq', P, normalize(LVA(Q, frames)))` without building the D-sized
    LVA outputs.
    """
    c = lva_constants(lva, text.queries.dtype)
    d = text.queries.shape[-1]
    bt, q_count, _ = text.queries.shape
    bv, n, _ = video.keys.shape
    heads, columns = lva.heads, bt * q_count
    eps_attended, eps_out = lva.ln_attended.eps, lva.ln_out.eps
    # Video-major layout [Bv, n, Bt·Q]: every per-video n×n product below is one batched matmul
    # with a wide right-hand side, and the softmax / LayerNorm reductions run over a non-inner
    # dimension (vectorised across texts and queries).

    # ONE GEMM for the attention logits K̃·LN1(Q)ᵀ/√d_h and, for every multi-query group, the
    # probe projections X_j·(P⊙γ3) = keys_j·U (j < n; see `key_space_probes`): both share the keys
    # as left operand → [Bv, n, Bt, Q + ΣP]. Design row n (M·γ2) is the same for every video, so
    # its dots are text-side scalars, not GEMM rows.
    multi = [(p, q) for p, q in groups if len(range(q_count)[q]) > 1]
    key_probes = [text.key_probes if text.key_space == p else key_space_probes(lva, text.probes[:, p])
                  for p, _ in multi]
    right_side = torch.cat([text.queries, *key_probes], dim=1) if key_probes else text.queries
    width = right_side.shape[1]
    wide = (video.keys.reshape(bv * n, d) @ right_side.reshape(bt * width, d).t()).view(bv, n, bt, width)
    logits = wide[..., :q_count]  # [Bv, n, Bt, Q]
    if use_frame_mask:
        logits = logits.masked_fill(~video.frame_valid[:, :, None, None], torch.finfo(logits.dtype).min)
    att = logits.view(bv, heads, n // heads, bt, q_count).softmax(dim=2).reshape(bv, n, columns)
    projections, start = {}, q_count  # (probe slice) → its [Bv, n, Bt, P] columns of `wide`
    for (p, _), probes_u in zip(multi, key_probes):
        projections[p.start, p.stop] = wide[..., start:start + probes_u.shape[1]]
        start += probes_u.shape[1]

    # LN2 statistics of a = K̃ᵀ·att. y = ỹ/σ(a) with ỹ = [att; −μ(a)]; everything below is linear
    # or quadratic in y, so it is computed on ỹ and rescaled on [Bv, Bt·Q]-sized results, never
    # dividing the [Bv, n+1, Bt·Q] tensor itself.
    mean_a = (video.mean_weights[:, None, :] @ att).squeeze(1)  # [Bv, Bt·Q]
    sq_a = ((video.key_gram @ att) * att).sum(1)
    inv_sigma_a = 1.0 / ((sq_a - mean_a * mean_a).clamp(min=0) + eps_attended).sqrt()
    y_raw = torch.cat([att, -mean_a[:, None, :]], dim=1)  # ỹ [Bv, n+1, Bt·Q]

    # LN3 statistics of c = X·y + e
    quad = ((video.design_gram.reshape(bv, 2 * (n + 1), n + 1) @ y_raw).view(bv, 2, n + 1, columns)
            * y_raw[:, None]).sum(2) * (inv_sigma_a * inv_sigma_a)[:, None]  # [Bv, 2, Bt·Q]
    lin = (video.design_linear.transpose(1, 2) @ y_raw) * inv_sigma_a[:, None]  # [Bv, 5, Bt·Q]
    mean_c = (lin[:, 0] + c["e_sum"]) / d
    c_sq = quad[:, 0] + 2 * lin[:, 3] + c["e_sq"]
    c_gamma_c = quad[:, 1] + 2 * lin[:, 4] + c["e_gamma_e"]
    gamma_c = lin[:, 1] + c["gamma_e"]
    h_c = lin[:, 2] + c["h_e"]
    sigma_c = ((c_sq / d - mean_c * mean_c).clamp(min=0) + eps_out).sqrt()
    z_sq = ((c_gamma_c - 2 * mean_c * gamma_c + mean_c * mean_c * c["gamma_sum"]) / (sigma_c * sigma_c)
            + 2 * (h_c - mean_c * c["h_sum"]) / sigma_c + c["beta3_sq"])
    z_norm = z_sq.clamp(min=0).sqrt().clamp(min=1e-12)  # F.normalize's eps
    inv_z = 1.0 / z_norm
    inv_sz = inv_z / sigma_c  # r = 1/(σ(c)‖z‖)
    # per (video, text, query) scalars, [Bt, Bv, 1, Q] (pair-major, as the contractions below)
    r, m_c, r_z, r_y = (x.view(bv, bt, 1, q_count).transpose(0, 1)
                        for x in (inv_sz, mean_c, inv_z, inv_sz * inv_sigma_a))

    y_raw = y_raw.view(bv, n + 1, bt, q_count)
    out = []
    for probe_slice, query_slice in groups:
        probes = text.probes[:, probe_slice]  # [Bt, P, D]
        queries = y_raw[..., query_slice]  # [Bv, n+1, Bt, Qg]
        p_count, g_count = probes.shape[1], queries.shape[-1]
        p_e, p_sum, p_bias = (x[:, probe_slice, None] for x in (text.probe_e, text.probe_sum, text.probe_bias))
        r_g, m_g, z_g, ry_g = (x[..., query_slice] for x in (r, m_c, r_z, r_y))  # [Bt, Bv, 1, Qg]
        if g_count == 1:
            # One query (the sentence): c − e = X·y is one D-vector per pair, cheaper to build than
            # projecting every probe onto X's n+1 columns: (n+1+P)·D instead of P·(n+1)·D.
            xy = queries[..., 0].transpose(1, 2).contiguous() @ video.design  # X·ỹ [Bv, Bt, D]; strided: a bmm per video
            p_xy = (probes @ xy.permute(1, 2, 0)).unsqueeze(-1)  # [Bt, P, Bv, 1]
            p_xy = p_xy.transpose(1, 2)  # [Bt, Bv, P, 1]
            p_e_, p_sum_, p_bias_ = (x[:, None] for x in (p_e, p_sum, p_bias))  # [Bt, 1, P, 1]
            out.append(p_xy * ry_g + (p_e_ - m_g * p_sum_) * r_g + p_bias_ * z_g)
            continue
        # The probe projections X·(P⊙γ3) come from the GEMM above ([Bv, n, Bt, P]). Then ONE
        # (n+4)-long contraction per pair yields f·p directly: design row n and the LN3
        # shift/scale and 1/‖z‖ ride along as four text-side rows, [X_{<n}·p ; (M·γ2)·p ; p·e ;
        # Σp ; p·β3] · [ỹ·r/σ(a) ; r ; −μ(c)·r ; 1/‖z‖] with r = 1/(σ(c)‖z‖), so no elementwise
        # pass over the [Bt, Bv, P, Q] output is needed. Both operands are written once, pair-major
        # and row-major per pair ([Bt, Bv, n+4, P] and [Bt, Bv, n+4, Qg]: runs of P and Q stay
        # contiguous), and the left one is read transposed in place.
        projected = projections[probe_slice.start, probe_slice.stop]
        left = projected.new_empty(bt, bv, n + 4, p_count)
        left[:, :, :n] = projected.permute(2, 0, 1, 3)
        p_r = (probes @ c["r"])[..., None]  # [Bt, P, 1]
        left[:, :, n:] = torch.cat([p_r, p_e, p_sum, p_bias], dim=-1).transpose(1, 2)[:, None]  # [Bt, 1, 4, P]
        right = queries.new_empty(bt, bv, n + 4, g_count)
        if torch.is_grad_enabled():  # out= has no autograd; the same product, via a temporary
            right[:, :, : n + 1] = queries.permute(2, 0, 1, 3) * ry_g
        else:
            torch.mul(queries.permute(2, 0, 1, 3), ry_g, out=right[:, :, : n + 1])
        right[:, :, n + 1: n + 2] = r_g
        right[:, :, n + 2: n + 3] = -m_g * r_g
        right[:, :, n + 3:] = z_g
        out.append(small_batched_matmul(left.transpose(-1, -2), right))  # → [Bt, Bv, P, Qg]
    return out
