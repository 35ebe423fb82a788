"""Text search over an index folder: recall → rerank cascade (DESIGN.md data flow, "search/").

1. **Recall** (`Recall` protocol): the query → candidate entry ids with recall scores. The dense
   backend encodes the query with the recall model (`index_text(encode_text(tokens))`) and asks
   the dense index for the `recall_k` nearest entries by inner product (= cosine, vectors are
   L2-normalised). Other backends (GRDR's generative recall over semantic IDs) plug in through
   `RECALL_BACKENDS`, keyed by the `--recall` prefix (`grdr:CKPT`).
2. **Rerank** (optional): any `RetrievalModel`, treated generically — the candidates' frame
   features are read from the reranker's feature store → `FrameFeatures` →
   `encode_video_features` → `score(text, video)`. TC-MGC (rerank-only) or a two-tower both work.
   A reranker that embeds decoded frames (`needs_video_frames`, PIG "vip") has no store: its
   candidates' windows are decoded now (`indexer.decode_and_encode_frames`); a candidate whose
   file no longer decodes is dropped from the results.
3. **Collapse**: windows of one long video compete; each video keeps its best window (its start
   and end say where the match is), then videos are sorted by the final score.

All model / store / index work runs on one private worker thread: SQLite connections and some
index clients are bound to the thread that opened them, and a web server calls from a pool.
"""
from __future__ import annotations

import functools
import importlib
import re
import threading
import time
import unicodedata
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from vidseek.errors import ConfigError, SearchIndexError
from vidseek.search.entries import ENTRIES_FILE, INDEX_FILE, RECALL_STATE_DIR, Entry, EntryCatalog, read_index_json
from vidseek.search.loading import (LoadedModel, decode_and_encode_frames, image_tower_fingerprint,
                                    load_checkpoint_model, needs_video_frames, stored_frame_features)

#: Longest accepted query, in characters (CLIP's text tower reads at most 77 tokens anyway; the
#: limit keeps a request from making the tokenizer chew on megabytes).
MAX_QUERY_CHARS = 1000
#: Candidates scored by the reranker per forward pass (bounds TC-MGC's memory).
RERANK_BLOCK = 64
#: Query latencies kept for the percentiles in `stats()`.
LATENCY_WINDOW = 1000


# --- recall backends -------------------------------------------------------------------------------

@runtime_checkable
class Recall(Protocol):
    """Query texts → per query, up to k (entry id, recall score) pairs, best first."""

    def recall(self, texts: Sequence[str], k: int) -> list[list[tuple[int, float]]]: ...


class RecallBackend(Recall, Protocol):
    """A recall stage that can also be built: what `Indexer` needs besides `recall`.

    `image_tower` (a ClipBackbone), `frames` and `needs_patches` say how to extract the features
    `add` consumes; `add` receives entry ids with their `FrameFeatures` — read from the store, or,
    when `video_model` (the RetrievalModel that embeds videos) has `needs_video_frames`, its
    `encode_frames` output on decoded frames; `save` persists the state
    under the folder the builder was given; `describe` goes into index.json under "recall" and must
    hold at least "backend", "checkpoint" and "sha256".
    """

    image_tower: Any
    video_model: Any
    frames: int
    needs_patches: bool

    def image_tower_fingerprint(self) -> str: ...
    def expect_count(self, count: int) -> None: ...
    def add(self, ids: np.ndarray, features: Any) -> None: ...
    def remove(self, ids: np.ndarray) -> int: ...
    def save(self) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def __len__(self) -> int: ...


@dataclass
class RecallOptions:
    """Settings for a NEW recall index (an existing one keeps what it was built with), except
    `beams`, which a GRDR index takes at every open (search time included), and `milvus_uri`,
    which for an existing Milvus-backed index says where this process reaches its server (the
    recorded URI is kept: `vidseek.index.milvus`, "one server, several addresses")."""

    index_type: str = "auto"
    backend: str = "faiss"  # dense index backend: "faiss" or "milvus"
    milvus_uri: str | None = None  # new index: default <index>/recall/milvus.db (milvus-lite)
    milvus_collection: str | None = None  # default: derived from the index folder's name, recorded
    clip_arch: str | None = None  # zero-shot recall (--recall clip:ARCH): the CLIP architecture
    memory_budget_bytes: int = 4 << 30
    # GRDR beam width at search time (and the default stored at index time); None: the index's own.
    beams: int | None = None


