"""TC-MGC pairwise scoring: our exact fast blocked scorer vs the release's way of computing it.

    .venv/bin/python benchmarks/rerank.py                  # 1000 × 1000, W 32, T 12, D 512
    .venv/bin/python benchmarks/rerank.py --threads 2 --ref-texts 20   # an idle 2-core machine

Both sides score the SAME random inputs with the SAME random-weight model (eval mode, LayerNorm
affines and the residual FC moved off their initial values so the check is not trivial), in
the same run:

* ours       — `TCMGC.score_blocked` (METHODS.md TC-MGC item 7: per-video matrices, no
               [B_t, W, B_v, D] tensor), including the per-video precomputation.
* direct     — our vectorised direct path (one batched LVA op that materialises the
               word-conditioned frames), on the reference subset.
* reference  — written the way the release computes it: the LVA block applied twice for the
               sentence, then a Python loop over the W words applying it twice per word,
               materialising [B_t, W, B_v, D], then the four similarity heads.

The reference is too slow (and too large: 1000×32×1000×512 floats = 65 GB) for the full matrix
on 2 cores, so it scores the first `--ref-texts` texts against all videos in blocks of
`--ref-block` texts; pairs/s are compared. Outputs are checked on that subset (max abs diff).

Time: wall-clock and process CPU time of each scorer. `speed-up:` compares pairs per CPU-second,
which time spent descheduled on a shared machine does not inflate; the wall-clock ratio is
printed beside it.

Memory: peak live heap during each run minus the heap before it (glibc `mallinfo2`: bytes in
use in malloc'd chunks + mmapped chunks — this includes every torch CPU tensor), sampled every
millisecond by a background thread. Falls back to peak RSS growth where mallinfo2 is missing.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import sys
import threading
import time
from typing import Callable

import torch
from threadpoolctl import threadpool_limits
from torch import Tensor, nn

from vidseek.models.base import FrameFeatures, TextFeatures
from vidseek.models.tcmgc import TCMGC, TCMGCConfig


# --- memory probe ---------------------------------------------------------------------------------

class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_reader() -> tuple[Callable[[], int], str]:
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
        fn.restype = _MallInfo2

        def live() -> int:
            info = fn()
            return int(info.uordblks + info.hblkhd)

        live()
        return live, "peak live heap (glibc mallinfo2, in-use + mmapped), sampled every 1 ms"
    except (OSError, AttributeError):
        import resource

        return (lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "peak RSS growth (ru_maxrss; monotone, so later rows may under-report)")


HEAP_NOW, HEAP_METHOD = _heap_reader()


class PeakHeap:
    """Context manager: `.peak_bytes` = max sampled heap during the block minus the heap before it."""

    def __enter__(self) -> "PeakHeap":
        self.start = HEAP_NOW()
        self.peak = self.start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, HEAP_NOW())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, HEAP_NOW())
        self.peak_bytes = self.peak - self.start


# --- the release-style reference --------------------------------------------------------------------

def release_style_lva(model: TCMGC, text_embeds: Tensor, video_embeds: Tensor) -> Tensor:
    """One LVA call as the release does it: texts [Nt,D] × videos [Nv,T,D] → [Nt,Nv,D]."""
    lva = model.lva
    heads = lva.heads
    t = lva.ln_query_key(text_embeds)
    v = lva.ln_query_key(video_embeds)
    nt, d = t.shape
    nv, nf, _ = v.shape
    hd = d // heads
    q = t.reshape(nt, heads, hd).permute(1, 2, 0)  # heads × hd × Nt
    k = v.reshape(nv, nf, heads, hd).permute(0, 2, 1, 3)  # Nv × heads × T × hd
    vals = v.reshape(nv, nf, heads, hd).permute(0, 2, 3, 1)  # Nv × heads × hd × T
    weights = torch.softmax((k @ q) / math.sqrt(hd), dim=2)  # Nv × heads × T × Nt
    attended = (vals @ weights).permute(0, 3, 1, 2).reshape(nv, nt, d)
    attended = lva.ln_attended(attended)
    out = attended + lva.dropout(lva.fc(attended))
    return lva.ln_out(out).permute(1, 0, 2)


def release_style_isa(s: Tensor, a: Tensor, lam: float, dim: int) -> Tensor:
    """softmax(λ·(softmax(λ·s)·A)) along `dim`, then the weighted sum along `dim`."""
    moved = s.movedim(dim, -1)
    weights = torch.softmax(torch.softmax(moved * lam, dim=-1) @ a * lam, dim=-1)
    return (weights * moved).sum(-1)


def release_style_scores(model: TCMGC, sentence: Tensor, words: Tensor, frames: Tensor) -> Tensor:
    """Scores [Nt,Nv] (÷ logit scale), computed the release's way (faithful default config)."""
    cfg, lam = model.config, model.config.isa_lambda
    # the sentence: the LVA block is run, its result dropped, and run again
    release_style_lva(model, sentence, frames)
    video_output = release_style_lva(model, sentence, frames)  # [Nt,Nv,D]
    fine = []
    for i in range(words.shape[1]):  # the Python loop over words, again twice per word
        release_style_lva(model, words[:, i], frames)
        fine.append(release_style_lva(model, words[:, i], frames).unsqueeze(1))
    frame_features = torch.cat(fine, dim=1)  # [Nt,W,Nv,D]
    video_output = video_output / video_output.norm(dim=-1, keepdim=True)
    frame_features = frame_features / frame_features.norm(dim=-1, keepdim=True)
    sent = sentence / sentence.norm(dim=-1, keepdim=True)
    word = words / words.norm(dim=-1, keepdim=True)
    scale = model.logit_scale()
    w = words.shape[1]

    vs = scale * (sent.unsqueeze(1) @ model.global_projection @ video_output.permute(0, 2, 1)).squeeze(1)

    vw_all = word @ video_output.permute(0, 2, 1)  # [Nt,W,Nv]
    k = int(w * cfg.video_word_keep)
    vw_top = vw_all.gather(1, vw_all.topk(k, dim=1).indices)
    vw = scale * release_style_isa(vw_top, model.isa["video_word"], lam, dim=1)

    sf_all = torch.einsum("td,twvd->twv", sent, frame_features)
    k = int(w * cfg.sentence_frame_keep)
    sf_top = sf_all.gather(1, sf_all.topk(k, dim=1).indices)
    sf_rest = sf_all.gather(1, sf_all.topk(w - k, dim=1, largest=False).indices)
    fused = (sf_rest.softmax(dim=1) * sf_rest).sum(1, keepdim=True)
    sf = scale * release_style_isa(torch.cat([sf_top, fused], 1), model.isa["sentence_frame"], lam, dim=1)

    fw_all = torch.einsum("twd,tfvd->twvf", word @ model.local_projection, frame_features)
    k = int(w * cfg.frame_word_keep)
    by_video = fw_all.permute(0, 2, 1, 3)  # [Nt,Nv,W(words),W(frames)]
    by_video = by_video.gather(2, by_video.topk(k, dim=2).indices)
    by_video = by_video.gather(3, by_video.topk(k, dim=3).indices)  # [Nt,Nv,k,k]
    per_frame = release_style_isa(by_video, model.isa["frame_word_words_first"], lam, dim=2)
    words_then_frames = release_style_isa(per_frame, model.isa["frame_word_frames_second"], lam, dim=2)
    per_word = release_style_isa(by_video, model.isa["frame_word_frames_first"], lam, dim=3)
    frames_then_words = release_style_isa(per_word, model.isa["frame_word_words_second"], lam, dim=2)
    fw = scale * (words_then_frames + frames_then_words) / 2

    logits = torch.stack([vs, vw, sf, fw])
    weights = torch.softmax((logits.permute(1, 2, 0) @ model.lsa).permute(2, 0, 1), dim=0)
    return (logits * weights).sum(0) / scale


