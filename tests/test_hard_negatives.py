"""Hard-negative partners: caption mining (planted partners, no self-pairs, bounded buckets), the
partner-aware batch sampler, and `--hard-negatives mined` on a generic JSONL without metadata."""
from __future__ import annotations

import json

import pytest

from vidseek.data.hard_negatives import Partner, group_partners, mine_caption_partners, partners_for, words_of
from vidseek.errors import ConfigError
from vidseek.train.data import EpochBatches

# Hand-written clips (several captions each) with planted partners, commented per clip.
FIXTURE = [
    ["a red circle moves left, then a blue square moves up",  # 0: order twin of 1
     "first a red circle slides left and then a blue box rises"],
    ["a blue square moves up, then a red circle moves left",  # 1: order twin of 0 and of 9
     "first a blue box rises and then a red circle slides left"],
    ["a green star moves down", "a big green star falls", "a large green star falls"],  # 2: big/large paraphrase
    ["a yellow star moves down", "a large yellow star falls"],  # 3: colour changed vs 2 and vs 5
    ["a big green star falls"],  # 4: same as a caption of 2; vs 5 only a synonym differs
    ["a large green star falls"],  # 5
    ["a man is cooking pasta", "a man cooks pasta in a kitchen"],  # 6: man/woman vs 8
    ["the man is cooking pasta"],  # 7: differs from 6 only in a function word
    ["a woman is cooking pasta"],  # 8
    ["a red circle moves left, then a blue square moves up"],  # 9: identical to 0, order twin of 1
    ["a cat and a dog play", "a dog and a cat play"],  # 10: its own captions are permutations
]
EXPECTED = {
    0: {1: "order"}, 1: {0: "order", 9: "order"}, 2: {3: "attribute"}, 3: {2: "attribute", 5: "attribute"},
    4: {}, 5: {3: "attribute"}, 6: {8: "attribute"}, 7: {}, 8: {6: "attribute"}, 9: {1: "order"}, 10: {},
}


def as_dict(partners):
    return {clip: {p.index: p.kind for p in ps} for clip, ps in enumerate(partners)}


def test_miner_finds_exactly_the_planted_partners():
    assert as_dict(mine_caption_partners(FIXTURE)) == EXPECTED


def test_miner_never_pairs_a_clip_with_itself_and_is_symmetric():
    partners = mine_caption_partners(FIXTURE + [["a dog runs left", "a dog runs right", "a dog left runs"]])
    for clip, ps in enumerate(partners):
        assert clip not in {p.index for p in ps}
        for p in ps:
            assert clip in {q.index for q in partners[p.index]}


def test_words_ignore_case_and_punctuation():
    assert words_of("A red circle, THEN a square.") == ("a", "red", "circle", "then", "a", "square")


def test_best_supported_partners_are_kept_first():
    # clip 0 vs 1: two caption pairs differ in one word; clip 0 vs 2..5: one pair each.
    clips = [["a red cube spins", "a red cube turns"], ["a blue cube spins", "a blue cube turns"]]
    clips += [[f"a red cube {verb}"] for verb in ("jumps", "falls", "rolls", "waits")]
    partners = mine_caption_partners(clips, max_partners=2)
    assert partners[0] == [Partner(1, "attribute"), Partner(2, "attribute")]
    assert all(len(p) <= 2 for p in partners)


def test_overfull_buckets_are_bounded():
    # 100 clips that all differ from each other in one slot: a naive miner pairs 4,950 clip pairs;
    # with max_bucket=8 each clip meets exactly 8 others (4 on each side of a seeded ring).
    clips = [[f"a man is cooking dish{i}"] for i in range(100)]
    partners = mine_caption_partners(clips, max_partners=50, max_bucket=8)
    assert [len(p) for p in partners] == [8] * 100
    assert partners == mine_caption_partners(clips, max_partners=50, max_bucket=8)  # deterministic


def test_bad_options_are_refused():
    with pytest.raises(ConfigError, match="max_partners"):
        mine_caption_partners(FIXTURE, max_partners=0)
    with pytest.raises(ConfigError, match="unknown mined hard-negative kind"):
        mine_caption_partners(FIXTURE, kinds=("colour",))
    with pytest.raises(ConfigError, match="none, groups, mined"):
        partners_for([], "nearest")


def test_preset_option_and_old_boolean_values():
    from vidseek.models.registry import TrainConfig, get_preset

    assert get_preset("synth-seqtransf-tiny").train.hard_negatives == "groups"
    assert get_preset("msrvtt9k-seqtransf-b32").train.hard_negatives == "none"
    assert get_preset("synth-seqtransf-tiny").with_overrides(hard_negatives="mined").train.hard_negatives == "mined"
    assert (TrainConfig(hard_negatives=True).hard_negatives, TrainConfig(hard_negatives=False).hard_negatives) == \
        ("groups", "none")  # presets saved in older checkpoints
    with pytest.raises(ConfigError, match="--hard-negatives"):
        get_preset("synth-seqtransf-tiny").with_overrides(hard_negatives="yes")


