"""Whole queries through a recall → TC-MGC cascade, against what a user would otherwise run.

Five ways to answer a text query over N videos (issue 14), side by side in one run:

    (a) dense        text → vidseek's dense index (FaissDenseIndex "auto": IVF-flat at 100k/1M) → top-10
    (b) dense→TC-MGC text → dense index top-N → TC-MGC scores the N candidates
    (c) GRDR→TC-MGC  text → GRDR trie-constrained beam search → candidate videos → TC-MGC
    (d) IVF-PQ→TC-MGC text → FAISS IVF-PQ (OPQ) with as many code bytes per video as GRDR's semantic
                     IDs → top-|C| (GRDR's candidate count) → TC-MGC
    (e) full TC-MGC  text → TC-MGC scores all N videos (timed on a pool, extrapolated linearly)

**Speed** (`--sizes`, default 100k; 1M as its own call): synthetic 512-d clustered vectors
(benchmarks/search.py's generator), random GRDR semantic IDs (benchmarks/recall.py's setup), and
the product's ViT-B/32 models at random init (their cost does not depend on their weights): the
dense recall model is `msrvtt9k-meanp-b32`, GRDR is `msrvtt9k-grdr-b32` (CLIP text tower,
4 views × 3 levels × K = 128), the reranker `msrvtt9k-tcmgc-b32` (W 32, T 12, D 512). Every model
encodes the query with its own text tower, and that time is in every row (the full-corpus row
pays one text encoding, a cascade two). TC-MGC reads the per-video matrices precomputed at index
time (`precompute_video`) for a pool of `--pool` synthetic videos; candidate i uses pool row
i mod pool — the cost of scoring a candidate does not depend on which video it is. One thread
(torch and FAISS), queries in batches of `--batch`, process CPU time per query.

**Quality** (`--grdr RUN --tcmgc RUN --data DIR`): trained runs on the synthetic benchmark.
Gallery = every clip of the dataset (train, val and test: the test clips plus the others as
distractors), queries = the test split's captions; T2V R@1/5/10 of each row and its R@1
retention = R@1 / full-corpus TC-MGC R@1. The dense model is the one the GRDR run was trained on
(`vidseek train --preset synth-grdr-tiny --init DENSE_RUN`); its gallery vectors feed the dense
index and the IVF-PQ rows (PQ there scans every code: the gallery is too small for IVF lists,
so the PQ rows are an upper bound for IVF-PQ). The best cascade is the fastest row with
retention ≥ `--target-retention` (else the one with the highest retention).

The GRDR vs IVF-PQ comparison at equal memory (12–24 bytes per video: PQ12, OPQ12, PQ24, OPQ24,
vectors zero-padded to a multiple of the code size — padding leaves inner products unchanged)
prints candidate hit rate (ground truth among the candidates), cascade R@1 retention and
ms/query of recall at each size.

    .venv/bin/python benchmarks/cascade.py --grdr runs/grdr --tcmgc runs/tcmgc --data data/synth
        [--sizes 100000] [--cache /tmp/cascade] [--build-only]

Built indexes are cached under `--cache` (keyed by size and seed); `--build-only` builds them
and exits, so the timed call stays short. The output ends with
`cascade speed-up vs full TC-MGC at 100k: N.Nx` and `cascade R@1 retention: P.P%`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Sequence

import numpy as np
import torch

KS = (1, 5, 10)
PQ_VARIANTS = ("pq12", "opq12", "pq24", "opq24")  # GRDR's 12 B/video (4 views × 3 one-byte codes), and twice that
DENSE_TOP = 10
PQ_TRAIN_SAMPLE = 32_768  # ≥ 39 × 256 (PQ codebooks) and 32 × nlist at 100k: enough, and cheap
OPQ_ITERATIONS = 20      # FAISS's default is 50; the rotation has settled well before
BUILD_CHUNK = 250_000  # first add trains the IVF; 8 × 250k > 1M, so it never retrains while growing


def sibling(name: str) -> ModuleType:
    """benchmarks/<name>.py as a module (benchmarks/ is not a package): its helpers are reused here."""
    key = f"bench_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


# --- metrics ------------------------------------------------------------------------------------

def recall_row(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (%) of 1-based ranks (inf = not recalled)."""
    from vidseek.eval.metrics import recall_at

    return {f"R@{k}": recall_at(ranks, k) for k in KS}