#: builder(checkpoint, state_dir, options, device, expected_sha256) -> RecallBackend.
#: `expected_sha256` is None when building a new index, else the recorded checkpoint hash.
RecallBuilder = Callable[[str, Path, RecallOptions, str, "str | None"], RecallBackend]

#: Recall backends by `--recall` prefix. "dense" is the default (a bare checkpoint path).
RECALL_BACKENDS: dict[str, RecallBuilder] = {}
DEFAULT_RECALL_BACKEND = "dense"
#: Modules that may add backends through a `register_recall_backends(register)` hook, imported on
#: first lookup (a module that has not landed is skipped), like the preset registry's providers.
_RECALL_PROVIDERS: list[str] = ["vidseek.search.grdr_backend", "vidseek.search.zero_shot"]
_providers_loaded = False


def register_recall_backend(prefix: str, builder: RecallBuilder) -> None:
    """Make `--recall PREFIX:CKPT` build its recall stage with `builder`."""
    if not prefix.isidentifier():
        raise ConfigError(f"recall backend prefix {prefix!r} must be a plain name like 'grdr'")
    RECALL_BACKENDS[prefix] = builder


def _load_providers() -> None:
    global _providers_loaded
    if _providers_loaded:
        return
    _providers_loaded = True
    for module_name in _RECALL_PROVIDERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name == module_name:
                continue
            raise
        hook = getattr(module, "register_recall_backends", None)
        if hook is not None:
            hook(register_recall_backend)


def parse_recall_spec(spec: str) -> tuple[str, str]:
    """'CKPT' → ('dense', 'CKPT'); 'grdr:CKPT' → ('grdr', 'CKPT') for any registered prefix."""
    _load_providers()
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in RECALL_BACKENDS:
        return prefix, rest
    if sep and prefix.isidentifier() and len(prefix) > 1 and not Path(spec).exists():
        raise ConfigError(f"unknown recall backend {prefix!r} in --recall {spec}: use a checkpoint path or one of "
                          f"{', '.join(f'{p}:CKPT' for p in sorted(RECALL_BACKENDS))}")
    return DEFAULT_RECALL_BACKEND, spec


def open_recall(backend: str, checkpoint: str, state_dir: Path, options: RecallOptions, *, device: str = "cpu",
                expected_sha256: str | None = None) -> RecallBackend:
    _load_providers()
    try:
        builder = RECALL_BACKENDS[backend]
    except KeyError:
        raise SearchIndexError(f"recall backend {backend!r} is not available in this installation; "
                               f"install the module that provides it or rebuild the index") from None
    return builder(checkpoint, state_dir, options, device, expected_sha256)


def close_recall(recall: Any) -> None:
    """Release what a recall stage's dense index holds open: a Milvus client's connection (each
    reopen of a served index would leak one otherwise); FAISS holds nothing."""
    close = getattr(getattr(recall, "index", None), "close", None)
    if close is not None:
        close()


def encode_queries(model: Any, texts: Sequence[str], words: int) -> Any:
    """TextFeatures of `texts` with the model's own tokenizer and context length."""
    import torch

    with torch.no_grad():
        tokens = model.clip.tokenize(list(texts), context_length=words).to(model.device)
        return model.encode_text(tokens)


