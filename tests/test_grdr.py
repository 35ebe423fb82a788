"""GRDR: quantiser vs brute force, straight-through gradients, query-guided routing, the shared
codebook between tokenizer and decoder, progressive training (drift), save/load and recall."""
from __future__ import annotations

import collections.abc
import json
import random

import numpy as np
import pytest
import torch
from torch import nn

from vidseek.errors import CheckpointError, ConfigError, SearchIndexError
from vidseek.index.trie import SemanticIdTrie
from vidseek.models.base import TextFeatures
from vidseek.models.grdr import (
    GRDR,
    GRDRConfig,
    GRDRRecall,
    IncrementalDecoder,
    PrefixStates,
    candidate_hit_rate,
    candidate_size_stats,
    codebook_usage,
    route_captions,
    view_diversity,
)
from vidseek.train.grdr_train import train_grdr


def tiny_config(**overrides) -> GRDRConfig:
    base = dict(embed_dim=16, num_views=2, levels=3, codebook_size=8, decoder_layers=1, decoder_heads=2,
                text_width=16, text_layers=1, text_heads=2, context_length=12, kmeans_iters=10)
    base.update(overrides)
    return GRDRConfig(**base)


WORDS = ["red", "blue", "green", "circle", "square", "moves", "left", "right", "up", "grows"]


def tiny_data(n: int = 32, seed: int = 0) -> tuple[torch.Tensor, list[list[str]]]:
    feats = nn.functional.normalize(torch.randn(n, 16, generator=torch.Generator().manual_seed(seed)), dim=-1)
    rnd = random.Random(seed)
    captions = [[" ".join(rnd.sample(WORDS, 4)) for _ in range(3)] for _ in range(n)]
    return feats, captions


# --- tokenizer -------------------------------------------------------------------------------------

def test_quantizer_assignment_equals_brute_force_cosine_per_level():
    torch.manual_seed(0)
    model = GRDR(tiny_config())
    for table in model.tokenizer.codebooks:  # non-degenerate tables
        table.data.normal_()
    x = torch.randn(6, 16)
    codes = model.encode(x)
    assert codes.shape == (6, 2, 3) and codes.dtype == torch.long
    tok = model.tokenizer
    for n in range(6):
        for v in range(2):
            residual = tok.views[v](x[n]).detach().tolist()
            for level in range(3):
                table = tok.codebooks[level].detach().tolist()
                norm_r = sum(a * a for a in residual) ** 0.5
                cos = [sum(a * b for a, b in zip(residual, row)) / (norm_r * sum(b * b for b in row) ** 0.5)
                       for row in table]
                best = max(range(len(cos)), key=cos.__getitem__)
                assert codes[n, v, level] == best
                residual = [a - b for a, b in zip(residual, table[best])]  # release: r − e
    # forward() (training path) assigns the same codes as encode() (index path).
    assert torch.equal(tok(x).codes, codes)


def test_straight_through_gradient_equals_output_gradient():
    torch.manual_seed(1)
    model = GRDR(tiny_config())
    model.tokenizer.codebooks[0].data.normal_()
    residual = torch.randn(5, 2, 16)
    r_hat = nn.functional.normalize(residual, dim=-1).requires_grad_(True)
    out = model.tokenizer.quantize_normalized(r_hat, 0)
    upstream = torch.randn_like(out.quantized)
    (out.quantized * upstream).sum().backward()
    assert torch.equal(r_hat.grad, upstream)
    # From the unnormalised residual the gradient is the upstream one through the normalisation.
    raw = residual.clone().requires_grad_(True)
    (model.tokenizer.quantize_level(raw, 0).quantized * upstream).sum().backward()
    raw_ref = residual.clone().requires_grad_(True)
    (nn.functional.normalize(raw_ref, dim=-1) * upstream).sum().backward()
    torch.testing.assert_close(raw.grad, raw_ref.grad)
    # the value is the chosen codebook row
    torch.testing.assert_close(out.quantized.detach(), model.tokenizer.codebooks[0].detach()[out.codes])
    # quantiser loss = MSE(e, r̂) · (1 + β)
    expected = (1 + 0.65) * nn.functional.mse_loss(out.quantized.detach(), r_hat.detach())
    torch.testing.assert_close(out.loss.detach(), expected)


