"""`extract`: tiny generated mp4 clips through the tiny random CLIP into a feature store.

Covers failures of single files, resuming after `kill -9` of a real extract process, windows
of long videos, and the three kinds of source (folder, dataset folder, .jsonl file).
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vidseek.encoders import build_clip
from vidseek.errors import ConfigError, DatasetError, VidseekError
from vidseek.store import FeatureStore
from vidseek.store.extract import extract, iter_sources

FRAMES = 4
GOOD_CLIPS = {"a": 10, "b": 6, "c": 3, "d": 12, "e": 8}  # video id -> frame count (c is shorter than FRAMES)


def write_clip(path: Path, frames: int, fps: int = 10, size: int = 32, seed: int = 0) -> Path:
    """A real H.264 clip whose frames are flat colours that change every frame."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for _ in range(frames):
            image = np.empty((size, size, 3), dtype=np.uint8)
            image[:] = rng.integers(0, 256, 3, dtype=np.uint8)
            image[: size // 2, : size // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    for seed, (video_id, frames) in enumerate(GOOD_CLIPS.items()):
        write_clip(folder / f"{video_id}.mp4", frames, seed=seed)
    return folder


def tiny_encoder():
    torch.manual_seed(0)  # the same random weights in every process
    return build_clip("tiny")


@pytest.fixture(scope="module")
def clean_store(clips, tmp_path_factory) -> FeatureStore:
    """One uninterrupted run: the reference the other runs must reproduce."""
    out = tmp_path_factory.mktemp("clean")
    summary = extract(clips, tiny_encoder(), out, frames=FRAMES, batch_size=2, workers=0, progress=False)
    assert (summary.processed, summary.skipped_existing, summary.failed) == (5, 0, 0)
    return FeatureStore(out)


def test_clean_run_stores_every_clip_with_masks(clean_store):
    assert sorted(clean_store.keys()) == sorted(GOOD_CLIPS)
    features, masks = clean_store.frame_features(["c", "a"])
    assert features.shape == (2, FRAMES, 64)
    # c has 3 frames: the 4th slot is padding, masked out and never encoded (zeros).
    np.testing.assert_array_equal(masks, [[True, True, True, False], [True, True, True, True]])
    assert not features[0, 3].any() and features[0, :3].any(axis=1).all()
    assert clean_store.catalog.get("c").num_frames == 3
    assert clean_store.catalog.get("a").duration == pytest.approx(1.0)


def test_features_equal_direct_encoder_output(clips, clean_store):
    """The stored row is the encoder's CLS feature of the sampled frames, fp16-rounded."""
    from vidseek.video import load_video_tensor

    encoder = tiny_encoder().eval()
    pixels, mask, _ = load_video_tensor(clips / "d.mp4", FRAMES, encoder.image_size)
    with torch.no_grad():
        expected = encoder.encode_image(pixels[mask]).cls.numpy()
    stored, _ = clean_store.frame_features(["d"])
    np.testing.assert_allclose(stored[0], expected, atol=2e-3, rtol=2e-3)


def test_corrupt_file_is_recorded_and_the_rest_extracted(clips, clean_store, tmp_path):
    folder = tmp_path / "videos"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.mp4").symlink_to(clips / f"{name}.mp4")
    (folder / "broken.mp4").write_bytes(b"this is not a video" * 50)
    out = tmp_path / "store"
    summary = extract(folder, tiny_encoder(), out, frames=FRAMES, batch_size=2, workers=2, progress=False)
    assert (summary.processed, summary.failed, summary.skipped_existing) == (3, 1, 0)
    assert summary.failures[0][0] == "broken"
    assert "broken.mp4" in summary.failures[0][1]
    store = FeatureStore(out)
    assert store.catalog.counts() == {"ok": 3, "failed": 1}
    assert "broken.mp4" in store.catalog.get("broken").error
    got, _ = store.frame_features(["a", "b", "c"])
    want, _ = clean_store.frame_features(["a", "b", "c"])
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)
    store.close()
    # A rerun retries only the failed file; fixing it makes it succeed.
    write_clip(folder / "broken.mp4", 5, seed=9)
    summary = extract(folder, tiny_encoder(), out, frames=FRAMES, workers=0, progress=False)
    assert (summary.processed, summary.failed, summary.skipped_existing) == (1, 0, 3)
    assert FeatureStore(out).catalog.counts() == {"ok": 4, "failed": 0}


