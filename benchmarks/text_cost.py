"""Query text encoding: every context position vs only up to the batch's last EOT, side by side.

A CLIP text tower is causal, so its outputs at SOT .. EOT do not depend on the padding after EOT;
models whose scores never read padding positions (two-tower / PIG sentences, GRDR's masked
memory) encode only `used_length(tokens)` positions (`ClipBackbone.encode_text(skip_padding=True)`).
This script times both ways on the same random queries (4-11 words from the synthetic vocabulary,
as `benchmarks/query_cost.py`), alternating query by query, in process CPU time on one thread,
for single queries and batches, and checks that the sentence features agree.

    .venv/bin/python benchmarks/text_cost.py [--sizes tiny ViT-B-32] [--contexts 32 77] [--queries 48]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

WORDS = ("red blue green yellow purple orange circle square triangle star moves left right up down "
         "grows shrinks rotates blinks stays then on a dark light background small large").split()


def query_texts(count: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(count)]


def cpu_ms(fn) -> tuple[float, object]:
    start = time.process_time()
    out = fn()
    return 1000 * (time.process_time() - start), out


@torch.no_grad()
def measure(clip, texts: list[str], context: int, batch: int) -> tuple[float, float, float, float]:
    """(median ms per query with every position, the same up to the last EOT, max |Δ sentence|,
    mean positions encoded) over batches of `batch` queries."""
    from vidseek.encoders.tokenizer import used_length

    full_ms, skip_ms, diff, used = [], [], 0.0, []
    for i in range(0, len(texts) - batch + 1, batch):
        tokens = clip.tokenize(texts[i:i + batch], context_length=context)
        a_ms, a = cpu_ms(lambda: clip.encode_text(tokens))
        b_ms, b = cpu_ms(lambda: clip.encode_text(tokens, skip_padding=True))
        full_ms.append(a_ms / batch)
        skip_ms.append(b_ms / batch)
        diff = max(diff, float((a.sentence - b.sentence).abs().max()))
        used.append(used_length(tokens))
    return statistics.median(full_ms), statistics.median(skip_ms), diff, float(np.mean(used))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "ViT-B-32"])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 77])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--queries", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from vidseek.encoders import build_clip

    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    texts = query_texts(args.queries, rng)
    print(f"Text encoding per query, median over batches, process CPU time, 1 thread; {args.queries} queries of "
          "4-11 words; random-init towers (speed does not depend on the weights).")
    print()
    print("| tower | context | batch | positions encoded (mean) | every position ms | up to last EOT ms | speed-up | "
          "max abs diff (sentence) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.sizes:
        torch.manual_seed(args.seed)
        clip = build_clip(name, context_length=max(args.contexts)).eval()
        for context in args.contexts:
            for batch in args.batches:
                measure(clip, texts[:batch], context, batch)  # warm-up
                full, skip, diff, used = measure(clip, texts, context, batch)
                print(f"| {name} | {context} | {batch} | {used:.1f} | {full:.2f} | {skip:.2f} | {full / skip:.1f}x | "
                      f"{diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
