"""benchmarks/recall.py's GEMM-floor arithmetic against torch's own FLOP counter, and its beam count
against a hand count of the search."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import imported_benchmark
from vidseek.index.trie import SemanticIdTrie
from vidseek.models.grdr import GRDR, GRDRConfig, IncrementalDecoder, PrefixStates


@pytest.fixture(scope="module")
def bench():
    with imported_benchmark("recall") as module:
        yield module


def small_grdr(layers: int) -> GRDR:
    torch.manual_seed(0)
    cfg = GRDRConfig(embed_dim=32, latent_dim=32, num_views=2, levels=3, codebook_size=16, decoder_layers=layers,
                     decoder_heads=2, text_width=16, text_layers=1, text_heads=2, context_length=12, dropout=0.0)
    return GRDR(cfg).eval()


@pytest.mark.parametrize("layers", [1, 3])
def test_flops_per_beam_equal_torch_flop_counter(bench, layers):
    model = small_grdr(layers)
    trie = SemanticIdTrie(np.random.default_rng(0).integers(0, 16, size=(50, 2, 3)), 16)
    with torch.no_grad():
        memory, mask = model.retriever.encode_text(model.tokenize(["red circle moves", "blue square"]))
        decode = IncrementalDecoder(model.retriever, memory, mask, PrefixStates(model.retriever, trie))
        start = torch.zeros(2, 1, 0, dtype=torch.long)
        decode(start, start, torch.arange(2), 0)
        with FlopCounterMode(display=False) as counter:  # level 1: 2 queries × 3 beams
            decode(torch.tensor([[[3], [5], [1]], [[2], [0], [7]]]), torch.zeros(2, 3, 1, dtype=torch.long),
                   torch.arange(2), 0)
    # the counter sees the dense layers (addmm/mm), not the CPU flash-attention kernel: compare at L = 0
    assert counter.get_total_flops() / 6 == bench.decoder_flops_per_beam(model.config, 0)
    w = 32
    assert bench.decoder_flops_per_beam(model.config, 5) - bench.decoder_flops_per_beam(model.config, 0) == \
        2 * layers * 2 * 5 * w  # q·K and weights·V over 5 memory positions per block


def test_beam_steps_count_every_decoded_beam(bench):
    """Without chunking every level decodes every kept row: the start, then min(beams, rows × K)
    rows per level — dead rows (-inf, prefixes outside the trie) included, as the decoder computes them."""
    model = small_grdr(1)
    codes = np.array([[[a, b, c]] for a in range(16) for b in range(4) for c in range(2)])  # 128 IDs
    trie = SemanticIdTrie(codes, 16)
    with torch.no_grad():
        encoded = [model.retriever.encode_text(model.tokenize(["red circle", "blue", "a star"]))]
    steps = bench.beam_steps_per_query(model, trie, encoded, beams=10, states=None, chunk=None)
    assert steps == 1 + 10 + 10
    # level 1 keeps all 16 codes; level 2 keeps 100 of 16 × 16 rows (64 in the trie, 36 dead)
    assert bench.beam_steps_per_query(model, trie, encoded, beams=100, states=None, chunk=None) == 1 + 16 + 100