def test_all_files_broken_raises_one_line_error(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "x.mp4").write_bytes(b"junk")
    with pytest.raises(VidseekError, match=r"none of the 1 videos .*/v/x\.mp4") as info:
        extract(tmp_path / "v", tiny_encoder(), tmp_path / "out", frames=FRAMES, workers=0, progress=False)
    assert "\n" not in str(info.value)


# A deterministic stand-in image tower that needs no open_clip import, so the subprocess that
# gets killed starts fast; the same source is exec'd here for the reference run.
_PIXEL_ENCODER = textwrap.dedent("""
    import time
    from types import SimpleNamespace
    import torch

    class PixelEncoder(torch.nn.Module):
        # A fixed random projection of 4x4-pooled pixels; `delay` slows it down for the kill test.
        name, embed_dim, image_size, grid = "pixel-projection", 16, 32, 2

        def __init__(self, delay=0.0):
            super().__init__()
            self.delay = delay
            generator = torch.Generator().manual_seed(0)
            self.register_buffer("projection", torch.randn(3 * 4 * 4, 16, generator=generator))

        def encode_image(self, images, patches=False):
            time.sleep(self.delay)
            pooled = torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)
            return SimpleNamespace(cls=pooled @ self.projection, patches=None, attention=None)
""")

_KILLABLE_RUN = _PIXEL_ENCODER + textwrap.dedent("""
    import sys
    from vidseek.store.extract import extract

    torch.set_num_threads(1)
    extract(sys.argv[1], PixelEncoder(delay=0.5), sys.argv[2], frames=int(sys.argv[3]), batch_size=1, workers=1,
            progress=False)
""")


def pixel_encoder():
    namespace: dict = {}
    exec(_PIXEL_ENCODER, namespace)
    return namespace["PixelEncoder"]()


def ok_count(catalog: Path) -> int:
    if not catalog.exists():
        return 0
    db = sqlite3.connect(catalog, timeout=5)
    try:
        return db.execute("SELECT COUNT(*) FROM items WHERE status = 'ok'").fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        db.close()


def test_resume_after_kill_9_loses_and_duplicates_nothing(clips, tmp_path):
    out = tmp_path / "store"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-c", _KILLABLE_RUN, str(clips), str(out), str(FRAMES)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while ok_count(out / "catalog.sqlite") < 2:
        assert process.poll() is None, process.stdout.read().decode()
        assert time.monotonic() < deadline, "the extract subprocess never committed 2 rows"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    committed = ok_count(out / "catalog.sqlite")
    assert 2 <= committed < len(GOOD_CLIPS)

    summary = extract(clips, pixel_encoder(), out, frames=FRAMES, batch_size=2, workers=0, progress=False)
    assert summary.skipped_existing == committed
    assert summary.processed == len(GOOD_CLIPS) - committed
    store = FeatureStore(out)
    rows = store.rows()
    assert sorted(r.key for r in rows) == sorted(GOOD_CLIPS)
    assert len({r.location for r in rows}) == len(rows)  # no two keys share a feature row
    keys = sorted(GOOD_CLIPS)
    got, got_masks = store.frame_features(keys)
    extract(clips, pixel_encoder(), tmp_path / "clean", frames=FRAMES, workers=0, progress=False)
    want, want_masks = FeatureStore(tmp_path / "clean").frame_features(keys)
    np.testing.assert_array_equal(got_masks, want_masks)
    np.testing.assert_allclose(got, want, atol=2e-3, rtol=2e-3)