def retention(cascade_r1: float, full_r1: float) -> float:
    """Cascade R@1 as a share (%) of full-corpus R@1 (the quantity issue 11 calls 'cascade R@1 /
    full-corpus rerank R@1')."""
    return 100.0 * cascade_r1 / full_r1 if full_r1 else float("nan")


def hit_rate(candidates: Sequence[Sequence[int]], truth: Sequence[int]) -> float:
    """% of queries whose ground-truth video is among its candidates."""
    return 100.0 * float(np.mean([g in set(c) for c, g in zip(candidates, truth)]))


def rerank_ranks(full_scores: np.ndarray, candidates: Sequence[Sequence[int]], truth: Sequence[int]) -> np.ndarray:
    """Ranks after reranking each query's candidates with the reranker's scores (a row of
    `full_scores` [Q, N]; the reranker scores a pair the same whether or not other videos are
    scored with it)."""
    from vidseek.eval.grdr_eval import cascade_ranks

    return cascade_ranks([full_scores[q, list(c)] for q, c in enumerate(candidates)], candidates, truth)


def pick_best(rows: Sequence["Row"], target: float) -> "Row":
    """The fastest cascade whose retention reaches `target` %, else the most faithful one."""
    cascades = [r for r in rows if r.reranked and not r.full and not math.isnan(r.retention)]
    good = [r for r in cascades if r.retention >= target]
    if good:
        return min(good, key=lambda r: next(iter(r.ms.values()), math.inf))
    return max(cascades, key=lambda r: r.retention)


# --- product quantisation at a given byte budget ----------------------------------------------------

