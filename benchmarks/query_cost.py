"""Query-time cost of PIG vs its two-tower baseline, side by side in one run.

The Hybrid-Tower claim (METHODS.md, "PIG"): the pseudo-query generation and the fine-grained
interaction happen when a video is indexed, so the index holds one D vector per video and a
query costs one text encoding plus one dense search — exactly as for a two-tower model.

For each CLIP size (the tiny test config and a ViT-B/32-sized model, both random init; speed
does not depend on the weights) this script builds PIG (CLIP-ViP backbone, generator + fusion)
and PIG's baseline (same backbone, generator and fusion off), and for each:

  1. encodes a few random-pixel videos with `encode_frames` → `encode_video_features` →
     `index_video` (offline work: PIG pays its generator + fusion here, reported for reference);
  2. fills a FAISS flat inner-product index (`vidseek.index.FaissDenseIndex`) with N vectors
     (the encoded vectors repeated with small noise, L2-normalised), saves it, and measures the
     bytes per video on disk and in the stored vector;
  3. times single queries: tokenize → `encode_text` → `index_text` → `search(k)`; the two models
     alternate query by query so machine load hits both alike. Medians are reported.

    .venv/bin/python benchmarks/query_cost.py [--sizes tiny ViT-B-32] [--index-size 100000]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

WORDS = ("red blue green yellow purple orange circle square triangle star moves left right up down "
         "grows shrinks rotates blinks stays then on a dark light background small large").split()

#: CLIP name → (frames, words) as in the presets (synth-pig-tiny; msrvtt9k-pig-b32).
SIZES = {"tiny": (8, 32), "ViT-B-32": (12, 50)}


@dataclass
class Measured:
    label: str
    dim: int
    vector_bytes: int  # bytes of one index_video vector
    file_bytes_per_video: float  # saved index folder size / N
    video_encode_ms: float  # offline, per video
    text_ms: list[float]
    search_ms: list[float]

    @property
    def query_ms(self) -> float:
        return statistics.median(t + s for t, s in zip(self.text_ms, self.search_ms))


def build(clip_name: str, words: int, generator: bool, seed: int):
    from vidseek.encoders import build_clip
    from vidseek.models.pig import PIG, PIGConfig

    torch.manual_seed(seed)
    config = PIGConfig(generator=generator, fusion=generator)
    return PIG(build_clip(clip_name, context_length=words), config).eval()


@torch.no_grad()
def encode_videos(model, frames: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    size = model.clip.image_size
    pixels = torch.from_numpy(rng.standard_normal((count, frames, 3, size, size), dtype=np.float32))
    mask = torch.ones(count, frames, dtype=torch.bool)
    start = time.perf_counter()
    vectors = [model.index_video(model.encode_video_features(model.encode_frames(pixels[i:i + 1], mask[i:i + 1])))
               for i in range(count)]
    per_video_ms = 1000 * (time.perf_counter() - start) / count
    return torch.cat(vectors).numpy(), per_video_ms


def fill_index(vectors: np.ndarray, n: int, folder: Path, rng: np.random.Generator):
    from vidseek.index import FaissDenseIndex

    index = FaissDenseIndex(vectors.shape[1], index_type="flat")
    chunk = 50_000
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        block = vectors[rng.integers(0, len(vectors), rows)] + 0.05 * rng.standard_normal((rows, vectors.shape[1]), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        index.add(np.arange(start, start + rows, dtype=np.int64), block.astype(np.float32))
    index.save(folder)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    return index, size / n


def query_texts(count: int, rng: np.random.Generator) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=rng.integers(4, 12))) for _ in range(count)]


@torch.no_grad()
def time_query(model, index, text: str, words: int, k: int) -> tuple[float, float]:
    start = time.perf_counter()
    tokens = model.clip.tokenize([text], context_length=words)
    query = model.index_text(model.encode_text(tokens)).numpy()
    mid = time.perf_counter()
    index.search(query, k)
    end = time.perf_counter()
    return 1000 * (mid - start), 1000 * (end - mid)


def measure_size(clip_name: str, args, rng: np.random.Generator) -> list[Measured]:
    frames, words = SIZES[clip_name]
    models = {"PIG": build(clip_name, words, True, args.seed), "PIG baseline": build(clip_name, words, False, args.seed)}
    results, indexes = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, model in models.items():
            vectors, video_ms = encode_videos(model, frames, args.videos, rng)
            index, per_video = fill_index(vectors, args.index_size, Path(tmp) / label.replace(" ", "_"), rng)
            indexes[label] = index
            results[label] = Measured(label, vectors.shape[1], vectors.shape[1] * vectors.itemsize, per_video,
                                      video_ms, [], [])
        texts = query_texts(args.queries + args.warmup, rng)
        for i, text in enumerate(texts):
            for label, model in models.items():  # alternate: load on the machine hits both alike
                text_ms, search_ms = time_query(model, indexes[label], text, words, args.k)
                if i >= args.warmup:
                    results[label].text_ms.append(text_ms)
                    results[label].search_ms.append(search_ms)
    return list(results.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--index-size", type=int, default=100_000, help="videos in each index (N)")
    parser.add_argument("--videos", type=int, default=4, help="videos actually encoded per model")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)

    print(f"N = {args.index_size:,} videos per index, {args.queries} single queries (median), top-{args.k}, "
          f"{args.threads} thread(s), FAISS flat inner product, random-init weights\n")
    print("| CLIP | model | D | vector bytes | index bytes/video | text ms | search ms | query ms | video encode ms (offline) |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for clip_name in args.sizes:
        pig, base = measure_size(clip_name, args, rng)
        for m in (pig, base):
            print(f"| {clip_name} | {m.label} | {m.dim} | {m.vector_bytes} | {m.file_bytes_per_video:.1f} | "
                  f"{statistics.median(m.text_ms):.2f} | {statistics.median(m.search_ms):.2f} | {m.query_ms:.2f} | "
                  f"{m.video_encode_ms:.1f} |")
        ratios.append((clip_name, pig.file_bytes_per_video / base.file_bytes_per_video, pig.query_ms / base.query_ms,
                       pig.video_encode_ms / base.video_encode_ms))
    print("\nPIG / baseline:")
    for clip_name, bytes_ratio, query_ratio, video_ratio in ratios:
        print(f"- {clip_name}: index bytes {bytes_ratio:.2f}x, query latency {query_ratio:.2f}x "
              f"(offline video encoding {video_ratio:.2f}x)")


if __name__ == "__main__":
    main()