def test_routing_two_obvious_clusters():
    a, b = np.array([10.0, 0.0]), np.array([0.0, 10.0])
    video0 = np.stack([a, b + 0.1, a + 0.1, b, a - 0.1])  # clusters {0,2,4} and {1,3}
    video1 = np.stack([b, b + 0.2, a])  # clusters {0,1} and {2}
    video2 = np.stack([a])  # one caption → view 0
    routes = route_captions([video0, video1, video2], num_views=2, seed=0, order="first_appearance")
    assert routes == [[0, 1, 0, 1, 0], [0, 0, 1], [0]]
    # Release order: view = sklearn's label; the partition is the same, labels may be swapped.
    release = route_captions([video0, video1, video2], num_views=2, seed=0)
    for got, want in zip(release, routes):
        pairs = {(g, w) for g, w in zip(got, want)}
        assert len(pairs) == len(set(want)) == len({g for g, _ in pairs})
    # k = min(N_v, #captions): 4 views and 3 captions → every caption gets its own view
    assert route_captions([video1], num_views=4, seed=0, order="first_appearance") == [[0, 1, 2]]


def test_decoder_shares_the_tokenizer_codebooks_and_paths_agree():
    torch.manual_seed(2)
    model = GRDR(tiny_config()).eval()
    for j in range(3):
        assert model.retriever.codebooks[j] is model.tokenizer.codebooks[j]
    names = [n for n, _ in model.named_parameters()]
    assert sum("codebooks.0" in n for n in names) == 1  # one tensor, not a copy
    tokens = model.tokenize(["a red circle", "blue square moves left"])
    memory, mask = model.retriever.encode_text(tokens)
    prev = torch.tensor([[3, 1], [0, 7]])
    with torch.no_grad():
        teacher = model.retriever.code_logits(model.retriever.decode(memory, mask, prev))
        step = model.retriever.step_logits(memory, mask, prev[:, None, :])
    torch.testing.assert_close(step[:, 0], teacher[:, 2])
    # logits = scale·cos with scale = 100 at init, so |logit| ≤ 100
    assert teacher.abs().max() <= 100.0 + 1e-4


@pytest.mark.parametrize("prefix_table", [False, True])
@pytest.mark.parametrize("chunk", [None, 1, 4])
def test_incremental_decoder_matches_full_recompute_beam_search(chunk, prefix_table):
    """The KV-cached decoder, scoring chunks of beams of any subset of queries, with or without
    block 0 read from the per-trie-node table, gives the beams of a search that recomputes every
    position from scratch (same IDs in the same order, scores to float rounding)."""
    torch.manual_seed(7)
    model = GRDR(tiny_config(decoder_layers=2)).eval()
    feats, _ = tiny_data(40, seed=7)
    trie = SemanticIdTrie(model.encode(feats), 8)
    tokens = model.tokenize(["a red circle moves left", "blue square", "green grows then up", "red"])
    with torch.no_grad():
        memory, mask = model.retriever.encode_text(tokens)
        full = trie.constrained_beam_search(
            lambda prefixes, ancestors, rows, first: model.retriever.step_logits(memory[rows], mask[rows], prefixes),
            4, beams=9)
        states = PrefixStates(model.retriever, trie, batch=5) if prefix_table else None  # batch 5: several batches
        cached = trie.constrained_beam_search(IncrementalDecoder(model.retriever, memory, mask, states), 4, beams=9,
                                              chunk=chunk)
    assert torch.equal(cached[0], full[0])
    torch.testing.assert_close(cached[1], full[1])


def test_prefix_states_equal_block_zero_of_a_full_decode():
    """Per trie node: the stored residual and cross query equal block 0 run on that node's prefix."""
    torch.manual_seed(3)
    model = GRDR(tiny_config(decoder_layers=2)).eval()
    trie = SemanticIdTrie(model.encode(tiny_data(30, seed=3)[0]), 8)
    states = PrefixStates(model.retriever, trie, batch=7)
    block = model.retriever.blocks[0]
    with torch.no_grad():
        for level in range(trie.levels):
            prefixes = torch.from_numpy(trie.node_prefixes(level))
            assert len(states.residual[level]) == len(prefixes) == int((trie.nodes(prefixes) >= 0).sum())
            assert torch.equal(trie.nodes(prefixes), torch.arange(len(prefixes)))  # node order = row order
            for row in (0, len(prefixes) - 1):
                x = model.retriever.decoder_inputs(prefixes[row][None, None])
                expected = block.self_attention(x)[0, 0, level]
                torch.testing.assert_close(states.residual[level][row], expected)
                torch.testing.assert_close(states.cross_query[level][row], block.cross_query(expected))