def _twin_clips(pairs: int):
    """`pairs` order-swapped twins with words unique to each pair (no partners across pairs)."""
    clips = []
    for i in range(pairs):
        a, b = f"thing{i}a", f"thing{i}b"
        clips += [[f"a {a} moves left, then a {b} moves up"], [f"a {b} moves up, then a {a} moves left"]]
    return clips


def test_sampler_puts_mined_partners_in_one_batch():
    partners = mine_caption_partners(_twin_clips(20))
    assert as_dict(partners) == {c: {c ^ 1: "order"} for c in range(40)}
    sampler = EpochBatches(list(range(40)), batch_size=8, seed=3, partners=partners)
    unpaired = EpochBatches(list(range(40)), batch_size=8, seed=3)
    together = {}
    for name, batches in (("mined", sampler), ("none", unpaired)):
        together[name] = 0
        for epoch in range(5):
            epoch_batches = batches.for_epoch(epoch)
            assert sorted(i for b in epoch_batches for i in b) == list(range(40))  # each clip once
            batch_of = {i: k for k, b in enumerate(epoch_batches) for i in b}
            together[name] += sum(batch_of[c] == batch_of[c ^ 1] for c in range(0, 40, 2))
    assert together["mined"] == 5 * 20
    assert together["none"] < 5 * 20 / 2  # random batches split most twins (sanity: the check can fail)


def test_sampler_skips_unusable_partners_and_clusters_groups():
    partners = group_partners(["g0", "g0", "g0", None, "g1", "g1"])
    assert as_dict(partners)[0] == {1: "group", 2: "group"} and partners[3] == []
    sampler = EpochBatches([0, 1, 3, 4, 5], batch_size=5, seed=0, partners=partners)  # clip 2 undecodable
    order = sampler.for_epoch(0)[0]
    assert sorted(order) == [0, 1, 3, 4, 5]
    assert abs(order.index(0) - order.index(1)) == 1 and abs(order.index(4) - order.index(5)) == 1


def test_mined_hard_negatives_train_on_a_generic_jsonl(tiny_synth, tmp_path, capsys):
    """The synthetic benchmark with its partner metadata (and video ids) stripped: only `video`,
    `captions` and `split`. Groups find nothing there; mining recovers order twins and trains."""
    from vidseek.data.jsonl import load_jsonl
    from vidseek.models.registry import get_preset
    from vidseek.train.loop import train

    rows = [json.loads(line) for line in (tiny_synth / "annotations.jsonl").read_text().splitlines() if line]
    stripped = tmp_path / "generic"
    stripped.mkdir()
    (stripped / "annotations.jsonl").write_text("".join(
        json.dumps({"video": str((tiny_synth / r["video"]).absolute()), "captions": r["captions"], "split": r["split"]}) + "\n"
        for r in rows))
    train_ds = load_jsonl(stripped, "train")
    assert partners_for(train_ds.records, "groups") == [[] for _ in train_ds.records]
    mined = partners_for(train_ds.records, "mined")
    truth = {(r["video"], link["video_id"]) for r in rows if r["split"] == "train"
             for link in r["meta"]["hard_negatives"] if link["kind"] == "order"}
    by_path = {r["video_id"]: str((tiny_synth / r["video"]).absolute()) for r in rows}
    true_pairs = {(str((tiny_synth / v).absolute()), by_path[p]) for v, p in truth}
    found = {(train_ds.records[c].video_id, train_ds.records[p.index].video_id)
             for c, ps in enumerate(mined) for p in ps if p.kind == "order"}
    assert true_pairs and true_pairs <= found  # every planted order twin of the train split is mined

    preset = get_preset("synth-clip-tiny").with_overrides(batch_size=8, max_steps=2, eval_every=2,
                                                          hard_negatives="mined")
    capsys.readouterr()
    result = train(preset, stripped, tmp_path / "run", progress=False)
    assert result.step == 2
    with_partner = sum(bool(p) for p in mined)
    assert f"hard negatives (mined): {with_partner} of {len(mined)} training clips have a partner" in capsys.readouterr().out

    # Evaluation on the stripped data mines its pairs: the order pairs are exactly the planted ones,
    # so the order-pair accuracy equals the one computed from the original metadata.
    from vidseek.eval.runner import evaluate_model
    from vidseek.train.checkpoint import load_model
    from vidseek.train.loop import load_split, video_source

    model, _ = load_model(tmp_path / "run")
    reports = {}
    for name, root in (("mined", stripped), ("metadata", tiny_synth)):
        test = load_split(preset, root, "test")
        out: dict = {}
        reports[name] = evaluate_model(model, test, video_source(preset, test, tmp_path / "run", None, model, False),
                                       preset.words, outcomes_out=out)
        assert out["hardneg_source"] == name
    assert reports["mined"]["hardneg.order.pairs"] == reports["metadata"]["hardneg.order.pairs"] > 0
    assert reports["mined"]["hardneg.order.acc"] == reports["metadata"]["hardneg.order.acc"]
