"""Semantic-ID trie for GRDR generative recall (seed `003_*`, METHODS.md "GRDR … Inference").

Every video is indexed under all of its N_v view IDs (each ID = L codes from a K-entry codebook
per level). Query-time decoding is constrained by this trie so that beam search only ever emits
IDs that exist in the corpus; each emitted ID then expands to all videos that carry it.

Layout (all numpy, built once from the code array, so load = rebuild from the codes)::

    codes        [N, N_v, L] uint8 (uint16 if K > 256)   the index itself: N_v·L bytes/video
    id_keys      [M] int64   sorted mixed-radix keys of the M distinct IDs (key = Σ c_l·K^(L-1-l))
    child[l]     [n_l + 1, K] int32   prefix node at level l → node at level l+1 (-1: no child);
                                      child[L-1] maps to the ID's row in id_keys; the extra last
                                      row is all -1 so an invalid node (-1) indexes a dead row
    post_offsets [M + 1] int64, post_videos [P] int32   videos of each ID (ascending, unique)

`allowed_next` and `constrained_beam_search` are vectorised table lookups: no Python per beam;
the search scores chunks of beams and skips those that provably cannot be selected.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from vidseek.errors import SearchIndexError
from vidseek.utils import atomic_path

TRIE_FORMAT = "vidseek.semantic_id_trie"
TRIE_FORMAT_VERSION = 1


def top_beams(candidates: Tensor, beams: int) -> tuple[Tensor, Tensor]:
    """The best min(beams, n) of `candidates [B, n]` per row, best first: (values, positions).

    Deterministic under ties (equal values: the lower position first, also at the cut-off), which
    `Tensor.topk` does not promise — so a search that leaves out candidates below the cut-off
    returns exactly what the full search returns.
    """
    kk = min(beams, candidates.shape[1])
    threshold = candidates.topk(kk, dim=1).values[:, -1:]
    above = candidates > threshold
    tied = candidates == threshold
    room = kk - above.sum(dim=1, keepdim=True)
    take = above | (tied & (tied.cumsum(dim=1) <= room))
    positions = take.nonzero()[:, 1].view(len(candidates), kk)  # ascending position per row
    values = candidates.gather(1, positions)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), positions.gather(1, order)


def code_dtype(codebook_size: int) -> np.dtype:
    """The narrowest integer that holds codes 0 .. K-1: one byte per code up to K = 256 (the
    release's codebooks are 96-200), two up to 65,536."""
    for dtype in (np.uint8, np.uint16):
        if codebook_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    return np.dtype(np.int32)


class SemanticIdTrie:
    """Trie over the view IDs of a corpus: `codes[n, v]` is video n's ID under view v."""

    def __init__(self, codes: np.ndarray | Tensor, codebook_size: int):
        if isinstance(codes, Tensor):
            codes = codes.detach().cpu().numpy()
        codes = np.asarray(codes)
        if codes.ndim != 3:
            raise SearchIndexError(
                f"semantic IDs must have shape [videos, views, levels], got {tuple(codes.shape)}; "
                "pass the output of GRDR.encode(video_features)")
        if codes.shape[0] == 0 or codes.shape[1] == 0 or codes.shape[2] == 0:
            raise SearchIndexError(
                f"cannot build a semantic-ID trie from codes of shape {tuple(codes.shape)}; "
                "index at least one video")
        if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
            raise SearchIndexError(
                f"semantic IDs must lie in [0, {codebook_size}), found [{codes.min()}, {codes.max()}]; "
                "build the trie with the codebook size of the model that produced the codes")
        levels = codes.shape[2]
        if levels * np.log2(max(codebook_size, 2)) >= 62:
            raise SearchIndexError(
                f"{levels} levels × codebook {codebook_size} do not fit a 64-bit key; "
                "use fewer levels or a smaller codebook")
        self.codebook_size = int(codebook_size)
        self.codes = np.ascontiguousarray(codes.astype(code_dtype(codebook_size), copy=False))
        self._build()

    # --- construction ----------------------------------------------------------------------------
    def _build(self) -> None:
        n, n_views, levels = self.codes.shape
        k = self.codebook_size
        flat = self.codes.reshape(n * n_views, levels).astype(np.int64)
        keys = np.zeros(len(flat), dtype=np.int64)
        for level in range(levels):
            keys = keys * k + flat[:, level]
        self.id_keys, id_of_entry = np.unique(keys, return_inverse=True)
        video_of_entry = np.repeat(np.arange(n, dtype=np.int64), n_views)

        # Posting lists: sort entries by (ID, video) and drop a video listed twice under one ID
        # (two of its views collapsed onto the same ID).
        order = np.lexsort((video_of_entry, id_of_entry))
        ids_sorted, vids_sorted = id_of_entry[order], video_of_entry[order]
        keep = np.ones(len(order), dtype=bool)
        keep[1:] = (ids_sorted[1:] != ids_sorted[:-1]) | (vids_sorted[1:] != vids_sorted[:-1])
        ids_sorted, vids_sorted = ids_sorted[keep], vids_sorted[keep]
        self.post_videos = vids_sorted.astype(np.int32)
        self.post_offsets = np.zeros(len(self.id_keys) + 1, dtype=np.int64)
        np.cumsum(np.bincount(ids_sorted, minlength=len(self.id_keys)), out=self.post_offsets[1:])

        # Per-level child tables from the sorted distinct prefixes.
        self.child: list[np.ndarray] = []
        parent_prefixes = np.zeros(1, dtype=np.int64)  # the root: the empty prefix
        for level in range(levels):
            prefixes = np.unique(self.id_keys // k ** (levels - 1 - level))
            table = np.full((len(parent_prefixes) + 1, k), -1, dtype=np.int32)
            parent_rows = np.searchsorted(parent_prefixes, prefixes // k)
            table[parent_rows, prefixes % k] = np.arange(len(prefixes), dtype=np.int32)
            self.child.append(table)
            parent_prefixes = prefixes
        self._child_t = [torch.from_numpy(t) for t in self.child]

    # --- properties ------------------------------------------------------------------------------
    @property
    def num_videos(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_views(self) -> int:
        return int(self.codes.shape[1])

    @property
    def levels(self) -> int:
        return int(self.codes.shape[2])

    @property
    def num_ids(self) -> int:
        """Distinct semantic IDs in the corpus (≤ N·N_v)."""
        return int(len(self.id_keys))

    @property
    def bytes_per_video(self) -> int:
        """Bytes of stored semantic IDs per video: N_v · L · itemsize (12 for 4 views × 3 levels, K ≤ 256)."""
        return int(self.num_views * self.levels * self.codes.itemsize)

    @property
    def total_bytes(self) -> int:
        """Everything held in memory: codes + ID keys + child tables + posting lists."""
        return int(self.codes.nbytes + self.id_keys.nbytes + sum(t.nbytes for t in self.child)
                   + self.post_offsets.nbytes + self.post_videos.nbytes)

    def all_ids(self) -> np.ndarray:
        """The M distinct IDs [M, L] (int64), in ascending key order."""
        k, levels = self.codebook_size, self.levels
        return np.stack([(self.id_keys // k ** (levels - 1 - lv)) % k for lv in range(levels)], axis=1)

    def node_prefixes(self, level: int) -> np.ndarray:
        """The codes [n_level, level] (int64) of every trie node at `level` (0 ≤ level ≤ L), in node
        order: ascending prefix, the order `_build` numbers them in (level 0: the root, one empty
        prefix; level L: the distinct IDs, = `all_ids()`)."""
        if not 0 <= level <= self.levels:
            raise SearchIndexError(f"trie levels are 0..{self.levels}, got {level}")
        if level == 0:
            return np.zeros((1, 0), dtype=np.int64)
        k = self.codebook_size
        prefixes = np.unique(self.id_keys // k ** (self.levels - level))
        return np.stack([(prefixes // k ** (level - 1 - j)) % k for j in range(level)], axis=1).reshape(-1, level)

    # --- lookups ---------------------------------------------------------------------------------
    def nodes(self, prefixes: Tensor) -> Tensor:
        """Trie node of each prefix [B, i] at level i (-1 where the prefix is not in the trie);
        node j of level i is the j-th row of `node_prefixes(i)`."""
        node = torch.zeros(prefixes.shape[0], dtype=torch.long)
        for level in range(prefixes.shape[1]):
            code = prefixes[:, level]
            valid = (code >= 0) & (code < self.codebook_size)
            nxt = self._child_t[level][node, code.clamp(0, self.codebook_size - 1)].long()
            node = torch.where(valid & (node >= 0), nxt, torch.full_like(nxt, -1))
        return node

    def allowed_next(self, prefixes: Tensor | np.ndarray) -> Tensor:
        """Bool mask [B, K]: codes that extend each prefix [B, i] (0 ≤ i < L) to a prefix of a
        corpus ID. A prefix that is not itself in the trie allows nothing."""
        prefixes = torch.as_tensor(np.asarray(prefixes) if not isinstance(prefixes, Tensor) else prefixes)
        prefixes = prefixes.long().reshape(prefixes.shape[0], -1)
        level = prefixes.shape[1]
        if level >= self.levels:
            raise SearchIndexError(f"a prefix of length {level} has no next code: IDs have {self.levels} levels")
        return self._child_t[level][self.nodes(prefixes)] >= 0  # node -1 → the dead last row

    def id_index(self, ids: Tensor | np.ndarray) -> np.ndarray:
        """Row in `all_ids()` of each full ID [B, L], or -1 when the ID is not in the corpus."""
        ids = torch.as_tensor(np.asarray(ids)).long().reshape(-1, self.levels)
        return self.nodes(ids).numpy()

    # --- decoding --------------------------------------------------------------------------------
    @torch.no_grad()
    def constrained_beam_search(
        self,
        step_logits_fn: Callable[[Tensor, Tensor, Tensor, int], Tensor],
        num_queries: int,
        beams: int,
        levels: int | None = None,
        chunk: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Trie-constrained beam search, batched over queries (GRDR inference).

        `step_logits_fn(prefixes [r, c, i], ancestors [r, c, i], rows [r], first_beam) -> logits
        [r, c, K]` scores the next code of beams `first_beam .. first_beam + c - 1` of the queries
        `rows`; `ancestors[..., j]` is the position, among the level-j beams of the same query, of
        each beam's length-j prefix (what an incremental decoder needs to find its cached states).
        A beam's score is the sum of log-softmax over all K codes at each step (as in the release's
        HF constrained generation: disallowed codes are masked after the softmax, so probabilities
        are not renormalised over the allowed set).

        `chunk=None` scores all beams of all queries in one call per level. With `chunk=c` the
        beams of a level (kept best first) are scored c at a time and a beam is skipped once its
        own score is strictly below the `beams`-th best candidate found so far: log-probabilities
        are ≤ 0, so none of its extensions could be selected — the result is exactly the same,
        with fewer decoder calls (an exact early-stopping bound, not a heuristic).

        Returns `ids [B, beams, levels]` (best first, ties broken by lower (beam, code) position;
        rows of -1 when the trie holds fewer IDs than `beams`) and `scores [B, beams]` (-inf for
        those rows). Every other row is an ID (or, for levels < L, a prefix) present in the trie.
        """
        levels = self.levels if levels is None else int(levels)
        if not 1 <= levels <= self.levels:
            raise SearchIndexError(f"beam search depth must be in [1, {self.levels}], got {levels}")
        if beams < 1:
            raise SearchIndexError(f"beams must be >= 1, got {beams}")
        if chunk is not None and chunk < 1:
            raise SearchIndexError(f"beam chunk must be >= 1, got {chunk}")
        b, k = int(num_queries), self.codebook_size
        prefixes = torch.zeros(b, 1, 0, dtype=torch.long)
        ancestors = torch.zeros(b, 1, 0, dtype=torch.long)
        scores = torch.zeros(b, 1)
        nodes = torch.zeros(b, 1, dtype=torch.long)
        for level in range(levels):
            m = prefixes.shape[1]
            children = self._child_t[level][nodes]  # [B, M, K]; node -1 reads the dead row
            cand = torch.full((b, m, k), float("-inf"))
            step = m if chunk is None else chunk
            best = torch.full((b, 0), float("-inf"))  # the best `beams` candidates found so far
            for first in range(0, m, step):
                beam_scores = scores[:, first:first + step]
                kth = best[:, -1:] if best.shape[1] == beams else torch.full((b, 1), float("-inf"))
                live = torch.isfinite(beam_scores) & (beam_scores >= kth)
                rows = live.any(dim=1).nonzero().squeeze(1)
                if len(rows) == 0:  # beams are sorted and `kth` only grows: the rest are dead too
                    break
                c = beam_scores.shape[1]
                logits = step_logits_fn(prefixes[rows, first:first + c], ancestors[rows, first:first + c], rows, first)
                if logits.shape != (len(rows), c, k):
                    raise SearchIndexError(
                        f"step_logits_fn returned shape {tuple(logits.shape)}, expected {(len(rows), c, k)}; "
                        "the model's codebook size must match the trie's")
                logp = torch.log_softmax(logits.float().cpu(), dim=-1)
                part = torch.where(children[rows, first:first + c] >= 0,
                                   beam_scores[rows].unsqueeze(-1) + logp, torch.tensor(float("-inf")))
                cand[rows, first:first + c] = part
                if chunk is not None:
                    merged = torch.cat([best, cand[:, first:first + c].reshape(b, -1)], dim=1)
                    best = merged.topk(min(beams, merged.shape[1]), dim=1).values
            top_scores, top = top_beams(cand.reshape(b, m * k), beams)
            beam_of, code = top // k, top % k
            child = children.reshape(b, m * k).gather(1, top).long()
            nodes = torch.where(torch.isfinite(top_scores), child, torch.full_like(child, -1))
            prefixes = torch.cat(
                [prefixes.gather(1, beam_of.unsqueeze(-1).expand(-1, -1, level)), code.unsqueeze(-1)], dim=2)
            ancestors = torch.cat(
                [ancestors.gather(1, beam_of.unsqueeze(-1).expand(-1, -1, level)), beam_of.unsqueeze(-1)], dim=2)
            scores = top_scores
        dead = ~torch.isfinite(scores)
        prefixes = prefixes.masked_fill(dead.unsqueeze(-1), -1)
        if prefixes.shape[1] < beams:  # fewer IDs than beams: pad with empty rows
            pad = beams - prefixes.shape[1]
            prefixes = torch.cat([prefixes, torch.full((b, pad, levels), -1, dtype=torch.long)], dim=1)
            scores = torch.cat([scores, torch.full((b, pad), float("-inf"))], dim=1)
        return prefixes, scores

    def candidates(self, ids_in_beam_order: Tensor | np.ndarray | Sequence[Sequence[Sequence[int]]]) -> list[list[int]]:
        """Expand each query's beam IDs [B, beams, l] to videos: in beam order, de-duplicated.

        A full-length ID (l = L) expands to the videos indexed under it (under any view, ascending
        video index); a shorter prefix expands to every video under that prefix. Rows containing
        -1 (empty beams) are skipped.
        """
        ids = np.asarray(ids_in_beam_order.cpu() if isinstance(ids_in_beam_order, Tensor) else ids_in_beam_order,
                         dtype=np.int64)
        if ids.ndim != 3 or ids.shape[2] > self.levels:
            raise SearchIndexError(
                f"beam IDs must have shape [queries, beams, ≤{self.levels}], got {tuple(ids.shape)}")
        length, k = ids.shape[2], self.codebook_size
        valid = (ids >= 0).all(axis=2) & (ids < k).all(axis=2)
        keys = np.zeros(ids.shape[:2], dtype=np.int64)
        for level in range(length):
            keys = keys * k + np.clip(ids[:, :, level], 0, k - 1)
        span = k ** (self.levels - length)  # IDs under a prefix form one contiguous key range
        lo = np.searchsorted(self.id_keys, keys * span)
        hi = np.searchsorted(self.id_keys, (keys + 1) * span)
        starts, stops = self.post_offsets[lo], self.post_offsets[hi]
        out: list[list[int]] = []
        for q in range(ids.shape[0]):
            rows = np.flatnonzero(valid[q])
            if len(rows) == 0:
                out.append([])
                continue
            found = np.concatenate([self.post_videos[starts[q, r]:stops[q, r]] for r in rows])
            _, first = np.unique(found, return_index=True)
            out.append(found[np.sort(first)].tolist())
        return out

    # --- persistence -----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the codes (the tables are rebuilt on load) to an .npz file, atomically."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, codes=self.codes, codebook_size=np.int64(self.codebook_size),
                         format=np.array(TRIE_FORMAT), version=np.int64(TRIE_FORMAT_VERSION))

    @classmethod
    def load(cls, path: str | Path) -> "SemanticIdTrie":
        path = Path(path)
        if not path.is_file():
            raise SearchIndexError(f"semantic-ID index {path} not found; build it with `vidseek index`")
        try:
            with np.load(path, allow_pickle=False) as data:
                fmt, version = str(data["format"]), int(data["version"])
                codes, k = data["codes"], int(data["codebook_size"])
        except (OSError, ValueError, KeyError) as err:
            raise SearchIndexError(f"semantic-ID index {path} is unreadable ({err}); rebuild it") from err
        if fmt != TRIE_FORMAT or version > TRIE_FORMAT_VERSION:
            raise SearchIndexError(
                f"{path} is a '{fmt}' v{version} file, not a semantic-ID trie v≤{TRIE_FORMAT_VERSION}; "
                "rebuild it with this vidseek version")
        return cls(codes, k)