def test_contrastive_term_is_dot_product_ce_over_batch():
    torch.manual_seed(3)
    model = GRDR(tiny_config(dropout=0.0)).eval()
    feats, captions = tiny_data(4)
    tokens = model.tokenize([c[0] for c in captions])
    views = torch.tensor([0, 1, 1, 0])
    out = model.compute_losses(feats, tokens, views, torch.zeros(4, 0, dtype=torch.long), {"cl": 1.0})
    memory, mask = model.retriever.encode_text(tokens)
    summed = model.retriever.decode(memory, mask, torch.zeros(4, 0, dtype=torch.long)).sum(1)
    latents = model.tokenizer.latents(feats)[torch.arange(4), views]
    expected = nn.functional.cross_entropy(summed @ latents.t(), torch.arange(4))
    assert out.terms["cl"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(out.terms["cl"], rel=1e-6)


# --- diagnostics --------------------------------------------------------------------------------------

def test_diagnostics_on_hand_made_codes():
    codes = np.array([
        [[1, 2, 3], [1, 2, 0]],  # views agree on levels 0-1
        [[0, 5, 5], [4, 5, 5]],  # agree on levels 1-2 only
        [[2, 2, 2], [2, 2, 2]],  # identical IDs
        [[3, 1, 1], [0, 1, 2]],
    ])
    div = view_diversity(codes)
    assert div["same_code"] == [0.5, 1.0, 0.5]
    assert div["same_prefix"] == [0.5, 0.5, 0.25]
    usage = codebook_usage(codes, 8)
    assert usage["used_fraction"][0] == 5 / 8  # level 0 uses {0,1,2,3,4}
    # level 1 counts: code 2 ×4, 5 ×2, 1 ×2 → perplexity exp(H(.5,.25,.25)) = 2^1.5
    assert usage["perplexity"][1] == pytest.approx(2 ** 1.5)
    assert candidate_size_stats([[1, 2], [3], [], [4, 5, 6, 7]]) == {
        "min": 0.0, "mean": 1.75, "median": 1.5, "p90": pytest.approx(3.4), "max": 4.0}  # p90: 2 + 0.7·(4 − 2)
    assert candidate_hit_rate([[1, 2], [3], [5]], [2, 4, [9, 5]]) == pytest.approx(2 / 3)


# --- training, persistence, recall -----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    feats, captions = tiny_data()
    log = tmp_path_factory.mktemp("grdr") / "log.jsonl"
    steps = {"pretrain": 4, "main": 5, "fit": 4}  # 3 loops × 13 = 39 steps
    model = train_grdr(feats, captions, tiny_config(), steps, batch_size=8, seed=0, log_path=log, progress=False)
    return model, feats, captions, log


def test_train_grdr_runs_with_finite_losses_and_records_drift(trained):
    model, feats, _, log = trained
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 39
    assert all(np.isfinite(line["loss"]) for line in lines)
    assert [(h["loop"], h["phase"]) for h in model.history["steps"]] == [
        (loop, phase) for loop in range(3) for phase in ("pretrain", "main", "fit")]
    drift = model.history["drift"]
    assert [d["loop"] for d in drift] == [1, 2]
    assert [len(d["per_level"]) for d in drift] == [1, 2]
    assert all(0.0 <= x <= 1.0 for d in drift for x in d["per_level"])
    assert len(model.history["diversity"]) == 3 and len(model.history["usage"]) == 3
    codes = model.encode(feats)
    assert codes.shape == (32, 2, 3) and int(codes.min()) >= 0 and int(codes.max()) < 8
    # The last-loop diagnostics describe exactly the final codes.
    assert model.history["diversity"][-1]["same_code"] == view_diversity(codes)["same_code"]


def test_save_load_round_trip_gives_identical_codes_and_recall(trained, tmp_path):
    model, feats, captions, _ = trained
    path = tmp_path / "grdr.pt"
    model.save(path)
    loaded = GRDR.load(path)
    assert torch.equal(loaded.encode(feats), model.encode(feats))
    assert loaded.history["drift"] == model.history["drift"]
    trie = SemanticIdTrie(model.encode(feats), 8)
    queries = [captions[0][0], captions[5][1], "green square grows"]
    expected = GRDRRecall(model, trie).recall(queries, beams=6)
    assert GRDRRecall(loaded, trie).recall(queries, beams=6) == expected
    # candidates are real video indices, expanded from the beam IDs in order
    ids, _ = GRDRRecall(model, trie).recall_ids(queries, beams=6)
    assert expected == trie.candidates(ids)
    assert all(0 <= v < 32 for cands in expected for v in cands) and all(expected)


def test_recall_errors(trained, tmp_path):
    model, feats, _, _ = trained
    trie = SemanticIdTrie(model.encode(feats), 8)
    with pytest.raises(ConfigError, match="empty search query"):
        GRDRRecall(model, trie).recall(["  "], beams=3)
    assert GRDRRecall(model, trie).recall([], beams=3) == []
    with pytest.raises(SearchIndexError, match="rebuild the index"):
        GRDRRecall(model, SemanticIdTrie(model.encode(feats), 16))
    with pytest.raises(CheckpointError, match="not found"):
        GRDR.load(tmp_path / "nope.pt")
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a GRDR checkpoint"):
        GRDR.load(tmp_path / "other.pt")


class _InterruptAt(collections.abc.Mapping):
    """steps_per_phase that raises on the n-th lookup: simulates a crash between phases."""

    def __init__(self, steps: int, crash_at: int | None):
        self.steps, self.crash_at, self.calls = steps, crash_at, 0

    def __getitem__(self, phase):
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt
        return self.steps

    def __iter__(self):
        return iter(("pretrain", "main", "fit"))

    def __len__(self):
        return 3


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    feats, captions = tiny_data(12, seed=4)
    cfg = tiny_config(dropout=0.0, levels=2)
    reference = train_grdr(feats, captions, cfg, 1, batch_size=6, seed=3, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_grdr(feats, captions, cfg, _InterruptAt(1, crash_at=4), batch_size=6, seed=3, progress=False,
                   checkpoint_dir=tmp_path)
    resumed = train_grdr(feats, captions, cfg, 1, batch_size=6, seed=3, progress=False, checkpoint_dir=tmp_path)
    assert [h["phase"] for h in resumed.history["steps"]] == ["pretrain", "main", "fit"] * 2
    for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="another GRDR run"):
        train_grdr(feats, captions, cfg, 1, batch_size=6, seed=4, progress=False, checkpoint_dir=tmp_path)


# --- the CLIP text-encoder path ---------------------------------------------------------------------

class FakeClip(nn.Module):
    """Stand-in for the lead's ClipBackbone: tokenize + encode_text → TextFeatures."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.embed = nn.Embedding(49408, dim)

    def tokenize(self, texts):
        from vidseek.encoders.tokenizer import tokenize

        return tokenize(texts, 10)

    def encode_text(self, tokens):
        words = self.embed(tokens)
        mask = torch.arange(tokens.shape[1])[None] <= (tokens == 49407).int().argmax(1)[:, None]
        return TextFeatures(sentence=words[:, 0], words=words, mask=mask)


@pytest.mark.parametrize("encoder", ["tiny", "clip"])
def test_trailing_padding_is_not_encoded_and_changes_no_logit(encoder):
    torch.manual_seed(7)
    clip = FakeClip() if encoder == "clip" else None
    model = GRDR(tiny_config(text_encoder=encoder), clip_backbone=clip).eval()
    tokens = model.tokenize(["red circle moves left", "blue"])
    assert tokens.shape[1] in (10, 12)  # the fake CLIP's context, the tiny encoder's
    prev = torch.tensor([[3, 1], [0, 7]])
    with torch.no_grad():
        memory, mask = model.retriever.encode_text(tokens)
        full_states, full_mask = model.retriever.text_encoder(tokens)  # every position encoded
        full_memory = model.retriever.text_proj(full_states)
        trimmed = model.retriever.code_logits(model.retriever.decode(memory, mask, prev))
        untrimmed = model.retriever.code_logits(model.retriever.decode(full_memory, full_mask, prev))
    assert memory.shape[1] == 6 and mask.sum(dim=1).tolist() == [6, 3]  # SOT + 4 words + EOT
    torch.testing.assert_close(memory, full_memory[:, :6] * mask[..., None] + memory * ~mask[..., None],
                               atol=1e-5, rtol=0)  # real positions agree (padding rows may differ)
    torch.testing.assert_close(trimmed, untrimmed, atol=1e-4, rtol=0)


def test_clip_text_encoder_is_pluggable():
    torch.manual_seed(5)
    with pytest.raises(ConfigError, match="clip_backbone"):
        GRDR(tiny_config(text_encoder="clip"))
    with pytest.raises(ConfigError, match="text_encoder"):
        tiny_config(text_encoder="bert")
    model = GRDR(tiny_config(text_encoder="clip"), clip_backbone=FakeClip()).eval()
    feats, _ = tiny_data(10, seed=6)
    trie = SemanticIdTrie(model.encode(feats), 8)
    cands = GRDRRecall(model, trie).recall(["red circle", "blue"], beams=4)
    assert len(cands) == 2 and all(cands)
    assert all(0 <= v < 10 for c in cands for v in c)