def test_reopening_with_different_frames_is_a_config_error(clips, tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / "c.mp4").symlink_to(clips / "c.mp4")
    extract(folder, tiny_encoder(), tmp_path / "out", frames=FRAMES, workers=0, progress=False)
    with pytest.raises(ConfigError, match=r"frames=4, not 6; use another --out"):
        extract(folder, tiny_encoder(), tmp_path / "out", frames=6, workers=0, progress=False)


def test_long_video_windows_get_their_own_keys(tmp_path):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "long.mp4").write_bytes(b"not yet a video")
    out = tmp_path / "out"
    windows = dict(segment_seconds=2.0, overlap_seconds=0.5, workers=0, progress=False, patches=True)
    with pytest.raises(VidseekError, match="long.mp4"):
        extract(tmp_path / "v", tiny_encoder(), out, frames=FRAMES, **windows)
    assert FeatureStore(out).catalog.keys(status="failed") == ["long"]  # unprobeable: one whole-video row

    write_clip(tmp_path / "v" / "long.mp4", 50)  # 5.0 s at 10 fps
    summary = extract(tmp_path / "v", tiny_encoder(), out, frames=FRAMES, **windows)
    assert (summary.processed, summary.failed) == (3, 0)
    store = FeatureStore(out)
    # stride 2.0 - 0.5 = 1.5 s; the last window is cut at the 5.0 s end.
    assert [(r.key, r.video_id, r.start, r.end) for r in store.rows()] == [
        ("long#0", "long", 0.0, 2.0), ("long#1", "long", 1.5, 3.5), ("long#2", "long", 3.0, 5.0)]
    assert store.catalog.counts() == {"ok": 3, "failed": 0}  # the old whole-video failure is gone
    assert store.patch_features(["long#1"]).shape == (1, FRAMES, 36, 64)
    from vidseek.video import load_video_tensor

    encoder = tiny_encoder().eval()
    pixels, _, _ = load_video_tensor(tmp_path / "v" / "long.mp4", FRAMES, encoder.image_size, start=1.5, end=3.5)
    with torch.no_grad():
        expected = encoder.encode_image(pixels).cls.numpy()
    np.testing.assert_allclose(store.frame_features(["long#1"])[0][0], expected, atol=2e-3, rtol=2e-3)
    store.close()
    again = extract(tmp_path / "v", tiny_encoder(), out, frames=FRAMES, **windows)
    assert (again.processed, again.skipped_existing) == (0, 3)


def test_folder_source_ids_are_relative_paths_without_extension(tmp_path):
    for relative in ("top.mp4", "sub/dir/clip.MOV", "sub/x.webm", "sub/notes.txt", "a.M4V"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"")
    sources = iter_sources(tmp_path)
    assert [(s.video_id, s.path) for s in sources] == [
        ("a", tmp_path / "a.M4V"), ("top", tmp_path / "top.mp4"),
        ("sub/x", tmp_path / "sub/x.webm"), ("sub/dir/clip", tmp_path / "sub/dir/clip.MOV")]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no videos found"):
        iter_sources(tmp_path / "empty")


def test_jsonl_and_dataset_folder_sources(tmp_path):
    lines = [
        {"video_id": "v1", "video": "clips/v1.mp4", "captions": ["x"], "split": "train"},
        {"video_id": "v2", "video": "clips/v2.mp4", "captions": ["y"], "split": "test", "start": 1.0, "end": 2.5},
    ]
    (tmp_path / "annotations.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    every_split = iter_sources(tmp_path)
    assert [(s.video_id, s.path, s.start, s.end) for s in every_split] == [
        ("v1", tmp_path / "clips/v1.mp4", None, None), ("v2", tmp_path / "clips/v2.mp4", 1.0, 2.5)]
    assert [s.video_id for s in iter_sources(tmp_path / "annotations.jsonl", split="test")] == ["v2"]