def padded_dim(dim: int, code_bytes: int) -> int:
    """The smallest multiple of `code_bytes` ≥ dim (FAISS PQ needs dim divisible by its sub-quantisers)."""
    return -(-dim // code_bytes) * code_bytes


def pad(vectors: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad rows to `dim` columns (inner products unchanged)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.shape[1] == dim:
        return vectors
    out = np.zeros((vectors.shape[0], dim), np.float32)
    out[:, : vectors.shape[1]] = vectors
    return out


def pq_factory(dim: int, code_bytes: int, opq: bool, nlist: int) -> str:
    """FAISS factory string: [OPQ rotation,] IVF coarse lists (nlist 0: none), PQ of `code_bytes` 8-bit codes."""
    parts = [f"OPQ{code_bytes}"] if opq else []
    if nlist:
        parts.append(f"IVF{nlist}")
    # "np": no polysemous training, which the factory otherwise runs for a bare PQ and for IVF-PQ
    # alike (minutes of simulated annealing that only speeds up Hamming-filtered search, unused here)
    parts.append(f"PQ{code_bytes}np")
    return ",".join(parts)


def pq_code_bytes(index: Any) -> int:
    """Bytes of PQ code per stored vector (ids and coarse centroids excluded)."""
    import faiss

    inner = faiss.downcast_index(index.index if isinstance(index, faiss.IndexPreTransform) else index)
    return int(inner.code_size)


def build_pq(vectors: np.ndarray | Callable[[], Any], dim: int, code_bytes: int, opq: bool, nlist: int,
             train: np.ndarray) -> Any:
    """Train on `train` (padded inside) and add `vectors` (an array, or an iterator factory of
    chunks); inner-product metric."""
    import faiss

    target = padded_dim(dim, code_bytes)
    index = faiss.index_factory(target, pq_factory(dim, code_bytes, opq, nlist), faiss.METRIC_INNER_PRODUCT)
    if opq:
        faiss.downcast_VectorTransform(index.chain.at(0)).niter = OPQ_ITERATIONS
    index.train(pad(train, target))
    chunks = [vectors] if isinstance(vectors, np.ndarray) else vectors()
    for chunk in chunks:
        index.add(pad(chunk, target))
    return index


def set_nprobe(index: Any, nprobe: int) -> None:
    import faiss

    if nprobe:
        faiss.extract_index_ivf(index).nprobe = nprobe


def pq_search(index: Any, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids [Q, k] (-1 padding) by approximate inner product."""
    return index.search(pad(queries, index.d), k)[1]


def top_same_size(ids: np.ndarray, sizes: Sequence[int]) -> list[list[int]]:
    """Each query's first `sizes[q]` ids (padding dropped): the same rerank budget as GRDR's |C_q|."""
    return [[int(i) for i in row[:s] if i >= 0] for row, s in zip(ids, sizes)]


# --- quality on trained runs ------------------------------------------------------------------------

@dataclass
class Gallery:
    """Every clip of a dataset, as the dense and TC-MGC models read them; test captions as queries."""

    dense_vectors: torch.Tensor  # [N, D] the dense run's index vectors (what GRDR tokenizes)
    rerank_video: Any            # TC-MGC's video representation of the same N clips
    texts: list[str]
    truth: list[int]             # gallery position of each query's video


def load_gallery(grdr_run: Any, tcmgc: Any, data: str, query_split: str) -> Gallery:
    from vidseek.eval.runner import encode_videos
    from vidseek.errors import DatasetError
    from vidseek.models.base import tree_cat
    from vidseek.train.grdr_run import index_vectors, model_source, split_queries
    from vidseek.train.runs import load_split

    vectors, videos, texts, truth, offset = [], [], [], [], 0
    for split in ("train", "val", "test"):
        dataset = load_split(grdr_run.preset, data, split)
        dense_src = model_source(grdr_run.dense, dataset, progress=False)
        rerank_src = model_source(tcmgc, dataset, progress=False)
        usable = sorted(set(dense_src.usable) & set(rerank_src.usable))
        vectors.append(index_vectors(grdr_run.dense, dense_src, usable))
        videos.append(encode_videos(tcmgc.model, rerank_src, usable))
        if split == query_split:
            split_texts, split_truth = split_queries(dataset, usable)
            texts += split_texts
            truth += [offset + g for g in split_truth]
        offset += len(usable)
    if not texts:
        raise DatasetError(f"no {query_split} captions with decodable videos in {data}")
    return Gallery(torch.cat(vectors), tree_cat(videos), texts, truth)


@torch.no_grad()
def quality_part(args: argparse.Namespace) -> dict[str, Any]:
    """R@K, retention and candidate hit rates of every row on the trained runs (see module doc)."""
    import faiss

    from vidseek.eval.metrics import gt_ranks
    from vidseek.eval.runner import encode_texts, similarity_matrix
    from vidseek.index import build_dense_index
    from vidseek.models.base import tree_to
    from vidseek.search.loading import load_checkpoint_model
    from vidseek.train.grdr_run import load_grdr_run, recall_candidates

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    run = load_grdr_run(args.grdr, "cpu")
    tcmgc = load_checkpoint_model(tcmgc_checkpoint(args.tcmgc), "cpu")
    gallery = load_gallery(run, tcmgc, args.data, args.split)
    progress("gallery encoded")
    if args.max_queries and len(gallery.texts) > args.max_queries:  # evenly spaced: every clip keeps a share
        keep = np.linspace(0, len(gallery.texts) - 1, args.max_queries).round().astype(int)
        gallery.texts, gallery.truth = [gallery.texts[i] for i in keep], [gallery.truth[i] for i in keep]
    n, truth = gallery.dense_vectors.shape[0], gallery.truth

    full = similarity_matrix(tcmgc.model, encode_texts(tcmgc.model, gallery.texts, tcmgc.words), gallery.rerank_video)
    progress("full-corpus TC-MGC scored")
    dense_text = encode_texts(run.dense.model, gallery.texts, run.dense.words)
    query_vectors = run.dense.model.index_text(tree_to(dense_text, "cpu")).float().numpy()
    vectors = gallery.dense_vectors.float().numpy()

    dense = build_dense_index(vectors.shape[1], expected_count=n)
    dense.add(np.arange(n), vectors)
    dense_ids = dense.search(query_vectors, min(max(args.rerank_n), n))[1]
    candidates, _, trie, _ = recall_candidates(run.model, gallery.dense_vectors, gallery.texts, args.beams)
    sizes = [len(c) for c in candidates]
    progress("GRDR recalled")

    out: dict[str, Any] = {"gallery": n, "queries": len(truth), "dense_index": dense.index_type,
                           "grdr_bytes": trie.bytes_per_video, "beams": args.beams,
                           "full": recall_row(gt_ranks(full, truth)), "rows": {}}
    full_r1 = out["full"]["R@1"]

    def add(name: str, cands: Sequence[Sequence[int]], reranked: bool = True) -> None:
        ranks = rerank_ranks(full, cands, truth) if reranked else None
        metrics = recall_row(ranks) if reranked else {}
        metrics.update(hit_rate=hit_rate(cands, truth), candidates=float(np.mean([len(c) for c in cands])))
        if reranked:
            metrics["retention"] = retention(metrics["R@1"], full_r1)
        out["rows"][name] = metrics
        progress(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()))

    dense_sim = query_vectors @ vectors.T
    out["rows"]["dense"] = recall_row(gt_ranks(dense_sim, truth)) | {"candidates": float(DENSE_TOP)}
    out["rows"]["dense"]["retention"] = retention(out["rows"]["dense"]["R@1"], full_r1)
    for top in args.rerank_n:
        add(f"dense{top}", [list(r[:top]) for r in dense_ids])
    add("grdr", candidates)
    for name in args.pq:
        code_bytes, opq = parse_pq(name)
        index = build_pq(vectors, vectors.shape[1], code_bytes, opq, 0, vectors)
        add(name, top_same_size(pq_search(index, query_vectors, max(sizes)), sizes))
    # PQ as hard as GRDR's bytes are on 512-d vectors: the same dims per code byte on this gallery's width
    squeezed = max(1, round(trie.bytes_per_video * vectors.shape[1] / 512))
    index = build_pq(vectors, vectors.shape[1], squeezed, True, 0, vectors)
    add(f"opq{squeezed}", top_same_size(pq_search(index, query_vectors, max(sizes)), sizes))
    out["squeezed_bytes"] = squeezed
    return out


def cached_quality(args: argparse.Namespace) -> dict[str, Any]:
    """`quality_part`, stored under --cache keyed by the runs' checkpoint files (path, size,
    mtime) and the settings that change it: the quality numbers do not depend on timing, so the
    timed call can reuse them instead of re-scoring the gallery."""
    import hashlib

    from vidseek.utils import atomic_write_json

    files = [Path(args.grdr) / "best.pt" if Path(args.grdr).is_dir() else Path(args.grdr), Path(tcmgc_checkpoint(args.tcmgc))]
    key = json.dumps({"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
                      "data": str(Path(args.data).resolve()), "split": args.split, "beams": args.beams, "max_queries": args.max_queries,
                      "rerank_n": args.rerank_n, "pq": args.pq}, sort_keys=True)
    path = Path(args.cache) / f"quality-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        print(f"[quality] reusing {path}", flush=True)
        return json.loads(path.read_text())
    result = quality_part(args)
    atomic_write_json(path, result)
    return result


def progress(what: str) -> None:
    import time

    print(f"[{time.strftime('%H:%M:%S')}] {what} ({time.process_time():.0f} s CPU)", flush=True)


def pq_name(code_bytes: int, opq: bool) -> str:
    return f"{'opq' if opq else 'pq'}{code_bytes}"


def parse_pq(name: str) -> tuple[int, bool]:
    """'opq24' → (24, True); 'pq32' → (32, False)."""
    match = re.fullmatch(r"(o?)pq(\d+)", name)
    if not match:
        raise SystemExit(f"--pq {name!r}: use pq<bytes> or opq<bytes>, e.g. pq24 opq32")
    return int(match.group(2)), bool(match.group(1))


def tcmgc_checkpoint(path: str) -> str:
    """A run folder's best.pt (or the file itself)."""
    p = Path(path)
    return str(p / "best.pt") if p.is_dir() else str(p)


# --- speed at scale ------------------------------------------------------------------------------------

@dataclass
class SpeedModels:
    """The product's B/32 models at random init, one thread."""

    dense: Any
    grdr: Any
    tcmgc: Any
    words: int
    pool: Any  # TC-MGC LVAVideoCache of `--pool` synthetic videos


def build_speed_models(args: argparse.Namespace) -> SpeedModels:
    from vidseek.encoders.clip import build_clip
    from vidseek.models.base import FrameFeatures
    from vidseek.models.grdr import GRDR, split_model_config
    from vidseek.models.registry import create_model, get_preset

    torch.manual_seed(args.seed)
    tc_preset = get_preset("msrvtt9k-tcmgc-b32")
    tcmgc = create_model(tc_preset).eval()
    dense = create_model(get_preset("msrvtt9k-meanp-b32")).eval()
    grdr_cfg, _ = split_model_config(get_preset("msrvtt9k-grdr-b32").model_config)
    grdr = GRDR(grdr_cfg, clip_backbone=build_clip("ViT-B-32")).eval()
    frames = FrameFeatures(frames=torch.randn(args.pool, tc_preset.frames, tcmgc.width),
                           mask=torch.ones(args.pool, tc_preset.frames, dtype=torch.bool))
    with torch.no_grad():
        pool = tcmgc.precompute_video(tcmgc.encode_video_features(frames))
    return SpeedModels(dense, grdr, tcmgc, tc_preset.words, pool)


def synthetic_chunks(n: int, dim: int, seed: int) -> Callable[[], Any]:
    """Factory of the same clustered unit vectors, chunk by chunk (never all in memory)."""
    search = sibling("search")

    def chunks():
        centres = search.cluster_centres(n, dim, np.random.default_rng(seed))
        for i, start in enumerate(range(0, n, BUILD_CHUNK)):
            yield search.clustered_unit_vectors(min(BUILD_CHUNK, n - start), centres, np.random.default_rng([seed, i]))
    return chunks


def synthetic_queries(n: int, dim: int, seed: int, count: int) -> np.ndarray:
    search = sibling("search")
    centres = search.cluster_centres(n, dim, np.random.default_rng(seed))
    return search.clustered_unit_vectors(count, centres, np.random.default_rng([seed, 10_000]))


def cached_dense(n: int, dim: int, args: argparse.Namespace) -> Any:
    from vidseek.index import build_dense_index
    from vidseek.index.backends import load_dense_index

    folder = Path(args.cache) / f"dense-{n}-seed{args.seed}"
    if (folder / "dense.json").is_file():
        return load_dense_index(folder)
    index = build_dense_index(dim, expected_count=n)
    start = 0
    for chunk in synthetic_chunks(n, dim, args.seed)():
        index.add(np.arange(start, start + len(chunk)), chunk)
        start += len(chunk)
    index.save(folder)
    return index


def cached_pq(n: int, dim: int, code_bytes: int, opq: bool, nlist: int, args: argparse.Namespace) -> Any:
    import faiss

    path = Path(args.cache) / f"{pq_name(code_bytes, opq)}-ivf{nlist}-{n}-seed{args.seed}.faiss"
    if path.is_file():
        return faiss.read_index(str(path))
    train = next(iter(synthetic_chunks(n, dim, args.seed)()))[:PQ_TRAIN_SAMPLE]
    index = build_pq(synthetic_chunks(n, dim, args.seed), dim, code_bytes, opq, nlist, train)
    path.parent.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path) + ".tmp")
    Path(str(path) + ".tmp").replace(path)  # atomic: a killed build leaves no half index
    return index


