"""Recall-stage speed and index size: GRDR generative recall vs exact dense search.

One run, side by side, for 100k and 1M videos. Semantic IDs (4 views × 3 levels, K = 128) and
512-d L2-normalised features are drawn synthetically; the GRDR decoder is a small random model
(its speed does not depend on its weights). Both sides run single-threaded on batched queries and
are timed in process CPU time (stable on a shared machine). Decoding runs as `GRDRRecall` does:
the KV-cached `IncrementalDecoder` with decoder block 0 read from the per-trie-node table
(`PrefixStates`, built once per index and timed separately), scoring beams in chunks of
`RECALL_BEAM_CHUNK` with the exact skip bound of `SemanticIdTrie.constrained_beam_search`. The
row "no node table (before)" is the same search computing block 0 per beam (the previous
implementation), timed in the same run, interleaved, and checked to return identical IDs. IDs
are uniform random, so at 1M videos nearly every ID holds ~2 videos and the candidate sets are
~2× the beam count.

    GRDR:  text encoder → trie-constrained beam search (3 decoder steps) → ID → video expansion
    dense: text vector  → faiss IndexFlatIP exact top-100 over all N videos

The text encoder is timed on its own (both recall methods need one); the speed-up compares the
recall work proper: beam search + expansion vs the flat scan.

With trained runs (`--grdr RUN --dense RUN --data DIR`), a second part measures the cascade on
the synthetic benchmark's test split (test-only pool): GRDR recall → rerank with the dense model
vs reranking the full corpus with the same model — T2V R@1 and wall-clock ms per query (query
encoding included) of each, side by side (`vidseek.eval.grdr_eval.run_grdr_eval`).

    .venv/bin/python benchmarks/recall.py [--sizes 100000 1000000] [--queries 64]
        [--grdr runs/grdr --dense runs/seqtransf --data runs/synth [--cascade-beams 100]]
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


def decoder_flops_per_beam(cfg, memory_length: float) -> float:
    """FLOPs (2 × multiply-adds) of decoding one beam one step with `IncrementalDecoder` and the
    node table: block 0 from the table, then its cross-attention output projection and MLP (9 W²);
    each later block's self-attention QKV/output, cross query/output and MLP (14 W²); the
    cross-attention over the query's `memory_length` positions in every block (2·L·W); the code
    logits (K·W). The cached self-attention over ≤ `levels` earlier positions is left out (< 1 %)."""
    w = cfg.width
    macs = 9 * w * w + (cfg.decoder_layers - 1) * 14 * w * w + cfg.decoder_layers * 2 * memory_length * w
    return 2.0 * (macs + cfg.codebook_size * w)


def beam_steps_per_query(model, trie, encoded, beams: int, states, chunk: int) -> float:
    """Beams decoded per query (summed over levels) by the same search, counted outside the timing."""
    from vidseek.models.grdr import IncrementalDecoder

    count, queries = 0, 0

    class Counting(IncrementalDecoder):
        def __call__(self, prefixes, ancestors, rows, first):
            nonlocal count
            count += prefixes.shape[0] * prefixes.shape[1]
            return super().__call__(prefixes, ancestors, rows, first)

    with torch.no_grad():
        for memory, mask in encoded:
            trie.constrained_beam_search(Counting(model.retriever, memory, mask, states), len(memory), beams,
                                         chunk=chunk)
            queries += len(memory)
    return count / queries


def build_dense_index(n: int, dim: int, rng: np.random.Generator, chunk: int = 100_000):
    import faiss

    index = faiss.IndexFlatIP(dim)
    for start in range(0, n, chunk):
        block = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        index.add(block)
    return index


def cascade_part(args: argparse.Namespace) -> list[str]:
    """GRDR recall → rerank vs full-corpus rerank on real runs; lines to print (or why skipped)."""
    if not (args.grdr and args.data):
        return ["cascade part skipped: pass --grdr RUN --data DIR (and --dense RUN to choose the reranker)"]
    from vidseek.eval.grdr_eval import run_grdr_eval

    torch.set_num_threads(1)
    m = run_grdr_eval(args.grdr, args.data, split=args.split, beams=args.cascade_beams, rerank=args.dense,
                      device="cpu", progress=False, echo=False)
    return [
        f"Cascade on {args.data} [{args.split}]: {int(m['num_videos'])} videos, {int(m['num_queries'])} queries, "
        f"beams {int(m['beams'])}, reranker {args.dense or 'its own dense model'} (wall clock, 1 thread)",
        "",
        "| method | T2V R@1 | R@5 | R@10 | ms/query | candidates/query | recall hit rate |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| GRDR recall → rerank | {m['cascade.R@1']:.1f} | {m['cascade.R@5']:.1f} | {m['cascade.R@10']:.1f} | "
        f"{m['cascade.ms_per_query']:.2f} | {m['grdr.candidates.mean']:.1f} | {m['grdr.hit_rate']:.1f} |",
        f"| full-corpus rerank | {m['full.R@1']:.1f} | {m['full.R@5']:.1f} | {m['full.R@10']:.1f} | "
        f"{m['full.ms_per_query']:.2f} | {int(m['num_videos'])} | 100.0 |",
        f"| dense top-C, same count per query | | | | | {m['grdr.candidates.mean']:.1f} | {m['dense.hit_rate_same_size']:.1f} |",
        "",
        f"cascade R@1 = {m['cascade.R@1_vs_full']:.1f}% of full-corpus R@1; "
        f"views sharing a full ID: {m[f'grdr.views.same_prefix.l{run_levels(m)}']:.1f}%",
    ]


def run_levels(metrics: dict) -> int:
    return max(int(k.rsplit(".l", 1)[1]) for k in metrics if k.startswith("grdr.views.same_prefix.l"))


def gemm_peak(side: int = 1536, repeats: int = 5) -> float:
    """fp32 GEMM FLOP/s of one thread: the best of `repeats` square `torch.mm` products, in process
    CPU time like every timing here (wall-clock time would count the other jobs of a busy machine)."""
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b  # warm-up
    return max(2 * side ** 3 / timed(lambda: a @ b)[0] for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32, help="queries per batch")
    parser.add_argument("--beams", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--dense-k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grdr", help="trained GRDR run (cascade part)")
    parser.add_argument("--dense", help="dense run that reranks in the cascade part (default: the GRDR run's own)")
    parser.add_argument("--data", help="dataset folder of the cascade part (e.g. the synthetic benchmark)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cascade-beams", type=int, default=None, help="default: the GRDR preset's test-only pool width")
    args = parser.parse_args()

    cascade_lines = cascade_part(args)

    import faiss

    from vidseek.index.trie import SemanticIdTrie
    from vidseek.models.grdr import GRDR, RECALL_BEAM_CHUNK, GRDRConfig, GRDRRecall, IncrementalDecoder, PrefixStates

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

    def beam_search(trie, memory, mask, beams, states=None):
        with torch.no_grad():
            return trie.constrained_beam_search(IncrementalDecoder(model.retriever, memory, mask, states), len(memory),
                                                beams, chunk=RECALL_BEAM_CHUNK)

    rows, speedups, decode_gain, grdr_bytes, dense_bytes, table_s, floors = [], {}, {}, {}, {}, {}, {}
    memory_length = float(np.mean([mask.sum(dim=1).float().mean().item() for _, mask in encoded]))
    flops_per_beam = decoder_flops_per_beam(cfg, memory_length)
    for n in args.sizes:
        codes = rng.integers(0, cfg.codebook_size, size=(n, cfg.num_views, cfg.levels))
        build_s, trie = timed(lambda: SemanticIdTrie(codes, cfg.codebook_size))
        table_s[n], states = timed(lambda: PrefixStates(model.retriever, trie))
        GRDRRecall(model, trie).recall(batches[0], args.beams[0])  # the public path works end to end
        grdr_bytes[n] = trie.bytes_per_video
        for beams in args.beams:
            beam_search(trie, *encoded[0], beams, states)  # warm-up
            before_s, decode_s, expand_s, sizes = 0.0, 0.0, 0.0, []
            for memory, mask in encoded:  # both decoders on the same batch, interleaved
                s, (ids, _) = timed(lambda: beam_search(trie, memory, mask, beams, states))
                decode_s += s
                s, (ids_before, _) = timed(lambda: beam_search(trie, memory, mask, beams))
                before_s += s
                if not torch.equal(ids, ids_before):
                    raise SystemExit("beam search with and without the node table disagree")
                s, cands = timed(lambda: trie.candidates(ids))
                expand_s += s
                sizes.extend(len(c) for c in cands)
            decode_ms = 1000 * decode_s / len(texts)
            expand_ms = 1000 * expand_s / len(texts)
            before_ms = 1000 * before_s / len(texts)
            rows.append((n, f"GRDR beams {beams}, no node table (before)", before_ms + expand_ms, before_ms,
                         expand_ms, float(np.mean(sizes)), f"{trie.bytes_per_video} ({trie.total_bytes / n:.1f})"))
            rows.append((n, f"GRDR beams {beams}", decode_ms + expand_ms, decode_ms, expand_ms,
                         float(np.mean(sizes)), f"{trie.bytes_per_video} ({trie.total_bytes / n:.1f})"))
            steps = beam_steps_per_query(model, trie, encoded, beams, states, RECALL_BEAM_CHUNK)
            floors[(n, beams)] = (steps, steps * flops_per_beam, decode_ms)
            speedups[(n, beams)] = rows[-1][2]
            decode_gain[(n, beams)] = before_ms / decode_ms

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
        print(f"[{n:,} videos] trie built in {build_s:.2f} s, {trie.num_ids:,} distinct IDs; node table "
              f"({sum(len(t) for t in states.residual):,} prefix nodes) in {table_s[n]:.2f} s", flush=True)

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
        print(f"speed-up vs dense at {n:,} videos, beams {beams}: {ratio:.1f}x; decoding with the node table vs "
              f"without: {decode_gain[(n, beams)]:.2f}x")
    peak = gemm_peak()
    print()
    print(f"GEMM floor of decoding (fp32 GEMM peak in this run: {peak / 1e9:.1f} GFLOP/s, best of 5 square 1536 "
          f"torch.mm, 1 thread, CPU time; {flops_per_beam / 1e6:.2f} MFLOP per decoded beam at {memory_length:.1f} text "
          "positions):")
    for (n, beams), (steps, flops, decode_ms) in sorted(floors.items()):
        floor_ms = 1000 * flops / peak
        print(f"  {n:,} videos, beams {beams}: {steps:.1f} beams decoded per query -> {flops / 1e6:.0f} MFLOP, "
              f"floor {floor_ms:.2f} ms; decoding took {decode_ms:.2f} ms ({100 * floor_ms / decode_ms:.0f}% of peak)")
    largest = max(args.sizes)
    label = "1M" if largest == 1_000_000 else f"{largest:,}"
    print()
    for line in cascade_lines:
        print(line)
    print(f"(headline: beams {max(args.beams)}; bytes = stored semantic IDs vs float32 vectors)")
    print(f"recall speed-up at {label}: {speedups[(largest, max(args.beams))]:.1f}x")
    headline = [r for r in rows if r[0] == largest and r[1] == f"GRDR beams {max(args.beams)}"][0]
    print(f"GRDR ms/query at {label}, beams {max(args.beams)}: {headline[2]:.2f}")
    print(f"bytes per video: grdr {grdr_bytes[largest]}, dense {dense_bytes[largest]:.0f}")


if __name__ == "__main__":
    main()
