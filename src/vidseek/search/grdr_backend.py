"""GRDR generative recall as a search-index recall stage (`vidseek index --recall grdr:RUN`).

Index time: each entry's frame features → the GRDR run's dense model (`index_video`) → the GRDR
tokenizer → N_v semantic IDs of L codes (`codes [N, N_v, L]`, 2 bytes a code). Only the codes
and the entry ids are stored (`recall/grdr_codes.npz`); the trie is rebuilt from them on load
and after every change (METHODS.md "GRDR … Inference": a trie over all (view) IDs of the corpus).

Query time: the GRDR text encoder + trie-constrained beam search (`beams` beams) → IDs → every
entry holding one of them, in beam order, de-duplicated; each candidate's recall score is the
log-probability of the best beam that reached it. The searcher then reranks the candidates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from vidseek.errors import ConfigError, SearchIndexError

BACKEND_NAME = "grdr"
STATE_FILE = "grdr_codes.npz"
STATE_FORMAT = "vidseek.grdr_recall"
STATE_VERSION = 1


class GRDRRecallBackend:
    """`RecallBackend` over a GRDR run: semantic-ID trie recall of indexed entries."""

    def __init__(self, run: Any, state_dir: Path, beams: int | None = None, sha256: str | None = None):
        """`run`: a `vidseek.train.grdr_run.GRDRRun`. Beam width: `beams` if given, else the one the
        index was built with, else the preset's full-corpus default."""
        from vidseek.search.searcher import DenseRecall, RecallOptions

        self.run = run
        self.model = run.model
        self.dense = run.dense
        self.image_tower = run.dense.model.clip
        self.video_model = run.dense.model  # embeds entries; decoded frames when it needs them
        self.frames = run.dense.frames
        self.needs_patches = bool(run.dense.model.needs_patches)
        self.state_dir = Path(state_dir)
        self.sha256 = sha256
        # The dense model's index vectors, computed exactly as the dense recall stage does.
        self._vectors = DenseRecall(run.dense, self.state_dir, RecallOptions())
        cfg = self.model.config
        self.ids = np.zeros(0, dtype=np.int64)
        self.codes = np.zeros((0, cfg.num_views, cfg.levels), dtype=np.int64)
        self.beams = run.beams_full_corpus
        path = self.state_dir / STATE_FILE
        if path.is_file():
            self._load(path)
        if beams is not None:
            self.beams = int(beams)
        if self.beams < 1:
            raise ConfigError(f"GRDR beams must be at least 1, got {self.beams}")
        self._trie: Any = None  # rebuilt lazily after a change

    @classmethod
    def build(cls, checkpoint: str, state_dir: Path, options: Any, device: str,
              expected_sha256: str | None) -> "GRDRRecallBackend":
        """RecallBuilder: load the GRDR run (refusing a changed file when the index recorded it).
        `options.beams`, when set, overrides the stored / preset beam width."""
        from vidseek.search.indexer import file_sha256
        from vidseek.train.grdr_run import load_grdr_run

        path = Path(checkpoint).expanduser()
        if expected_sha256 is not None:
            if not path.is_file():
                raise SearchIndexError(f"the index was built with GRDR checkpoint {path}, which no longer exists; "
                                       "restore it or rebuild the index with `vidseek index`")
            if file_sha256(path) != expected_sha256:
                raise SearchIndexError(f"GRDR checkpoint {path} changed since the index was built (sha256 differs); "
                                       "restore the original file or rebuild the index with `vidseek index`")
        run = load_grdr_run(path, device)
        return cls(run, state_dir, beams=options.beams,
                   sha256=expected_sha256 or file_sha256(run.checkpoint))

    # --- building -----------------------------------------------------------------------------
    def image_tower_fingerprint(self) -> str:
        return self._vectors.image_tower_fingerprint()

    def expect_count(self, count: int) -> None:
        """Nothing to size ahead: the trie is rebuilt from the codes."""

    def add(self, ids: np.ndarray, features: Any) -> None:
        vectors = torch.from_numpy(self._vectors.video_vectors(features))
        codes = self.model.encode(vectors).numpy()
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.codes = np.concatenate([self.codes, codes.astype(np.int64)])
        self._trie = None

    def remove(self, ids: np.ndarray) -> int:
        keep = ~np.isin(self.ids, np.asarray(ids, dtype=np.int64))
        removed = int((~keep).sum())
        if removed:
            self.ids, self.codes = self.ids[keep], self.codes[keep]
            self._trie = None
        return removed

    def save(self) -> None:
        from vidseek.utils import atomic_path

        with atomic_path(self.state_dir / STATE_FILE) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, ids=self.ids, codes=self.codes.astype(self._code_dtype()), beams=np.int64(self.beams),
                         format=np.array(STATE_FORMAT), version=np.int64(STATE_VERSION))

    def _load(self, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as data:
                fmt, version = str(data["format"]), int(data["version"])
                ids, codes, beams = data["ids"], data["codes"], int(data["beams"])
        except (OSError, ValueError, KeyError) as err:
            raise SearchIndexError(f"GRDR recall state {path} is unreadable ({err}); rebuild the index") from err
        cfg = self.model.config
        if fmt != STATE_FORMAT or version > STATE_VERSION or codes.shape[1:] != (cfg.num_views, cfg.levels):
            raise SearchIndexError(f"{path} does not hold semantic IDs of this GRDR model; rebuild the index")
        self.ids, self.codes, self.beams = ids.astype(np.int64), codes.astype(np.int64), beams

    def _code_dtype(self) -> np.dtype:
        from vidseek.index.trie import code_dtype

        return code_dtype(self.model.config.codebook_size)

    # --- querying -----------------------------------------------------------------------------
    def _recall(self) -> Any:
        if self._trie is None:
            from vidseek.index.trie import SemanticIdTrie
            from vidseek.models.grdr import GRDRRecall  # search → models: the allowed direction

            self._trie = GRDRRecall(self.model, SemanticIdTrie(self.codes, self.model.config.codebook_size))
        return self._trie

    def recall(self, texts: Sequence[str], k: int) -> list[list[tuple[int, float]]]:
        """Per query, up to k (entry id, score) in beam order; score = log-probability of the
        best beam whose ID the entry carries (non-increasing along the list)."""
        if len(self.ids) == 0:
            return [[] for _ in texts]
        recall = self._recall()
        trie = recall.trie
        beam_ids, beam_scores = recall.recall_ids(list(texts), self.beams)
        candidates = trie.candidates(beam_ids)
        kk, levels = trie.codebook_size, trie.levels
        weights = kk ** np.arange(levels - 1, -1, -1, dtype=np.int64)
        out = []
        for q, rows in enumerate(candidates):
            rows = rows[:k]
            if not rows:
                out.append([])
                continue
            beams = beam_ids[q].numpy()
            live = (beams >= 0).all(axis=1)
            beam_keys, scores = beams[live] @ weights, beam_scores[q].numpy()[live]
            # Best beam per key (beams are sorted best first), then each row's best over its views.
            best = {}
            for key, score in zip(beam_keys.tolist(), scores.tolist()):
                best.setdefault(key, score)
            view_keys = trie.codes[rows].astype(np.int64) @ weights  # [C, N_v]
            row_scores = [max(best.get(key, -np.inf) for key in keys) for keys in view_keys.tolist()]
            out.append([(int(self.ids[r]), float(s)) for r, s in zip(rows, row_scores)])
        return out

    def describe(self) -> dict[str, Any]:
        trie = self._recall().trie if len(self.ids) else None
        cfg = self.model.config
        per_video = cfg.num_views * cfg.levels * self._code_dtype().itemsize
        return {
            "backend": BACKEND_NAME, "checkpoint": self.run.checkpoint, "sha256": self.sha256,
            "model": "grdr", "preset": self.run.preset.name, "frames": self.frames, "words": self.dense.words,
            "dense": self.dense.describe(), "beams": self.beams, "views": cfg.num_views, "levels": cfg.levels,
            "codebook_size": cfg.codebook_size,
            # stored semantic IDs per entry (the trie's codes); + 8 bytes of entry id in the state file
            "bytes_per_video": per_video,
            "index_bytes_per_video": (trie.total_bytes / len(self.ids)) if trie is not None else None,
            "distinct_ids": trie.num_ids if trie is not None else 0,
        }

    def __len__(self) -> int:
        return int(len(self.ids))


def register_recall_backends(register: Callable[[str, Callable[..., Any]], None]) -> None:
    """`vidseek index --recall grdr:CKPT`: semantic-ID trie recall (read by the searcher's
    provider list; lives here, not in models/grdr.py, so that models never import search)."""
    register(BACKEND_NAME, GRDRRecallBackend.build)