@dataclass
class Timing:
    """Per-query milliseconds of each stage of one row."""

    stages: dict[str, float] = field(default_factory=dict)
    candidates: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.stages.values())


@torch.no_grad()
def rerank_ms(models: SpeedModels, text: Any, candidates: Sequence[Sequence[int]]) -> float:
    """Per-query ms of TC-MGC on each query's own candidates (pool rows, gathered per query)."""
    from vidseek.models.base import tree_map, tree_slice

    timed = sibling("recall").timed
    pool = models.pool.keys.shape[0]
    seconds = 0.0
    for q, cands in enumerate(candidates):
        rows = torch.as_tensor(np.asarray(cands, dtype=np.int64) % pool)
        one = tree_slice(text, q, q + 1)
        seconds += timed(lambda: models.tcmgc.score(one, tree_map(lambda t: t.index_select(0, rows), models.pool)))[0]
    return 1000.0 * seconds / len(candidates)


@torch.no_grad()
def speed_part(n: int, models: SpeedModels, args: argparse.Namespace) -> dict[str, Timing]:
    """Per-query ms of every row at `n` videos (see module doc)."""
    import faiss

    from vidseek.eval.runner import encode_texts
    from vidseek.index.dense import ivf_list_count
    from vidseek.index.trie import SemanticIdTrie
    from vidseek.models.grdr import GRDRRecall

    recall = sibling("recall")
    timed = recall.timed
    rng = np.random.default_rng(args.seed)
    texts = recall.synthetic_queries(args.queries, rng)
    batches = [texts[i:i + args.batch] for i in range(0, len(texts), args.batch)]
    dim = models.tcmgc.width
    per_query = 1000.0 / len(texts)

    def text_ms(model: Any, extra: Callable[[Any], Any] = lambda t: t) -> tuple[float, list[Any]]:
        encode_texts(model, batches[0][:2], models.words)  # warm-up
        outs = [timed(lambda b=b: extra(encode_texts(model, b, models.words))) for b in batches]
        return per_query * sum(s for s, _ in outs), [o for _, o in outs]

    rerank_text_ms, rerank_texts = text_ms(models.tcmgc)
    from vidseek.models.base import tree_cat

    rerank_text = tree_cat(rerank_texts)
    dense_text_ms, _ = text_ms(models.dense, models.dense.index_text)
    queries = synthetic_queries(n, dim, args.seed, len(texts))  # the ANN cost, on in-distribution queries

    def search_ms(fn: Callable[[np.ndarray], np.ndarray]) -> tuple[float, np.ndarray]:
        fn(queries[: args.batch])  # warm-up
        outs = [timed(lambda i=i: fn(queries[i:i + args.batch])) for i in range(0, len(texts), args.batch)]
        return per_query * sum(s for s, _ in outs), np.concatenate([o for _, o in outs])

    dense = cached_dense(n, dim, args)
    rows: dict[str, Timing] = {}
    ms, _ = search_ms(lambda q: dense.search(q, DENSE_TOP)[1])
    rows["dense"] = Timing({"text": dense_text_ms, "recall": ms}, DENSE_TOP)
    for top in args.rerank_n:
        ms, ids = search_ms(lambda q, top=top: dense.search(q, top)[1])
        cands = [list(r[r >= 0]) for r in ids]
        rows[f"dense{top}"] = Timing({"text": dense_text_ms + rerank_text_ms, "recall": ms,
                                      "rerank": rerank_ms(models, rerank_text, cands)}, top)
    del dense

    cfg = models.grdr.config
    codes = rng.integers(0, cfg.codebook_size, size=(n, cfg.num_views, cfg.levels))
    grdr = GRDRRecall(models.grdr, SemanticIdTrie(codes, cfg.codebook_size))
    del codes
    grdr.recall(batches[0][:2], args.beams)  # warm-up
    grdr_text_ms = per_query * sum(
        timed(lambda b=b: models.grdr.retriever.encode_text(models.grdr.tokenize(b)))[0] for b in batches)
    outs = [timed(lambda b=b: grdr.recall(b, args.beams)) for b in batches]  # its own text encoding included
    candidates = [c for _, cs in outs for c in cs]
    sizes = [len(c) for c in candidates]
    rows["grdr"] = Timing({"text": rerank_text_ms + grdr_text_ms,
                           "recall": per_query * sum(s for s, _ in outs) - grdr_text_ms,
                           "rerank": rerank_ms(models, rerank_text, candidates)}, float(np.mean(sizes)))
    grdr_bytes = grdr.trie.bytes_per_video
    del grdr

    nlist = ivf_list_count(n)
    for name in args.pq:
        code_bytes, opq = parse_pq(name)
        index = cached_pq(n, dim, code_bytes, opq, nlist, args)
        set_nprobe(index, max(1, nlist // args.pq_nprobe_divisor))
        ms, ids = search_ms(lambda q, index=index: pq_search(index, q, max(sizes)))
        cands = top_same_size(ids, sizes)
        rows[name] = Timing({"text": dense_text_ms + rerank_text_ms, "recall": ms,
                             "rerank": rerank_ms(models, rerank_text, cands)}, float(np.mean([len(c) for c in cands])))
        if code_bytes == grdr_bytes and pq_code_bytes(index) != grdr_bytes:
            raise SystemExit(f"PQ index holds {pq_code_bytes(index)} bytes per video, GRDR {grdr_bytes}")
        del index

    # (e) full corpus: every video scored; timed on the pool for a few queries, scaled to n
    subset = min(args.full_queries, len(texts))
    from vidseek.models.base import tree_slice

    models.tcmgc.score(tree_slice(rerank_text, 0, 1), tree_slice(models.pool, 0, 64))  # warm-up
    seconds, _ = timed(lambda: models.tcmgc.score(tree_slice(rerank_text, 0, subset), models.pool))
    pool = models.pool.keys.shape[0]
    rows["full"] = Timing({"text": rerank_text_ms, "rerank": 1000.0 * seconds / subset * n / pool}, n)
    faiss.omp_set_num_threads(args.threads)
    return rows


# --- report ------------------------------------------------------------------------------------------

@dataclass
class Row:
    key: str
    name: str
    reranked: bool
    full: bool = False
    ms: dict[int, float] = field(default_factory=dict)      # size → whole-query ms
    ms_no_text: dict[int, float] = field(default_factory=dict)
    recall_ms: dict[int, float] = field(default_factory=dict)  # the recall stage alone (text excluded)
    candidates: dict[int, float] = field(default_factory=dict)
    quality: dict[str, float] = field(default_factory=dict)

    @property
    def retention(self) -> float:
        return self.quality.get("retention", float("nan"))


def row_names(args: argparse.Namespace, grdr_bytes: int) -> list[Row]:
    """The table's rows, in order (keys match `speed_part` and `quality_part`)."""
    rows = [Row("dense", f"(a) dense ANN top-{DENSE_TOP}", False)]
    rows += [Row(f"dense{top}", f"(b) dense ANN top-{top} → TC-MGC", True) for top in args.rerank_n]
    rows.append(Row("grdr", f"(c) GRDR ({args.beams} beams, {grdr_bytes} B/video) → TC-MGC", True))
    for name in args.pq:
        code_bytes, opq = parse_pq(name)
        label = f"{'OPQ+' if opq else ''}IVF-PQ{code_bytes} ({code_bytes} B/video)"
        rows.append(Row(name, f"(d) {label} top-|C| → TC-MGC", True))
    rows.append(Row("full", "(e) full-corpus TC-MGC (extrapolated)", True, full=True))
    return rows


def semantic_id_bytes(config: Any) -> int:
    """Bytes per video of a GRDR config's semantic IDs, as its trie stores them."""
    from vidseek.index.trie import SemanticIdTrie

    return SemanticIdTrie(np.zeros((1, config.num_views, config.levels), np.int64), config.codebook_size).bytes_per_video


def size_label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else f"{n:,}"


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def report(rows: Sequence[Row], sizes: Sequence[int], quality: dict[str, Any] | None, args: argparse.Namespace) -> list[str]:
    lines = ["| method | " + " | ".join(f"ms/query {size_label(n)} (no text) | speed-up vs (e) {size_label(n)}"
                                         for n in sizes) + " | T2V R@1 | R@5 | R@10 | R@1 retention % | hit rate % |",
             "|---|" + "---:|---:|" * len(sizes) + "---:|---:|---:|---:|---:|"]
    full = next(r for r in rows if r.full)
    for row in rows:
        cells = [row.name]
        for n in sizes:
            cells.append(f"{fmt(row.ms.get(n), '.2f')} ({fmt(row.ms_no_text.get(n), '.2f')})")
            cells.append(fmt(full.ms[n] / row.ms[n]) + "x" if n in row.ms else "")
        q = row.quality
        cells += [fmt(q.get("R@1")), fmt(q.get("R@5")), fmt(q.get("R@10")), fmt(q.get("retention")),
                  fmt(q.get("hit_rate"))]
        lines.append("| " + " | ".join(cells) + " |")
    if quality:
        squeezed = quality["squeezed_bytes"]
        q = quality["rows"][f"opq{squeezed}"]
        lines += ["", f"quality: gallery {quality['gallery']:,} clips (every split), {quality['queries']:,} test "
                  f"queries, {quality['beams']} GRDR beams; dense index there: {quality['dense_index']}; the PQ rows "
                  f"scan every code; OPQ{squeezed} (as many dims per code byte as {quality['grdr_bytes']} B on 512-d): R@1 retention "
                  f"{q['retention']:.1f}%, hit rate {q['hit_rate']:.1f}%, {q['candidates']:.0f} candidates"]
    return lines


def pq_table(rows: Sequence[Row], sizes: Sequence[int]) -> list[str]:
    """GRDR vs IVF-PQ at equal (and twice GRDR's) bytes per video."""
    keep = [r for r in rows if r.key == "grdr" or r.key.startswith(("pq", "opq"))]
    lines = ["| recall (bytes/video) | candidate hit rate % | cascade R@1 retention % | "
             + " | ".join(f"recall ms/query {size_label(n)}" for n in sizes) + " | candidates |",
             "|---|---:|---:|" + "---:|" * len(sizes) + "---:|"]
    for row in keep:
        recall_ms = [fmt(row.recall_ms.get(n), ".2f") for n in sizes]
        cands = fmt(next(iter(row.candidates.values()), None), ".0f")
        lines.append(f"| {row.name.split(') ', 1)[1].split(' →')[0]} | {fmt(row.quality.get('hit_rate'))} | "
                     f"{fmt(row.retention)} | " + " | ".join(recall_ms) + f" | {cands} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000], help="corpus sizes of the speed part")
    parser.add_argument("--grdr", help="trained GRDR run (quality part; its dense run is the dense recall model)")
    parser.add_argument("--tcmgc", help="trained TC-MGC run or checkpoint (quality part's reranker)")
    parser.add_argument("--data", help="dataset folder of the runs (quality part)")
    parser.add_argument("--split", default="test", help="split whose captions are the queries")
    parser.add_argument("--max-queries", type=int, default=0, help="quality part: at most this many test captions "
                        "(evenly spaced; 0 = all) — full-corpus TC-MGC scores queries × gallery pairs")
    parser.add_argument("--pq", nargs="+", default=list(PQ_VARIANTS), help="IVF-PQ rows: pq<bytes> / opq<bytes>")
    parser.add_argument("--beams", type=int, default=100)
    parser.add_argument("--rerank-n", type=int, nargs="+", default=[20, 50, 100], help="dense top-N rows")
    parser.add_argument("--queries", type=int, default=64, help="speed part: queries per size")
    parser.add_argument("--batch", type=int, default=32, help="speed part: queries per batch")
    parser.add_argument("--full-queries", type=int, default=4, help="queries (e) is timed on")
    parser.add_argument("--pool", type=int, default=2048, help="synthetic TC-MGC videos the candidates map onto")
    parser.add_argument("--pq-nprobe-divisor", type=int, default=16, help="IVF-PQ nprobe = nlist / this")
    parser.add_argument("--target-retention", type=float, default=98.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=str(Path("/tmp") / "cascade"), help="built indexes (and the quality result)")
    parser.add_argument("--build-only", action="store_true", help="build the speed part's cached indexes and exit")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)

    quality = None
    if args.grdr and args.tcmgc and args.data:
        quality = cached_quality(args)
        print(f"[quality] gallery {quality['gallery']}, {quality['queries']} queries, full-corpus TC-MGC R@1 "
              f"{quality['full']['R@1']:.1f}", flush=True)
    elif any((args.grdr, args.tcmgc, args.data)):
        raise SystemExit("the quality part needs all of --grdr RUN --tcmgc RUN --data DIR")

    if args.build_only:
        from vidseek.index.dense import ivf_list_count

        for n in args.sizes:
            cached_dense(n, 512, args)
            for name in args.pq:
                cached_pq(n, 512, *parse_pq(name), ivf_list_count(n), args)
            print(f"[build] indexes for {n:,} videos cached under {args.cache}", flush=True)
        return

    models = build_speed_models(args) if args.sizes else None
    grdr_bytes = semantic_id_bytes(models.grdr.config) if models else quality["grdr_bytes"]
    rows = row_names(args, grdr_bytes)
    by_key = {r.key: r for r in rows}
    for n in args.sizes:
        timings = speed_part(n, models, args)
        for key, t in timings.items():
            by_key[key].ms[n] = t.total
            by_key[key].ms_no_text[n] = t.total - t.stages.get("text", 0.0)
            by_key[key].candidates[n] = t.candidates
            by_key[key].recall_ms[n] = t.stages.get("recall", math.nan)
        print(f"[speed] {n:,} videos done", flush=True)
    if quality:
        for key, q in quality["rows"].items():
            if key in by_key:
                by_key[key].quality = q
        by_key["full"].quality = dict(quality["full"], retention=100.0)

    print()
    print(f"Whole queries, {args.threads} thread(s), process CPU time; speed: synthetic 512-d vectors, random-init "
          f"B/32 models, {args.queries} queries in batches of {args.batch}; (e) timed on {args.full_queries} queries × "
          f"{args.pool} videos and scaled to N (extrapolated); '(no text)' leaves the text towers out.")
    print()
    for line in report(rows, args.sizes, quality, args):
        print(line)
    print()
    print("GRDR vs IVF-PQ at equal bytes per video (codes only; FAISS IVF lists add 8-byte ids, GRDR's trie "
          f"4-byte posting ids per view); IVF-PQ nprobe = nlist/{args.pq_nprobe_divisor}; top-|C| = GRDR's count per query")
    print()
    for line in pq_table(rows, args.sizes):
        print(line)
    print()
    if quality:
        grdr = by_key["grdr"]
        print(f"GRDR cascade R@1 = {grdr.retention:.1f}% of full-corpus rerank R@1 (issue 11's quantity: the same "
              "number as the retention column)")
    if args.sizes and quality:
        for line in final_lines(rows, args.sizes[0], args.target_retention):
            print(line)


def final_lines(rows: Sequence[Row], n: int, target: float) -> list[str]:
    """The best cascade named, then the two lines issue 14 asks the output to end with."""
    best = pick_best(rows, target)
    full = next(r for r in rows if r.full)
    return [f"best cascade: {best.name} (the fastest with R@1 retention ≥ {target:.0f}%, else the most faithful)",
            f"cascade speed-up vs full TC-MGC at {size_label(n)}: {full.ms[n] / best.ms[n]:.1f}x",
            f"cascade R@1 retention: {best.retention:.1f}%"]


if __name__ == "__main__":
    main()