# --- the run --------------------------------------------------------------------------------------


def build(args: argparse.Namespace) -> tuple[TCMGC, TextFeatures, FrameFeatures]:
    class Clip(nn.Module):
        embed_dim = args.dim

    torch.manual_seed(args.seed)
    model = TCMGC(Clip(), TCMGCConfig(max_words=args.words, max_frames=args.frames)).eval()
    with torch.no_grad():  # random LayerNorm affines and a learned-looking residual FC
        for ln in (model.lva.ln_query_key, model.lva.ln_attended, model.lva.ln_out):
            ln.weight.add_(0.2 * torch.randn_like(ln.weight))
            ln.bias.add_(0.2 * torch.randn_like(ln.bias))
        model.lva.fc.weight.add_(torch.randn_like(model.lva.fc.weight) / math.sqrt(args.dim))
        model.lva.fc.bias.add_(0.1 * torch.randn_like(model.lva.fc.bias))
    text = TextFeatures(sentence=torch.randn(args.texts, args.dim), words=torch.randn(args.texts, args.words, args.dim),
                        mask=torch.ones(args.texts, args.words, dtype=torch.bool))
    frames = FrameFeatures(frames=torch.randn(args.videos, args.frames, args.dim),
                           mask=torch.ones(args.videos, args.frames, dtype=torch.bool))
    return model.to(args.device), _to(text, args.device), _to(frames, args.device)


