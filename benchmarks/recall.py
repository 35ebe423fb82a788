"""Recall-stage speed and index size: GRDR generative recall vs exact dense search.

One run, side by side, for 100k and 1M videos. Semantic IDs (4 views × 3 levels, K = 128) and
512-d L2-normalised features are drawn synthetically; the GRDR decoder is a small random model
(its speed does not depend on its weights). Both sides run single-threaded on batched queries and
are timed in process CPU time (stable on a shared machine). Decoding uses the KV-cached
`IncrementalDecoder`, as `GRDRRecall` does. IDs are uniform random, so at 1M videos nearly every
ID holds ~2 videos and the candidate sets are ~2× the beam count.

    GRDR:  text encoder → trie-constrained beam search (3 decoder steps) → ID → video expansion
    dense: text vector  → faiss IndexFlatIP exact top-100 over all N videos

The text encoder is timed on its own (both recall methods need one); the speed-up compares the
recall work proper: beam search + expansion vs the flat scan.

    .venv/bin/python benchmarks/recall.py [--sizes 100000 1000000] [--queries 64]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

WORDS = ("red blue green yellow purple orange circle square triangle star moves left right up down "
         "grows shrinks rotates blinks stays then on a dark light background small large").split()


def synthetic_queries(n: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 10))) for _ in range(n)]


def timed(fn):
    """(CPU seconds, result). Both sides run single-threaded, so process CPU time equals wall
    time on an idle machine and is not inflated by other jobs on a shared one."""
    start = time.process_time()
    out = fn()
    return time.process_time() - start, out


def build_dense_index(n: int, dim: int, rng: np.random.Generator, chunk: int = 100_000):
    import faiss

    index = faiss.IndexFlatIP(dim)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        index.add(block)
    return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="queries per batch")
    parser.add_argument("--beams", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--dense-k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import faiss

    from vidseek.index.trie import SemanticIdTrie
    from vidseek.models.grdr import GRDR, GRDRConfig, GRDRRecall, IncrementalDecoder, candidate_size_stats

    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = GRDRConfig(embed_dim=512, latent_dim=256, num_views=4, levels=3, codebook_size=128,
                     decoder_layers=2, decoder_heads=4, text_width=256, text_layers=2, text_heads=4,
                     context_length=32, dropout=0.0)
    model = GRDR(cfg).eval()
    texts = synthetic_queries(args.queries, rng)
    batches = [texts[i:i + args.batch] for i in range(0, len(texts), args.batch)]

    # Text encoding (shared cost: both recall methods need a query representation).
    with torch.no_grad():
        model.retriever.encode_text(model.tokenize(batches[0]))  # warm-up
        text_s, encoded = 0.0, []
        for b in batches:
            s, out = timed(lambda b=b: model.retriever.encode_text(model.tokenize(b)))
            text_s += s
            encoded.append(out)
    text_ms = 1000 * text_s / len(texts)

    def beam_search(trie, memory, mask, beams):
        with torch.no_grad():
            return trie.constrained_beam_search(IncrementalDecoder(model.retriever, memory, mask), len(memory), beams)

    rows, speedups, grdr_bytes, dense_bytes = [], {}, {}, {}
    for n in args.sizes:
        codes = rng.integers(0, cfg.codebook_size, size=(n, cfg.num_views, cfg.levels))
        build_s, trie = timed(lambda: SemanticIdTrie(codes, cfg.codebook_size))
        GRDRRecall(model, trie).recall(batches[0], args.beams[0])  # the public path works end to end
        grdr_bytes[n] = trie.bytes_per_video
        for beams in args.beams:
            beam_search(trie, *encoded[0], beams)  # warm-up
            decode_s, expand_s, sizes = 0.0, 0.0, []
            for memory, mask in encoded:
                s, (ids, _) = timed(lambda: beam_search(trie, memory, mask, beams))
                decode_s += s
                s, cands = timed(lambda: trie.candidates(ids))
                expand_s += s
                sizes.extend(len(c) for c in cands)
            decode_ms = 1000 * decode_s / len(texts)
            expand_ms = 1000 * expand_s / len(texts)
            rows.append((n, f"GRDR beams {beams}", decode_ms + expand_ms, decode_ms, expand_ms,
                         float(np.mean(sizes)), f"{trie.bytes_per_video} ({trie.total_bytes / n:.1f})"))
            speedups[(n, beams)] = rows[-1][2]

        index = build_dense_index(n, cfg.embed_dim, rng)
        queries = rng.standard_normal((args.queries, cfg.embed_dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        index.search(queries[: args.batch], args.dense_k)  # warm-up
        dense_s = sum(timed(lambda i=i: index.search(queries[i:i + args.batch], args.dense_k))[0]
                      for i in range(0, args.queries, args.batch))
        dense_ms = 1000 * dense_s / args.queries
        dense_bytes[n] = index.ntotal * index.d * 4 / n
        rows.append((n, f"dense flat top-{args.dense_k}", dense_ms, float("nan"), float("nan"),
                     float(args.dense_k), f"{dense_bytes[n]:.0f}"))
        for beams in args.beams:
            speedups[(n, beams)] = dense_ms / speedups[(n, beams)]
        del index
        print(f"[{n:,} videos] trie built in {build_s:.2f} s, {trie.num_ids:,} distinct IDs", flush=True)

    print()
    print(f"Recall CPU time per query (single thread, batches of {args.batch} queries, {args.queries} queries); "
          f"text encoder (tiny, shared by both) {text_ms:.2f} ms/query, not included below.")
    print()
    print("| videos | method | recall ms/query | decode ms | expand ms | candidates | bytes/video (with trie) |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for n, method, total, dec, exp, cands, size in rows:
        dec_s = "" if np.isnan(dec) else f"{dec:.2f}"
        exp_s = "" if np.isnan(exp) else f"{exp:.2f}"
        print(f"| {n:,} | {method} | {total:.2f} | {dec_s} | {exp_s} | {cands:.0f} | {size} |")
    print()
    for (n, beams), ratio in sorted(speedups.items()):
        print(f"speed-up vs dense at {n:,} videos, beams {beams}: {ratio:.1f}x")
    largest = max(args.sizes)
    label = "1M" if largest == 1_000_000 else f"{largest:,}"
    print(f"(headline: beams {max(args.beams)}; bytes = stored semantic IDs vs float32 vectors)")
    print(f"recall speed-up at {label}: {speedups[(largest, max(args.beams))]:.1f}x")
    print(f"bytes per video: grdr {grdr_bytes[largest]}, dense {dense_bytes[largest]:.0f}")


if __name__ == "__main__":
    main()
