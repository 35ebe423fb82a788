"""The synthetic benchmark generator: determinism, hard negatives, file layouts, resume, rendering."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import av
import numpy as np
import pytest

from vidseek.data.synth import (
    CAPTIONS_PER_VIDEO,
    COLOURS,
    SynthConfig,
    build_annotations,
    generate,
    object_states,
    order_swapped,
    render_clip,
)
from vidseek.errors import ConfigError

SMALL = SynthConfig(num_videos=24, seed=3, frames=8, size=32)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object, list[dict]]:
    out = tmp_path_factory.mktemp("synth_a")
    summary = generate(out, SMALL, progress=False)
    return out, summary, read_jsonl(out / "annotations.jsonl")


def test_same_seed_gives_identical_annotations_and_decoded_frames(dataset, tmp_path):
    out_a, _, records = dataset
    summary_b = generate(tmp_path, SMALL, progress=False)
    assert summary_b.written == 24 and summary_b.reused == 0
    assert (tmp_path / "annotations.jsonl").read_bytes() == (out_a / "annotations.jsonl").read_bytes()
    assert (tmp_path / "MSRVTT_data.json").read_bytes() == (out_a / "MSRVTT_data.json").read_bytes()
    video = records[0]["video"]
    np.testing.assert_array_equal(decode(out_a / video), decode(tmp_path / video))


def test_different_seed_gives_a_different_dataset():
    a = build_annotations(SMALL)
    b = build_annotations(SynthConfig(num_videos=24, seed=4, frames=8, size=32))
    assert [r["video_id"] for r in a] == [r["video_id"] for r in b]
    assert [r["captions"] for r in a] != [r["captions"] for r in b]
    assert sum(ra["meta"]["objects"] != rb["meta"]["objects"] for ra, rb in zip(a, b)) > 12


def test_ids_paths_and_distinct_paraphrases(dataset):
    out, _, records = dataset
    assert [r["video_id"] for r in records] == [f"synth{i:05d}" for i in range(24)]
    for record in records:
        assert record["video"] == f"videos/all/{record['video_id']}.mp4"
        assert (out / record["video"]).stat().st_size > 0
        captions = record["captions"]
        assert len(captions) == CAPTIONS_PER_VIDEO == len(set(captions)) >= 5
        # Every paraphrase names every object's colour (purple may be said "violet").
        for caption in captions:
            for obj in record["meta"]["objects"]:
                colour = obj["colour"]
                assert colour in caption or (colour == "purple" and "violet" in caption), caption


def test_splits_add_up_and_hold_both_hard_negative_kinds(dataset):
    _, summary, records = dataset
    counts = {split: sum(r["split"] == split for r in records) for split in ("train", "val", "test")}
    assert summary.counts == counts
    assert sum(counts.values()) == 24
    # 24 clips: 4 order pairs, 4 attribute pairs, 8 single clips (a third each).
    assert summary.hard_negative_pairs == 8 and summary.kinds == {"attribute": 4, "order": 4}
    for split in ("train", "test"):
        kinds = {link["kind"] for r in records if r["split"] == split for link in r["meta"]["hard_negatives"]}
        assert kinds == {"order", "attribute"}, split


def test_group_proportions_at_sixty_clips():
    records = build_annotations(SynthConfig(num_videos=60, seed=1))
    linked = {kind: sum(any(l["kind"] == kind for l in r["meta"]["hard_negatives"]) for r in records)
              for kind in ("order", "attribute")}
    assert linked == {"order": 20, "attribute": 20}
    assert sum(not r["meta"]["hard_negatives"] for r in records) == 20
    assert {r["split"]: 0 for r in records}.keys() == {"train", "val", "test"}


def _flat_attributes(meta: dict) -> dict[tuple, str]:
    """Every attribute a caption states, keyed by where it lives."""
    flat = {}
    for i, obj in enumerate(meta["objects"]):
        for attribute in ("shape", "colour", "size"):
            flat[("object", i, attribute)] = obj[attribute]
    for j, event in enumerate(meta["events"]):
        flat[("event", j, "object")] = event["object"]
        flat[("event", j, "step")] = event["step"]
        flat[("event", j, "motion")] = event["motion"]
    return flat


def path_centres(meta: dict) -> np.ndarray:
    states = object_states(meta, np.linspace(0.0, 1.0, 33))
    return np.stack([(states[a].min(1) + states[a].max(1)) / 2 for a in ("x", "y")], 1)


def test_hard_negative_partners_are_exact(dataset):
    _, _, records = dataset
    by_id = {r["video_id"]: r for r in records}
    seen_kinds = set()
    for record in records:
        meta = record["meta"]
        for link in meta["hard_negatives"]:
            partner = by_id[link["video_id"]]
            assert partner["split"] == record["split"]
            assert partner["meta"]["group"] == meta["group"]
            assert {"video_id": record["video_id"], **{k: v for k, v in link.items() if k != "video_id"}} \
                in partner["meta"]["hard_negatives"]
            assert not set(record["captions"]) & set(partner["captions"])
            seen_kinds.add(link["kind"])
            if link["kind"] == "order":
                # Same objects; start positions may differ (each order's path is centred on the
                # same anchor), but positions are not something a caption states.
                assert _flat_attributes({**partner["meta"], "events": []}) == _flat_attributes({**meta, "events": []})
                mine = [(e["object"], e["motion"]) for e in meta["events"]]
                theirs = [(e["object"], e["motion"]) for e in partner["meta"]["events"]]
                assert len(mine) == 2 and mine != theirs and theirs == mine[::-1]
                assert [e["step"] for e in partner["meta"]["events"]] == [0, 1]
            else:
                a, b = _flat_attributes(meta), _flat_attributes(partner["meta"])
                assert a.keys() == b.keys()
                differing = [key for key in a if a[key] != b[key]]
                assert len(differing) == 1, differing
                assert differing[0][2] == link["attribute"] in ("colour", "shape", "motion")
            # Partners share each object's anchor (the centre of its path), so a "moves left" clip
            # and its "moves right" partner cover the same stretch of the frame.
            np.testing.assert_allclose(path_centres(meta), path_centres(partner["meta"]), atol=2e-4)
    assert seen_kinds == {"order", "attribute"}
    # Clips that share a group are exactly the linked partners.
    groups: dict[str, set[str]] = {}
    for record in records:
        groups.setdefault(record["meta"]["group"], set()).add(record["video_id"])
    for record in records:
        partners = {link["video_id"] for link in record["meta"]["hard_negatives"]}
        assert groups[record["meta"]["group"]] == partners | {record["video_id"]}


def test_msrvtt_layout_parses(dataset):
    out, _, records = dataset
    data = json.loads((out / "MSRVTT_data.json").read_text())
    assert len(data["videos"]) == 24
    first = data["videos"][0]
    assert set(first) == {"video_id", "split", "category", "url", "start time", "end time", "id"}
    assert first["end time"] == 1.0  # 8 frames at 8 fps
    split_names = {"train": "train", "val": "validate", "test": "test"}
    assert {v["video_id"]: v["split"] for v in data["videos"]} == \
        {r["video_id"]: split_names[r["split"]] for r in records}
    assert len(data["sentences"]) == 24 * CAPTIONS_PER_VIDEO
    assert [s["sen_id"] for s in data["sentences"]] == list(range(24 * CAPTIONS_PER_VIDEO))
    assert data["sentences"][0] == {"caption": records[0]["captions"][0], "video_id": "synth00000", "sen_id": 0}

    def rows(name: str) -> tuple[list[str], list[dict]]:
        with open(out / name, newline="") as fh:
            reader = csv.DictReader(fh)
            return list(reader.fieldnames or []), list(reader)

    header, nine_k = rows("MSRVTT_train.9k.csv")
    assert header == ["video_id"]
    assert {r["video_id"] for r in nine_k} == {r["video_id"] for r in records if r["split"] in ("train", "val")}
    header, seven_k = rows("MSRVTT_train.7k.csv")
    assert {r["video_id"] for r in seven_k} == {r["video_id"] for r in records if r["split"] == "train"}
    header, test = rows("MSRVTT_JSFUSION_test.csv")
    assert header == ["key", "vid_key", "video_id", "sentence"]
    test_records = [r for r in records if r["split"] == "test"]
    assert [row["video_id"] for row in test] == [r["video_id"] for r in test_records]
    assert [row["sentence"] for row in test] == [r["captions"][0] for r in test_records]
    assert json.loads((out / "synth_config.json").read_text())["num_videos"] == 24


def test_dataset_readers_load_both_layouts(dataset):
    from vidseek.data.jsonl import load_jsonl
    from vidseek.data.msrvtt import load_msrvtt

    out, summary, records = dataset
    for split, count in summary.counts.items():
        if count:
            jsonl = load_jsonl(out, split)
            assert [r.video_id for r in jsonl.records] == [r["video_id"] for r in records if r["split"] == split]
            assert not jsonl.missing_videos()
            assert jsonl.records[0].meta["group"].startswith("g")
    test = load_msrvtt(out, "test")  # the JSFusion-style 1k-A protocol: one query per test clip
    assert test.protocol == "single" and len(test) == summary.counts["test"]
    assert [text for text, _ in test.queries()] == [r["captions"][0] for r in records if r["split"] == "test"]
    assert not test.missing_videos()
    train_and_val = len(load_msrvtt(out, "train")) + len(load_msrvtt(out, "val"))
    assert train_and_val == summary.counts["train"] + summary.counts["val"]


def test_rerun_rewrites_only_the_missing_clip(tmp_path):
    config = SynthConfig(num_videos=6, seed=5, frames=4, size=32)
    generate(tmp_path, config, progress=False)
    victim = tmp_path / "videos/all/synth00002.mp4"
    before = decode(victim)
    victim.unlink()
    (tmp_path / "videos/all/.synth00004.mp4.abc.tmp").write_bytes(b"half")  # a killed run's leftovers
    (tmp_path / ".annotations.jsonl.abc.tmp").write_bytes(b"half")
    summary = generate(tmp_path, config, progress=False)
    assert (summary.written, summary.reused) == (1, 5)
    np.testing.assert_array_equal(decode(victim), before)
    assert not list((tmp_path / "videos/all").glob(".*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    # Another config invalidates every finished clip, and clips it does not have are removed.
    summary = generate(tmp_path, SynthConfig(num_videos=4, seed=5, frames=4, size=32), progress=False)
    assert (summary.written, summary.reused) == (4, 0)
    assert sorted(p.name for p in (tmp_path / "videos/all").glob("*.mp4")) == \
        [f"synth{i:05d}.mp4" for i in range(4)]


def test_mp4_decodes_to_the_rendered_frames(dataset):
    out, _, records = dataset
    for record in records[:3]:
        decoded = decode(out / record["video"])
        assert decoded.shape == (8, 32, 32, 3)
        rendered = render_clip(record["meta"], 8, 32)
        error = np.abs(decoded.astype(np.int16) - rendered.astype(np.int16))
        assert error.mean() < 8.0  # H.264 at crf 17 plus 4:2:0 chroma: small, edge-bound error
    with av.open(str(out / records[0]["video"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"


def one_object(motion: str, x: float = 0.5, y: float = 0.5, shape: str = "circle", size: str = "small") -> dict:
    return {
        "kind": "single",
        "background": {"colour": "black", "pattern": "plain", "seed": 0},
        "objects": [{"shape": shape, "colour": "red", "size": size, "x": x, "y": y}],
        "events": [{"object": 0, "motion": motion, "step": 0}],
    }


def object_pixels(frames: np.ndarray, colour: str = "red") -> np.ndarray:
    target = np.array(COLOURS[colour], dtype=np.int16)
    return np.all(np.abs(frames.astype(np.int16) - target) < 40, axis=-1)


def centroids(mask: np.ndarray) -> np.ndarray:
    """(frames, 2) mean pixel x, y of the mask, in pixel units."""
    ys, xs = np.mgrid[: mask.shape[1], : mask.shape[2]]
    return np.stack([(mask * xs).sum((1, 2)) / mask.sum((1, 2)), (mask * ys).sum((1, 2)) / mask.sum((1, 2))], 1)


@pytest.mark.parametrize("motion,start,shift", [
    ("left", (0.7, 0.5), (-0.40, 0.0)),
    ("right", (0.3, 0.5), (0.40, 0.0)),
    ("up", (0.5, 0.7), (0.0, -0.40)),
    ("down_right", (0.3, 0.3), (0.30, 0.30)),
])
def test_translation_moves_the_rendered_centroid(motion, start, shift):
    frames = render_clip(one_object(motion, *start), frames=8, size=64)
    centre = centroids(object_pixels(frames))
    # Centre of pixel (i) is at (i + 0.5) / 64, so the mean index is position * 64 - 0.5.
    expected = (np.array(start) + np.linspace(0, 1, 8)[:, None] * np.array(shift)) * 64 - 0.5
    np.testing.assert_allclose(centre, expected, atol=0.5)
    if motion == "left":
        assert np.all(np.diff(centre[:, 0]) < 0)


def test_scale_blink_and_sequence_timing_render_as_described():
    area = object_pixels(render_clip(one_object("grow"), frames=8, size=64)).sum((1, 2))
    assert np.all(np.diff(area) > 0) and area[-1] / area[0] == pytest.approx(1.7**2, rel=0.1)
    area = object_pixels(render_clip(one_object("shrink"), frames=8, size=64)).sum((1, 2))
    assert np.all(np.diff(area) < 0)
    area = object_pixels(render_clip(one_object("blink"), frames=8, size=64)).sum((1, 2))
    # On/off in quarters of the event; the last frame is the event's end, where it stays on.
    assert [bool(a) for a in area] == [True, True, False, False, True, True, False, True]
    # A sequence: the circle moves left in the first half, then grows in the second.
    meta = one_object("left", x=0.7)
    meta["kind"] = "sequence"
    meta["events"] = [{"object": 0, "motion": "left", "step": 0}, {"object": 0, "motion": "grow", "step": 1}]
    mask = object_pixels(render_clip(meta, frames=9, size=64))
    centre, area = centroids(mask), mask.sum((1, 2))
    # Rasterising a moving disc changes its pixel count by a few pixels only.
    assert np.all(np.diff(centre[:5, 0]) < 0) and np.ptp(area[:5]) <= 0.03 * area[0]
    assert np.ptp(centre[4:, 0]) < 0.5 and np.all(np.diff(area[4:]) > 0)
    swapped = order_swapped(meta)
    assert [e["motion"] for e in swapped["events"]] == ["grow", "left"]
    area = object_pixels(render_clip(swapped, frames=9, size=64)).sum((1, 2))
    assert np.all(np.diff(area[:5]) > 0) and np.ptp(area[4:]) <= 0.03 * area[4]


def test_invalid_config_is_a_one_line_error(tmp_path):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        generate(tmp_path / "taken", SynthConfig(num_videos=2, size=32, frames=2), progress=False)
    with pytest.raises(ConfigError, match="--size"):
        generate(tmp_path, SynthConfig(num_videos=4, size=33), progress=False)
    with pytest.raises(ConfigError, match="train split"):
        build_annotations(SynthConfig(val_fraction=0.5, test_fraction=0.5))
    with pytest.raises(ConfigError, match="--extra-train"):
        build_annotations(SynthConfig(num_videos=4, extra_train_videos=-1))


def test_extra_train_clips_leave_the_benchmark_unchanged():
    from vidseek.data.synth import config_hash, scene_key

    base = build_annotations(SynthConfig(num_videos=60, seed=5))
    grown = build_annotations(SynthConfig(num_videos=60, seed=5, extra_train_videos=36))
    assert len(grown) == 96
    by_id = {r["video_id"]: r for r in grown}
    assert all(by_id[r["video_id"]] == r for r in base)  # the same 60 clips, ids, captions, splits
    extra = [r for r in grown if r["video_id"] not in {b["video_id"] for b in base}]
    assert sorted(r["video_id"] for r in extra) == [f"synth{k:05d}" for k in range(60, 96)]
    assert {r["split"] for r in extra} == {"train"}
    # No extra clip repeats any clip's scene; partners link extra clips to extra clips only.
    keys = [scene_key(r["meta"]) for r in grown]
    assert len(set(keys)) == len(keys)
    extra_ids = {r["video_id"] for r in extra}
    links = [link for r in extra for link in r["meta"]["hard_negatives"]]
    assert links and all(link["video_id"] in extra_ids for link in links)
    assert {link["kind"] for link in links} == {"order", "attribute"}
    assert len({r["meta"]["group"] for r in grown}) == len({r["meta"]["group"] for r in base}) + len(
        {r["meta"]["group"] for r in extra})
    # Folders rendered before the option existed keep their manifest hash.
    assert config_hash(SynthConfig(num_videos=60, seed=5)) != config_hash(SynthConfig(num_videos=60, seed=5, extra_train_videos=36))
    assert config_hash(SynthConfig()) == "98e607953f5a515d"  # the hash before the option

