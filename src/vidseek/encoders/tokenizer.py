"""CLIP's byte-level BPE tokenizer (Radford et al. 2021, CLIP §2.4: "lower-cased byte pair
encoding with a 49,152 vocab size … bracketed with [SOS] and [EOS] tokens").

We use open_clip's `SimpleTokenizer`, which ships its BPE merges inside the wheel, so nothing is
ever fetched from a hub (a hub tokenizer loaded offline can silently come back with a 2-token
vocabulary — DESIGN.md, "Facts about this environment").
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

#: Size of CLIP's text vocabulary: 256 bytes ×2 (+ "</w>" variants) + 48,894 merges + SOT + EOT.
CLIP_VOCAB_SIZE = 49408
#: Id of `<start_of_text>`.
SOT_TOKEN_ID = 49406
#: Id of `<end_of_text>`; the largest id, so `argmax` over a row finds it (CLIP's text pooling).
EOT_TOKEN_ID = 49407


@lru_cache(maxsize=1)
def _simple_tokenizer():
    # Parsing the 1.3 MB merge list takes a few hundred ms: do it once, on first use, not at import.
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    if tok.vocab_size != CLIP_VOCAB_SIZE or tok.eot_token_id != EOT_TOKEN_ID:
        raise RuntimeError(
            f"open_clip's SimpleTokenizer has vocabulary {tok.vocab_size} (EOT {tok.eot_token_id}); "
            f"expected {CLIP_VOCAB_SIZE} (EOT {EOT_TOKEN_ID}); reinstall open_clip_torch")
    return tok


def vocab_size() -> int:
    """Number of token ids the tokenizer can emit (49408)."""
    return _simple_tokenizer().vocab_size


def encode_words(text: str) -> list[int]:
    """BPE ids of `text` without SOT/EOT (text is cleaned and lower-cased as in CLIP)."""
    return _simple_tokenizer().encode(text)


def decode_ids(ids: list[int]) -> str:
    """Inverse of `encode_words` up to whitespace/case normalisation; special tokens shown as text."""
    return _simple_tokenizer().decode([int(i) for i in ids])


def tokenize(texts: list[str] | str, context_length: int) -> Tensor:
    """Texts → LongTensor [B, context_length]: SOT, BPE ids, EOT, then 0-padding.

    A text longer than the context is truncated and its last kept position is overwritten with
    EOT, so the sentence feature (read at the EOT position) always exists.
    """
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 to hold SOT and EOT, got {context_length}")
    if isinstance(texts, str):
        texts = [texts]
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [SOT_TOKEN_ID, *encode_words(text), EOT_TOKEN_ID]
        if len(ids) > context_length:
            ids = ids[:context_length]
            ids[-1] = EOT_TOKEN_ID
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def used_length(tokens: Tensor) -> int:
    """Positions up to and including the last EOT of a batch [B, L] (EOT is the largest id, as
    CLIP's pooling assumes). Later positions are padding in every row: a causal text tower's
    outputs at SOT .. EOT do not depend on them, so encoding only the first `used_length`
    positions gives the same sentence feature in a fraction of the work (queries are ~10 tokens
    of a 32- or 77-position context)."""
    if tokens.shape[1] == 0:
        return 0
    return int(tokens.argmax(dim=-1).max()) + 1
