"""SemanticIdTrie: constrained decoding never leaves the corpus, exactness vs exhaustive scoring,
candidate expansion order, storage size, persistence."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vidseek.errors import SearchIndexError
from vidseek.index.trie import SemanticIdTrie


def table_logits_fn(tables: torch.Tensor, k: int):
    """Deterministic scorer: logits of query q after prefix p = tables[q, key(p)], where key is a
    distinct row per prefix of any length (offset 1 + K + … for longer prefixes)."""

    def fn(prefixes: torch.Tensor, ancestors: torch.Tensor, rows: torch.Tensor, first: int) -> torch.Tensor:
        b, m, i = prefixes.shape
        assert ancestors.shape == (b, m, i) and rows.shape == (b,)
        offset = sum(k ** j for j in range(i))
        key = torch.zeros(b, m, dtype=torch.long)
        for j in range(i):
            key = key * k + prefixes[:, :, j].clamp(min=0)
        return tables[rows[:, None], offset + key]

    return fn


def exhaustive_scores(trie: SemanticIdTrie, tables: torch.Tensor, query: int) -> list[tuple[float, tuple[int, ...]]]:
    """Slow reference: score every corpus ID by Σ_l log_softmax(logits(prefix_l))[c_l]."""
    k = trie.codebook_size
    out = []
    for code in trie.all_ids().tolist():
        total = 0.0
        for level in range(len(code)):
            key = 0
            for c in code[:level]:
                key = key * k + c
            row = tables[query, sum(k ** j for j in range(level)) + key]
            total += float(torch.log_softmax(row.double(), dim=0)[code[level]])
        out.append((total, tuple(code)))
    return sorted(out, reverse=True)


def random_trie(seed: int, n: int = 12, views: int = 2, levels: int = 3, k: int = 5) -> SemanticIdTrie:
    rng = np.random.default_rng(seed)
    return SemanticIdTrie(rng.integers(0, k, size=(n, views, levels)), k)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("beams", [1, 4, 30])
def test_beam_search_never_emits_an_id_outside_the_index(seed: int, beams: int):
    trie = random_trie(seed)
    k = trie.codebook_size
    queries = 40
    tables = torch.randn(queries, 1 + k + k * k, k, generator=torch.Generator().manual_seed(seed))
    # A scorer that strongly prefers codes absent from the trie: constraints must still hold.
    ids, scores = trie.constrained_beam_search(table_logits_fn(tables * 10, k), queries, beams)
    corpus = {tuple(c) for c in trie.all_ids().tolist()}
    assert ids.shape == (queries, beams, 3) and scores.shape == (queries, beams)
    for q in range(queries):
        live = [tuple(r) for r in ids[q].tolist() if r[0] >= 0]
        assert len(live) == min(beams, len(corpus))
        assert set(live) <= corpus and len(set(live)) == len(live)
        assert torch.isfinite(scores[q, : len(live)]).all() and torch.isinf(scores[q, len(live):]).all()
        assert (scores[q, : len(live)].diff() <= 1e-6).all()  # best first


@pytest.mark.parametrize("seed", range(4))
def test_beam_search_with_enough_beams_equals_exhaustive_scoring(seed: int):
    trie = random_trie(seed, n=9, views=2, levels=3, k=4)
    k, queries = trie.codebook_size, 5
    tables = torch.randn(queries, 1 + k + k * k, k, generator=torch.Generator().manual_seed(100 + seed))
    beams = trie.num_ids + 3
    ids, scores = trie.constrained_beam_search(table_logits_fn(tables, k), queries, beams)
    for q in range(queries):
        expected = exhaustive_scores(trie, tables, q)
        got_ids = [tuple(r) for r in ids[q, : trie.num_ids].tolist()]
        assert got_ids == [code for _, code in expected]
        np.testing.assert_allclose(scores[q, : trie.num_ids].numpy(), [s for s, _ in expected], rtol=1e-5, atol=1e-5)


def test_allowed_next_matches_brute_force_prefix_sets():
    trie = random_trie(3, n=15, views=3, levels=3, k=4)
    ids = trie.all_ids().tolist()
    k = trie.codebook_size
    for length in range(3):
        prefixes = np.array(np.meshgrid(*[range(k)] * length, indexing="ij")).reshape(length, -1).T \
            if length else np.zeros((1, 0), dtype=np.int64)
        mask = trie.allowed_next(torch.as_tensor(prefixes))
        for row, prefix in enumerate(prefixes.tolist()):
            expected = {c[length] for c in ids if c[:length] == prefix}
            assert set(torch.nonzero(mask[row]).flatten().tolist()) == expected
    # A prefix with an empty (-1) slot allows nothing.
    assert not trie.allowed_next(torch.tensor([[-1, 0]])).any()


def test_node_prefixes_are_the_distinct_prefixes_in_node_order():
    trie = hand_trie()  # IDs (0,1), (0,2)... see hand_trie: {01, 22, 10, 02}
    assert trie.node_prefixes(0).shape == (1, 0)
    assert trie.node_prefixes(1).tolist() == [[0], [1], [2]]
    assert trie.node_prefixes(2).tolist() == [[0, 1], [0, 2], [1, 0], [2, 2]] == trie.all_ids().tolist()
    assert torch.equal(trie.nodes(torch.from_numpy(trie.node_prefixes(2))), torch.arange(4))
    assert trie.nodes(torch.tensor([[1, 1], [2, 0]])).tolist() == [-1, -1]  # not in the corpus
    with pytest.raises(SearchIndexError, match="levels are 0..2"):
        trie.node_prefixes(3)


def hand_trie() -> SemanticIdTrie:
    codes = np.array([
        [[0, 1], [2, 2]],  # video 0
        [[0, 1], [0, 1]],  # video 1: both views collapsed onto one ID
        [[2, 2], [1, 0]],  # video 2
        [[1, 0], [0, 2]],  # video 3
    ])
    return SemanticIdTrie(codes, 3)


def test_candidates_are_deduplicated_in_beam_order():
    trie = hand_trie()
    assert trie.num_ids == 4
    beams = np.array([[[2, 2], [0, 1], [1, 0], [-1, -1]],
                      [[0, 1], [0, 1], [2, 1], [0, 2]]])  # repeated ID, an absent ID (2,1)
    assert trie.candidates(beams) == [[0, 2, 1, 3], [0, 1, 3]]
    # Prefixes expand to every video under them, in beam order.
    assert trie.candidates(np.array([[[1], [0]]])) == [[2, 3, 0, 1]]
    assert trie.candidates(np.full((1, 2, 2), -1)) == [[]]


def test_bytes_per_video_is_exact():
    codes = np.zeros((5, 4, 3), dtype=np.int64)
    small = SemanticIdTrie(codes, 256)  # codes 0..255: one byte each
    assert small.codes.dtype == np.uint8 and small.bytes_per_video == 4 * 3 * 1
    mid = SemanticIdTrie(codes, 257)
    assert mid.codes.dtype == np.uint16 and mid.bytes_per_video == 4 * 3 * 2
    big = SemanticIdTrie(codes, 70000)
    assert big.codes.dtype == np.int32 and big.bytes_per_video == 4 * 3 * 4
    trie = hand_trie()
    # codes 4·2·2·1 + keys 4·8 + tables (1+1)·3·4 + (3+1)·3·4 + (4+1)·3·4... computed from parts:
    expected = 16 + 32 + (2 * 3 + 4 * 3) * 4 + 5 * 8 + 7 * 4
    assert trie.total_bytes == expected


def test_save_load_round_trip(tmp_path):
    trie = random_trie(7, n=20, views=4, levels=3, k=6)
    path = tmp_path / "ids.npz"
    trie.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.npz"]  # no temp file left behind
    loaded = SemanticIdTrie.load(path)
    np.testing.assert_array_equal(loaded.codes, trie.codes)
    assert loaded.codebook_size == 6 and loaded.codes.dtype == np.uint8
    beams = trie.all_ids()[None, ::-1]
    assert loaded.candidates(beams) == trie.candidates(beams)


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(SearchIndexError, match="not found"):
        SemanticIdTrie.load(tmp_path / "missing.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file")
    with pytest.raises(SearchIndexError, match="unreadable"):
        SemanticIdTrie.load(bad)
    with pytest.raises(SearchIndexError, match=r"\[0, 4\)"):
        SemanticIdTrie(np.full((2, 1, 2), 4), 4)
    with pytest.raises(SearchIndexError, match="shape"):
        SemanticIdTrie(np.zeros((2, 3)), 4)


def test_ancestors_point_at_each_beams_prefix_one_level_up():
    trie = random_trie(11, n=30, views=2, levels=3, k=5)
    tables = torch.randn(3, 1 + 5 + 25, 5, generator=torch.Generator().manual_seed(11))
    score = table_logits_fn(tables, 5)
    seen: list[torch.Tensor] = []

    def recording(prefixes, ancestors, rows, first):
        assert first == 0 and torch.equal(rows, torch.arange(3))  # chunk=None: one call per level
        for j, earlier in enumerate(seen):
            idx = ancestors[:, :, j:j + 1].expand(-1, -1, earlier.shape[2])
            assert torch.equal(earlier.gather(1, idx), prefixes[:, :, :j])
        seen.append(prefixes.clone())
        return score(prefixes, ancestors, rows, first)

    trie.constrained_beam_search(recording, 3, beams=7)
    assert [p.shape[1:] for p in seen] == [(1, 0), (5, 1), (7, 2)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("chunk", [1, 2, 5, 16])
def test_chunked_search_with_skipping_equals_the_full_search(seed: int, chunk: int):
    """Scoring beams in chunks and skipping those below the running cut-off changes nothing —
    also with many exact ties (logits rounded to integers) and sharp distributions (scaled)."""
    trie = random_trie(seed, n=60, views=3, levels=3, k=6)
    k, queries = trie.codebook_size, 7
    gen = torch.Generator().manual_seed(200 + seed)
    tables = torch.randn(queries, 1 + k + k * k, k, generator=gen)
    for logits in (tables, (tables * 2).round(), tables * 40):
        calls: list[int] = []
        fn = table_logits_fn(logits, k)

        def counting(prefixes, ancestors, rows, first, fn=fn):
            calls.append(prefixes.shape[0] * prefixes.shape[1])
            return fn(prefixes, ancestors, rows, first)

        for beams in (1, 4, 11):
            full_ids, full_scores = trie.constrained_beam_search(fn, queries, beams)
            ids, scores = trie.constrained_beam_search(counting, queries, beams, chunk=chunk)
            assert torch.equal(ids, full_ids)
            assert torch.equal(scores, full_scores)


def test_chunked_search_skips_beams_that_cannot_win():
    """Level-0 logits make code 0 overwhelmingly likely and give every other prefix a near-uniform
    continuation: after the first beam's children the cut-off excludes all other beams."""
    k = 4
    codes = np.array([[[a, b]] for a in range(k) for b in range(k)])  # every 2-code ID exists
    trie = SemanticIdTrie(codes, k)
    tables = torch.zeros(1, 1 + k, k)
    tables[0, 0] = torch.tensor([50.0, 0.0, 0.0, 0.0])
    scored: list[int] = []

    def fn(prefixes, ancestors, rows, first):
        scored.append(prefixes.shape[1])
        return table_logits_fn(tables, k)(prefixes, ancestors, rows, first)

    ids, _ = trie.constrained_beam_search(fn, 1, beams=4, chunk=1)
    assert scored == [1, 1]  # the root, then only beam 0 of level 1; beams 1-3 are skipped
    assert ids[0, :, 0].tolist() == [0, 0, 0, 0]
    full, _ = trie.constrained_beam_search(table_logits_fn(tables, k), 1, beams=4)
    assert torch.equal(ids, full)


def test_top_beams_breaks_ties_by_position_also_at_the_cut_off():
    from vidseek.index.trie import top_beams

    gen = torch.Generator().manual_seed(3)
    values = torch.randint(0, 4, (50, 30), generator=gen).float()
    values[:5, ::3] = float("-inf")
    for beams in (1, 7, 30, 40):
        got_values, got_positions = top_beams(values, beams)
        for row in range(len(values)):
            expected = sorted(range(values.shape[1]), key=lambda j: (-values[row, j].item(), j))[:beams]
            assert got_positions[row].tolist() == expected
            assert got_values[row].tolist() == values[row, expected].tolist()