def _to(x, device):
    from vidseek.models.base import tree_to

    return tree_to(x, device)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fast_path_flops(words: int, frames: int, dim: int, heads: int) -> int:
    """Multiply-adds ×2 of `tcmgc_fast.probe_dots` per (text, video) pair: the one GEMM of
    attention logits and key-space probe projections (n × (Q + P) × D), the sentence's X·y and
    probe dots, the (n+4)-long contraction per (probe, word), and the n×n / (n+1)² quadratic forms."""
    n, queries, probes = heads * frames, words + 1, words + 1
    return 2 * (n * (queries + probes) * dim + (n + 1) * dim + probes * dim
                + (n + 4) * probes * words + n * n * queries + 2 * (n + 1) ** 2 * queries + 6 * (n + 1) * queries)


def gemm_peak(device: str, side: int = 1536, repeats: int = 5) -> float:
    """This machine's fp32 GEMM peak in the same run and thread setting: the best FLOP/s of
    `repeats` plain square `torch.mm` products (best, not mean: a peak on a shared machine)."""
    a, b = torch.randn(side, side, device=device), torch.randn(side, side, device=device)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = max(best, 2 * side ** 3 / (time.perf_counter() - start))
    return best


def timed(fn: Callable[[], Tensor], device: str) -> tuple[Tensor, float, float, int]:
    """(output, wall seconds, process CPU seconds, peak heap bytes) of one call. CPU time is what a
    shared machine cannot steal (time spent descheduled is not in it); with one thread it is the
    wall time of an idle machine. It includes the heap sampler's share (~0.1 %, both sides)."""
    _sync(device)
    with PeakHeap() as heap:
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        _sync(device)
        seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    if device.startswith("cuda"):  # the host's CPU time says nothing about a GPU's work
        cpu = seconds
    return out, seconds, cpu, heap.peak_bytes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--videos", type=int, default=1000)
    parser.add_argument("--words", type=int, default=32)
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--ref-texts", type=int, default=10, help="texts the reference scores (against all videos)")
    parser.add_argument("--ref-block", type=int, default=2, help="texts per reference block (memory)")
    parser.add_argument("--block-elements", type=int, default=1 << 25, help="max_block_elements for ours")
    # 1 thread by default: on a shared or busy machine OpenMP threads oversubscribe the cores and
    # the many medium-sized ops of a blocked scorer stall at every parallel-region barrier.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    # numpy's BLAS (the fast path's small batched matmul) gets the same thread count as torch
    blas_threads = threadpool_limits(args.threads)
    model, text, frames = build(args)
    peak = gemm_peak(args.device)
    ref_texts = min(args.ref_texts, args.texts)
    with torch.no_grad():
        video = model.encode_video_features(frames)  # temporal encoder: shared input of every row
        ours, t_ours, c_ours, m_ours = timed(
            lambda: model.score_blocked(text, video, args.block_elements, exact_fast=True), args.device)
        _, t_pre, _, _ = timed(lambda: model.precompute_video(video), args.device)
        subset = TextFeatures(text.sentence[:ref_texts], text.words[:ref_texts], text.mask[:ref_texts])
        direct, t_direct, c_direct, m_direct = timed(
            lambda: model.score_blocked(subset, video, args.block_elements, exact_fast=False), args.device)

        def reference() -> Tensor:
            rows = [release_style_scores(model, subset.sentence[i:i + args.ref_block],
                                         subset.words[i:i + args.ref_block], video.frames)
                    for i in range(0, ref_texts, args.ref_block)]
            return torch.cat(rows)

        ref, t_ref, c_ref, m_ref = timed(reference, args.device)

    diff_ref = (ours[:ref_texts] - ref).abs().max().item()
    diff_direct = (ours[:ref_texts] - direct).abs().max().item()
    pairs_full, pairs_sub = args.texts * args.videos, ref_texts * args.videos
    rate_ours, rate_direct, rate_ref = pairs_full / t_ours, pairs_sub / t_direct, pairs_sub / t_ref
    cpu_ours, cpu_direct, cpu_ref = pairs_full / c_ours, pairs_sub / c_direct, pairs_sub / c_ref
    device = args.device if args.device != "cpu" else f"cpu, {args.threads} thread(s)"
    print(f"# TC-MGC pairwise scoring — W {args.words}, T {args.frames}, D {args.dim}, eval mode, random weights, "
          f"float32, {device}")
    print(f"memory column: {HEAP_METHOD}")
    print(f"ours = exact fast blocked scorer (max_block_elements {args.block_elements}); includes per-video "
          f"precomputation ({t_pre:.2f} s of it alone for {args.videos} videos)")
    print(f"reference = release-style (LVA applied twice, Python loop over words), on the first {ref_texts} texts "
          f"× {args.videos} videos in blocks of {args.ref_block} texts; pairs/s compared")
    print()
    print("| scorer | pairs | seconds | pairs/s | CPU seconds | pairs/CPU-s | peak memory (MiB) | max abs diff vs ours |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| ours (exact fast, blocked) | {args.texts}×{args.videos} | {t_ours:.2f} | {rate_ours:,.0f} | {c_ours:.2f} | "
          f"{cpu_ours:,.0f} | {m_ours / 2**20:.0f} | — |")
    print(f"| direct (vectorised LVA) | {ref_texts}×{args.videos} | {t_direct:.2f} | {rate_direct:,.0f} | "
          f"{c_direct:.2f} | {cpu_direct:,.0f} | {m_direct / 2**20:.0f} | {diff_direct:.1e} |")
    print(f"| reference (release-style) | {ref_texts}×{args.videos} | {t_ref:.2f} | {rate_ref:,.0f} | {c_ref:.2f} | "
          f"{cpu_ref:,.0f} | {m_ref / 2**20:.0f} | {diff_ref:.1e} |")
    print()
    print(f"speed-up vs vectorised direct (CPU time): {cpu_ours / cpu_direct:.1f}x")
    flops = fast_path_flops(args.words, args.frames, args.dim, model.config.attention_heads)
    achieved = flops * cpu_ours
    print(f"fast path: {flops / 1e6:.2f} MFLOP per pair → {achieved / 1e9:.1f} GFLOP/s; this machine's fp32 GEMM "
          f"peak in this run (best of 5 square 1536 torch.mm, same threads): {peak / 1e9:.1f} GFLOP/s — the fast "
          f"path runs at {100 * achieved / peak:.0f}% of it (per-video precomputation and the similarity heads "
          f"count as overhead)")
    if diff_ref > 1e-4:
        print(f"WARNING: ours and the reference differ by {diff_ref:.2e}", file=sys.stderr)
    print(f"speed-up in wall-clock time: {rate_ours / rate_ref:.1f}x")
    print(f"speed-up: {cpu_ours / cpu_ref:.1f}x  (pairs per CPU-second, ours vs reference)")
    blas_threads.unregister()


if __name__ == "__main__":
    main()