class DenseRecall:
    """Recall with any model that has a dense index vector (`supports_dense_recall`): two-tower, PIG."""

    def __init__(self, loaded: LoadedModel, state_dir: Path, options: RecallOptions):
        if not loaded.model.supports_dense_recall:
            raise ConfigError(f"{loaded.checkpoint} holds a {loaded.model.name} model, a reranker without a dense "
                              f"index vector; pass it as --rerank and a two-tower checkpoint as --recall")
        if options.beams is not None:
            raise ConfigError("--beams applies to grdr: recall only; drop it for a dense recall index")
        self.loaded = loaded
        self.model = self.video_model = loaded.model
        self.image_tower = loaded.model.clip
        self.frames = loaded.frames
        self.needs_patches = bool(loaded.model.needs_patches)
        self.state_dir = Path(state_dir)
        self.options = options
        self._expected_count: int | None = None
        self.index = None
        if (self.state_dir / "dense.json").is_file():
            from vidseek.index.backends import load_dense_index

            self.index = load_dense_index(self.state_dir, milvus_uri=options.milvus_uri)

    @classmethod
    def build(cls, checkpoint: str, state_dir: Path, options: RecallOptions, device: str,
              expected_sha256: str | None) -> "DenseRecall":
        return cls(load_checkpoint_model(checkpoint, device, expected_sha256), state_dir, options)

    def image_tower_fingerprint(self) -> str:
        return image_tower_fingerprint(self.model)

    def expect_count(self, count: int) -> None:
        self._expected_count = count

    def _ensure_index(self, dim: int) -> Any:
        if self.index is None:
            from vidseek.index.backends import build_dense_index

            uri = self.options.milvus_uri
            if self.options.backend == "milvus" and uri is None:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                uri = str((self.state_dir / "milvus.db").absolute())
            self.index = build_dense_index(dim, index_type=self.options.index_type,
                                           expected_count=self._expected_count,
                                           memory_budget_bytes=self.options.memory_budget_bytes,
                                           backend=self.options.backend, milvus_uri=uri,
                                           collection=self.options.milvus_collection, folder=self.state_dir)
        return self.index

    def video_vectors(self, features: Any) -> np.ndarray:
        """The dense index vectors [N, D] of frame features: `index_video(encode_video_features(f))`."""
        import torch

        from vidseek.models.base import tree_to

        with torch.no_grad():
            video = self.model.encode_video_features(tree_to(features, self.model.device))
            return self.model.index_video(video).float().cpu().numpy()

    def add(self, ids: np.ndarray, features: Any) -> None:
        vectors = self.video_vectors(features)
        self._ensure_index(vectors.shape[1]).add(ids, vectors)

    def remove(self, ids: np.ndarray) -> int:
        return 0 if self.index is None else int(self.index.remove(ids))

    def save(self) -> None:
        if self.index is not None:
            self.index.save(self.state_dir)

    def query_vectors(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        with torch.no_grad():
            text = encode_queries(self.model, texts, self.loaded.words)
            return self.model.index_text(text).float().cpu().numpy()

    def recall(self, texts: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        from vidseek.index.dense import check_scores

        if self.index is None or len(self.index) == 0:
            return [[] for _ in texts]
        scores, ids = self.index.search(self.query_vectors(texts), min(k, len(self.index)))
        check_scores(scores, ids, self.index.index_type, self.state_dir)
        return [[(int(i), float(s)) for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(scores, ids)]

    def describe(self) -> dict[str, Any]:
        info = {"backend": DEFAULT_RECALL_BACKEND, **self.loaded.describe()}
        if self.index is not None:
            info.update(index_type=self.index.index_type, dense_backend=self.index.backend)
            if self.index.backend == "milvus":
                info.update(milvus_uri=self.index.uri, milvus_collection=self.index.collection)
        return info

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)


register_recall_backend(DEFAULT_RECALL_BACKEND, DenseRecall.build)


# --- reranking -------------------------------------------------------------------------------------

class Reranker:
    """Pairwise rescoring of candidates with any RetrievalModel: from its own feature store, or,
    for a model that embeds decoded frames (`store` None), from the candidates' decoded windows."""

    def __init__(self, loaded: LoadedModel, store: Any | None):
        self.loaded = loaded
        self.model = loaded.model
        self.store = store
        if store is None and not needs_video_frames(self.model):
            raise SearchIndexError(f"the index has no feature store for reranker {loaded.checkpoint}; "
                                   f"rebuild the index with `vidseek index`")

    def encode_texts(self, texts: Sequence[str]) -> Any:
        return encode_queries(self.model, texts, self.loaded.words)

    def _scores(self, text: Any, feats: Any) -> np.ndarray:
        import torch

        from vidseek.models.base import tree_to

        with torch.no_grad():
            video = self.model.encode_video_features(tree_to(feats, self.model.device))
            return self.model.score(text, video)[0].float().cpu().numpy()

    def score(self, text: Any, entries: Sequence[Entry]) -> np.ndarray:
        """Scores [len(entries)] of ONE query's TextFeatures (batch of 1) against the entries'
        videos; NaN for an entry whose window could not be decoded (frames-embedding models)."""
        if needs_video_frames(self.model):
            scores = np.full(len(entries), np.nan, dtype=np.float32)
            encoded, _ = decode_and_encode_frames(self.model, [(e.path, e.start, e.end) for e in entries],
                                                  self.loaded.frames, RERANK_BLOCK)
            for positions, feats in encoded:
                scores[positions] = self._scores(text, feats)
            return scores
        blocks = [self._scores(text, stored_frame_features(self.store, [e.key for e in entries[b:b + RERANK_BLOCK]],
                                                           bool(self.model.needs_patches)))
                  for b in range(0, len(entries), RERANK_BLOCK)]
        return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


# --- search ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hit:
    """One result video, located at its best-matching window."""

    video_id: str
    path: str
    start: float  # seconds: where the matching window begins (0 for a whole video)
    end: float | None  # seconds: where it ends (the duration for a whole video)
    recall_score: float
    rerank_score: float | None  # None when not reranked
    score: float  # what the results are sorted by: rerank_score if reranked, else recall_score

    def to_dict(self) -> dict[str, Any]:
        return {"video_id": self.video_id, "path": self.path, "start": self.start, "end": self.end,
                "recall_score": self.recall_score, "rerank_score": self.rerank_score, "score": self.score}


@functools.cache
def visible_character_pattern() -> str:
    """A regular expression (Python and ECMA-262 alike, so the HTTP schema can carry it) matching
    one visible character: anything but whitespace, controls (Cc, e.g. NUL) and format characters
    (Cf, e.g. zero-width space) of the Basic Multilingual Plane."""
    hidden = [code for code in range(0x10000) if chr(code).isspace() or unicodedata.category(chr(code)) in ("Cc", "Cf")]
    runs: list[list[int]] = []
    for code in hidden:
        if runs and runs[-1][1] == code - 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    return "[^" + "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in runs) + "]"


def check_query(text: Any) -> str:
    """A query must be a string of at most MAX_QUERY_CHARS characters with at least one visible
    character (`visible_character_pattern`), and be valid Unicode (no lone surrogates, which no
    UTF-8 text can hold)."""
    if not isinstance(text, str) or re.search(visible_character_pattern(), text) is None:
        raise ConfigError("empty search query (no visible characters): type some words that describe the video")
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise ConfigError("search query is not valid Unicode (it holds a lone surrogate); send UTF-8 text")
    if len(text) > MAX_QUERY_CHARS:
        raise ConfigError(f"search query is {len(text)} characters long; shorten it to at most {MAX_QUERY_CHARS}")
    return text.strip()


def collapse_by_video(candidates: Sequence[tuple[Entry, float, float | None]], k: int) -> list[Hit]:
    """(entry, recall score, rerank score) → the k best videos, each at its best window.

    A video's score is its best window's final score; ties keep the recall order (stable sort).
    """
    best: dict[str, Hit] = {}
    for entry, recall_score, rerank_score in candidates:
        score = recall_score if rerank_score is None else rerank_score
        current = best.get(entry.video_id)
        if current is None or score > current.score:
            best[entry.video_id] = Hit(entry.video_id, entry.path, entry.start, entry.end,
                                       recall_score, rerank_score, score)
    return sorted(best.values(), key=lambda h: -h.score)[:k]


class Searcher:
    """Search an index folder built by `vidseek index` / `Indexer`.

    >>> s = Searcher("my-index"); s.search("a red circle moves left", k=5)
    """

    def __init__(self, index_dir: str | Path, device: str = "cpu", beams: int | None = None,
                 milvus_uri: str | None = None):
        """`beams`: GRDR beam width for this searcher (more beams, more candidates); grdr: recall only.
        `milvus_uri`: where this process reaches a Milvus-backed index's server, if not at the
        address recorded at indexing (another host, a container); the index folder is not changed."""
        self.index_dir = Path(index_dir)
        self.meta = read_index_json(self.index_dir)
        self.device = device
        self.beams = beams
        self.milvus_uri = milvus_uri
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_WINDOW)
        self._stats_lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vidseek-search")
        self._run(self._open)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._worker.submit(fn, *args).result()

    def _open(self) -> None:
        from vidseek.search.integrity import check_counts, check_files
        from vidseek.store import FeatureStore

        check_files(self.index_dir, self.meta)  # presence and sizes against the manifest: stat calls only
        self.entries = EntryCatalog(self.index_dir / ENTRIES_FILE, mode="read")
        recall_meta = self.meta["recall"]
        options = RecallOptions(beams=self.beams, milvus_uri=self.milvus_uri)
        self.recall: RecallBackend = open_recall(recall_meta["backend"], recall_meta["checkpoint"],
                                                 self.index_dir / RECALL_STATE_DIR, options,
                                                 device=self.device, expected_sha256=recall_meta["sha256"])
        dim = getattr(getattr(self.recall, "index", None), "dim", None)
        check_counts(self.index_dir, self.meta, self.entries.counts()["keys"], len(self.recall),
                     None if dim is None else int(dim))
        self.reranker: Reranker | None = None
        if self.meta.get("rerank"):
            rerank_meta = self.meta["rerank"]
            loaded = load_checkpoint_model(rerank_meta["checkpoint"], self.device, expected_sha256=rerank_meta["sha256"])
            store_dir = self.meta["stores"]["rerank"]
            self.reranker = Reranker(loaded, None if store_dir is None else FeatureStore(self.index_dir / store_dir))

    # --- queries -----------------------------------------------------------------------------

    def search(self, text: str, k: int = 10, recall_k: int = 100, rerank: bool = True) -> list[Hit]:
        """The k best videos for `text`: recall `recall_k` entries, rerank them, one hit per video."""
        return self.search_batch([text], k=k, recall_k=recall_k, rerank=rerank)[0]

    def search_batch(self, texts: Sequence[str], k: int = 10, recall_k: int = 100, rerank: bool = True
                     ) -> list[list[Hit]]:
        if isinstance(texts, str):
            raise ConfigError("search_batch takes a list of query strings; use search() for one query")
        queries = [check_query(t) for t in texts]
        for name, value in (("k", k), ("recall_k", recall_k)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be a whole number of at least 1, got {value!r}")
        if not queries:
            return []
        began = time.perf_counter()
        # Clipped to the index: memory follows the index size, never a huge requested k.
        size = max(1, len(self.recall))
        results = self._run(self._search_batch, queries, min(int(k), size), min(max(int(recall_k), int(k)), size), rerank)
        per_query_ms = (time.perf_counter() - began) * 1000.0 / len(queries)
        with self._stats_lock:
            self._latencies_ms.extend([per_query_ms] * len(queries))
        return results

    def _search_batch(self, queries: list[str], k: int, recall_k: int, rerank: bool) -> list[list[Hit]]:
        recalled = self.recall.recall(queries, recall_k)
        reranker = self.reranker if rerank else None
        text = reranker.encode_texts(queries) if reranker is not None else None
        results = []
        for q, pairs in enumerate(recalled):
            found = self.entries.get_many([i for i, _ in pairs])
            pairs = [(found[i], s) for i, s in pairs if i in found]  # entries removed since recall are dropped
            if reranker is not None and pairs:
                from vidseek.models.base import tree_slice

                rerank_scores = reranker.score(tree_slice(text, q, q + 1), [e for e, _ in pairs])
                candidates = [(e, s, float(r)) for (e, s), r in zip(pairs, rerank_scores) if not np.isnan(r)]
            else:
                candidates = [(e, s, None) for e, s in pairs]
            results.append(collapse_by_video(candidates, k))
        return results

    # --- catalog lookups for the server ------------------------------------------------------

    def video_entries(self, video_id: str) -> list[Entry]:
        """The indexed windows of one video ([] if the id is not in the index)."""
        return self.entries.video_entries(video_id)

    def stats(self) -> dict[str, Any]:
        """Counts, index settings, models and query latency percentiles (ms) of this process."""
        with self._stats_lock:
            latencies = np.array(self._latencies_ms, dtype=np.float64)
        latency = {"queries": int(latencies.size)}
        if latencies.size:
            latency.update({f"p{p}": float(np.percentile(latencies, p)) for p in (50, 90, 99)})
        recall = dict(self.meta["recall"])
        return {
            "counts": {**self.entries.counts(), "failed": int(self.meta.get("counts", {}).get("failed", 0))},
            "index_type": recall.get("index_type"),
            "dense_backend": recall.get("dense_backend"),
            "recall": recall,
            "rerank": self.meta.get("rerank"),
            "segment_seconds": self.meta.get("segment_seconds"),
            "overlap_seconds": self.meta.get("overlap_seconds"),
            "vidseek_version": self.meta.get("vidseek_version"),
            "latency_ms": latency,
        }

    def close(self) -> None:
        def shut() -> None:
            self.entries.close()
            close_recall(getattr(self, "recall", None))
            if self.reranker is not None and self.reranker.store is not None:
                self.reranker.store.close()

        if hasattr(self, "entries"):
            self._run(shut)
        self._worker.shutdown(wait=True)

    def __enter__(self) -> "Searcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
