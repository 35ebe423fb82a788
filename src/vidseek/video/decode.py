"""Video decoding with PyAV: probe a file, then decode only the sampled frames.

Retrieval models see T = 12 frames of a clip (CLIP4Clip section 4.1), so decoding every frame
wastes most of the work. `read_frames` therefore

1. maps the requested segment and sampling strategy (`vidseek.video.sampling`) to frame indices;
2. seeks to a keyframe only when the container's index shows one between the last decoded frame
   and the next wanted frame (so seeking never decodes more than reading on would);
3. converts to RGB only the wanted frames and stops right after the last one.

Frame numbers come from presentation timestamps (``round((pts - start) * time_base * fps)``),
so they stay exact after a seek. A file whose frame count metadata is missing is counted by
decoding its final group of pictures; one whose metadata is wrong is noticed when decoding ends
early, and the sampling is redone over the frames that really exist. A file that cannot be
decoded raises `VideoDecodeError`; it is never replaced by black frames.
"""
from __future__ import annotations

import bisect
import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from vidseek.errors import ConfigError, VideoDecodeError
from vidseek.video.sampling import fps_indices, jitter_indices, uniform_indices

SAMPLING_STRATEGIES = ("uniform", "fps", "jitter")

# Metadata may overstate the frame count by a few frames (edit lists that drop B-frame lead-in,
# encoders that count a final dropped frame). A larger shortfall means the file was cut short.
_METADATA_SLACK_FRAMES = 2
_METADATA_SLACK_FRACTION = 0.05
_TIME_EPS = 1e-9


@dataclass(frozen=True)
class VideoInfo:
    """What `probe` learns about a video's first video stream (``total_frames`` is exact)."""

    path: str
    duration: float
    fps: float
    total_frames: int
    width: int
    height: int


@dataclass
class Clip:
    """Sampled frames of one video (or of one segment of it)."""

    frames: np.ndarray  # uint8 [n, H, W, 3] RGB
    indices: list[int]  # frame numbers counted from the start of the video
    timestamps: list[float]  # presentation time of each returned frame, seconds from the start
    info: VideoInfo


@dataclass(frozen=True)
class _Timing:
    """Exact (rational) conversion between frame numbers and a stream's timestamps."""

    rate: Fraction  # frames per second
    time_base: Fraction  # seconds per pts tick
    start_pts: int

    def index_of(self, pts: int) -> int:
        return int(round((pts - self.start_pts) * self.time_base * self.rate))

    def pts_of(self, index: int) -> int:
        return self.start_pts + math.floor(Fraction(index) / self.rate / self.time_base)

    def seconds_of(self, pts: int) -> float:
        return float((pts - self.start_pts) * self.time_base)


class _EndOfStream(Exception):
    """Decoding ended before a wanted frame: the stream holds only `frame_count` frames."""

    def __init__(self, frame_count: int):
        super().__init__(frame_count)
        self.frame_count = frame_count


def _one_line(err: BaseException) -> str:
    # FFmpeg errors carry a readable strerror; str() adds the errno and the file name again.
    text = getattr(err, "strerror", None) or str(err)
    return " ".join(str(text).split()) or type(err).__name__


@contextmanager
def _open_video(path: str | Path, threads: int) -> Iterator[tuple[av.container.InputContainer, av.video.stream.VideoStream, _Timing]]:
    """Open `path`, pick its first video stream, and turn every PyAV failure into VideoDecodeError."""
    path = Path(path)
    if not path.exists():
        raise VideoDecodeError(path, "file not found; check the path")
    if not path.is_file():
        raise VideoDecodeError(path, "not a regular file; pass a video file")
    if path.stat().st_size == 0:
        raise VideoDecodeError(path, "file is empty (0 bytes); re-download or re-encode it")
    try:
        container = av.open(str(path), mode="r")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise VideoDecodeError(path, f"not a readable video file ({_one_line(err)})") from err
    try:
        if not container.streams.video:
            raise VideoDecodeError(path, "file has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or rate <= 0 or stream.time_base is None:
            raise VideoDecodeError(path, "video stream has no frame rate or time base")
        # Bounded decoder threads: thread_count 0 ("AUTO") spawns one thread per core in every
        # loader worker and is a known source of PyAV deadlocks there.
        stream.codec_context.thread_count = threads
        stream.codec_context.thread_type = "FRAME" if threads > 1 else "SLICE"
        start_pts = stream.start_time if stream.start_time is not None else 0
        yield container, stream, _Timing(Fraction(rate), Fraction(stream.time_base), start_pts)
    except (av.error.FFmpegError, OSError) as err:
        raise VideoDecodeError(path, f"corrupt or truncated video data ({_one_line(err)})") from err
    finally:
        container.close()


def _iter_decoded_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Iterator[av.VideoFrame]:
    """Every decoded frame from the container's current position (the one place frames are decoded)."""
    yield from container.decode(stream)


def _frame_indices(frames: Iterator[av.VideoFrame], timing: _Timing, first_index: int) -> Iterator[tuple[av.VideoFrame, int]]:
    """Pair each frame with its frame number; streams without timestamps are counted instead."""
    index = first_index - 1
    for frame in frames:
        index = timing.index_of(frame.pts) if frame.pts is not None else index + 1
        yield frame, index


def _count_frames_from_tail(container, stream, timing: _Timing, duration: float | None) -> int:
    """Exact frame count when the container does not store one: decode only the last GOP.

    Seek to the keyframe before the end and read to end of stream; the last frame's number + 1
    is the count. Falls back to counting every frame when the stream cannot seek.
    """
    last_index = -1
    if duration is not None and duration > 0:
        end_pts = timing.start_pts + math.floor(Fraction(duration) / timing.time_base)
        container.seek(end_pts, stream=stream, backward=True, any_frame=False)
        for _, index in _frame_indices(_iter_decoded_frames(container, stream), timing, 0):
            last_index = max(last_index, index)
    if last_index < 0:  # no duration, or the seek found nothing: a counted pass from the start
        container.seek(timing.start_pts, stream=stream, backward=True, any_frame=False)
        for _, index in _frame_indices(_iter_decoded_frames(container, stream), timing, 0):
            last_index = max(last_index, index)
    container.seek(timing.start_pts, stream=stream, backward=True, any_frame=False)
    return last_index + 1


def _check_index_within_file(path: str | Path, stream) -> None:
    """A file cut short keeps an index (mp4 `moov` at the front) that points past its end.

    Only the last entries are looked at: they hold the largest offsets, and a long video has
    hundreds of thousands of entries.
    """
    entries = stream.index_entries
    file_size = Path(path).stat().st_size
    for position in range(max(0, len(entries) - 16), len(entries)):
        entry = entries[position]
        if entry.pos >= 0 and entry.pos + entry.size > file_size:
            raise VideoDecodeError(
                path,
                f"truncated: the container index points past the end of the file ({file_size} bytes); "
                "re-download or re-encode it",
            )


def _info_from_stream(path: str | Path, container, stream, timing: _Timing) -> VideoInfo:
    _check_index_within_file(path, stream)
    if stream.duration is not None and stream.duration > 0:
        duration: float | None = float(stream.duration * timing.time_base)
    elif container.duration is not None and container.duration > 0:
        duration = container.duration / av.time_base
    else:
        duration = None
    total_frames = stream.frames if stream.frames and stream.frames > 0 else 0
    if total_frames == 0:
        total_frames = _count_frames_from_tail(container, stream, timing, duration)
    if total_frames <= 0:
        raise VideoDecodeError(path, "no decodable video frames")
    if duration is None:
        duration = float(total_frames / timing.rate)
    width, height = stream.codec_context.width, stream.codec_context.height
    if not width or not height:
        raise VideoDecodeError(path, "video stream has no frame size")
    return VideoInfo(str(path), duration, float(timing.rate), total_frames, width, height)


def probe(path: str | Path) -> VideoInfo:
    """Duration, frame rate, exact frame count and size of a video's first video stream."""
    with _open_video(path, threads=1) as (container, stream, timing):
        return _info_from_stream(path, container, stream, timing)


def _keyframe_times(stream, timing: _Timing) -> list[int]:
    """Estimated presentation timestamps of the keyframes, from the container index.

    The index (mp4 sample table, Matroska cues) stores decode timestamps; with B-frames these run
    a constant reorder delay ahead of presentation times, which the first entry (the first
    frame, presented at the stream start) reveals. Empty when the container has no index.
    """
    entries = list(stream.index_entries)
    keyframes = sorted(entry.timestamp for entry in entries if entry.is_keyframe)
    if not keyframes:
        return []
    delay = timing.start_pts - min(entry.timestamp for entry in entries)
    return [timestamp + delay for timestamp in keyframes]


def _decode_wanted(container, stream, timing: _Timing, wanted: list[int], width: int, height: int) -> tuple[np.ndarray, list[float]]:
    """Decode exactly the frames numbered `wanted` (sorted, distinct) and stop after the last one.

    For each wanted frame we take the frame on screen at its time: the decoded frame with that
    number, or the last one before it when a variable-rate stream skips the number.
    Raises `_EndOfStream` when the stream ends before the last wanted frame.
    """
    keyframes = _keyframe_times(stream, timing)
    frames = np.empty((len(wanted), height, width, 3), dtype=np.uint8)
    timestamps: list[float] = []
    pending = 0  # position in `wanted` of the next frame to find
    last_index = -1  # frame number of the last decoded frame
    seek_target = _first_seek_target(keyframes, timing, wanted[0])
    backoff_steps = 0
    while pending < len(wanted):
        # A seek (to the wanted frame's time; the demuxer lands on the keyframe at or before it)
        # must move forward and must not pass the wanted frame; both are checked on landing.
        if seek_target is not None:
            container.seek(seek_target, stream=stream, backward=True, any_frame=False)
        landed_check, seek_target = seek_target is not None and seek_target > timing.start_pts, None
        previous: tuple[av.VideoFrame, int] | None = None
        for frame, index in _frame_indices(_iter_decoded_frames(container, stream), timing, last_index + 1):
            if landed_check and previous is None:
                if index > wanted[pending]:  # landed too late (imprecise index): retry earlier
                    backoff_steps += 1
                    seek_target = _earlier_seek_target(timing, frame.pts, backoff_steps)
                    break
                if index <= last_index:  # landed behind us: the index misled; read on from here
                    keyframes = []
            while pending < len(wanted) and wanted[pending] <= index:
                shown = frame if wanted[pending] == index or previous is None else previous[0]
                frames[pending] = shown.to_ndarray(format="rgb24", width=width, height=height)
                shown_seconds = timing.seconds_of(shown.pts) if shown.pts is not None else float(wanted[pending] / timing.rate)
                timestamps.append(shown_seconds)
                pending += 1
            previous = (frame, index)
            last_index = max(last_index, index)
            if pending == len(wanted):
                break
            seek_target = _worthwhile_seek_target(keyframes, timing, frame.pts, wanted[pending])
            if seek_target is not None:
                break
        else:
            if pending < len(wanted):
                raise _EndOfStream(last_index + 1)
    return frames, timestamps


def _first_seek_target(keyframes: list[int], timing: _Timing, first_wanted: int) -> int | None:
    """Where to seek before decoding anything; None when the wanted frame is in the first GOP."""
    if first_wanted <= 0:
        return None
    target = timing.pts_of(first_wanted)
    if keyframes and bisect.bisect_right(keyframes, target) <= 1:
        return None
    return target  # without an index, let the demuxer find the keyframe before the time


def _worthwhile_seek_target(keyframes: list[int], timing: _Timing, current_pts: int | None, next_wanted: int) -> int | None:
    """The wanted frame's time, when a keyframe lies after the current frame and not after it.

    Then seeking decodes strictly fewer frames than reading on. Without a container index we
    cannot know, so we read on.
    """
    if not keyframes or current_pts is None:
        return None
    target = timing.pts_of(next_wanted)
    position = bisect.bisect_right(keyframes, target) - 1
    return target if position >= 0 and keyframes[position] > current_pts else None


def _earlier_seek_target(timing: _Timing, landed_pts: int, attempt: int) -> int:
    """Retry target after landing past the wanted frame: 1 s, 2 s, 4 s, ... before where we landed."""
    step = math.ceil(Fraction(2 ** (attempt - 1)) / timing.time_base)
    return max(landed_pts - step, timing.start_pts)


def _segment_frame_range(info: VideoInfo, start: float | None, end: float | None) -> tuple[int, int]:
    """First and last frame numbers on screen during [start, end) seconds.

    Frame i is on screen during [i / fps, (i + 1) / fps), so any window inside the video holds at
    least one frame, however short (the last window of `segment_windows` can be).
    """
    start_s = 0.0 if start is None else float(start)
    end_s = math.inf if end is None else float(end)
    if start_s < 0 or end_s <= start_s:
        raise ConfigError(f"invalid segment start={start} end={end} for {info.path}: need 0 <= start < end")
    first = max(0, math.floor(start_s * info.fps + _TIME_EPS))
    last = info.total_frames - 1 if math.isinf(end_s) else min(info.total_frames - 1, math.ceil(end_s * info.fps - _TIME_EPS) - 1)
    if first > last:
        raise ConfigError(
            f"segment [{start_s:g}, {end_s:g}) s of {info.path} holds no frames (the video is "
            f"{info.duration:.3f} s long); pass a segment inside the video"
        )
    return first, last


def _sample_offsets(
    frame_count: int, num_frames: int, sampling: str, fps: float, target_fps: float | None, rng: np.random.Generator | None
) -> list[int]:
    if sampling == "uniform":
        return uniform_indices(frame_count, num_frames)
    if sampling == "fps":
        assert target_fps is not None  # checked by read_frames
        return fps_indices(frame_count, fps, target_fps, max_frames=num_frames)
    assert rng is not None  # checked by read_frames
    return jitter_indices(frame_count, num_frames, rng)


def read_frames(
    path: str | Path,
    num_frames: int = 12,
    sampling: str = "uniform",
    target_fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    rng: np.random.Generator | None = None,
    threads: int = 1,
) -> Clip:
    """Decode `num_frames` sampled frames (fewer for a shorter clip) of `path` or of [start, end) s.

    sampling: "uniform" (evaluation, CLIP4Clip section 4.1), "fps" (one frame every
    1 / target_fps s, at most num_frames) or "jitter" (TSN segment sampling for training; needs
    `rng`). `threads` bounds the decoder's threads. Raises `VideoDecodeError` for any file that
    cannot be decoded and `ConfigError` for bad options.
    """
    if sampling not in SAMPLING_STRATEGIES:
        raise ConfigError(f"unknown frame sampling {sampling!r}; choose one of {', '.join(SAMPLING_STRATEGIES)}")
    if sampling == "fps" and (target_fps is None or target_fps <= 0):
        raise ConfigError("fps sampling needs a positive target_fps, e.g. target_fps=1")
    if sampling == "jitter" and rng is None:
        raise ValueError("jitter sampling needs rng=np.random.default_rng(seed)")
    if num_frames <= 0:
        raise ConfigError(f"num_frames must be positive, got {num_frames}")
    if threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    with _open_video(path, threads) as (container, stream, timing):
        info = _info_from_stream(path, container, stream, timing)
        declared_frames = info.total_frames
        while True:
            first, last = _segment_frame_range(info, start, end)
            offsets = _sample_offsets(last - first + 1, num_frames, sampling, info.fps, target_fps, rng)
            wanted = [first + offset for offset in offsets]
            try:
                frames, timestamps = _decode_wanted(container, stream, timing, wanted, info.width, info.height)
            except _EndOfStream as short:
                _check_plausible_shortfall(path, declared_frames, short.frame_count, info.total_frames)
                info = replace(info, total_frames=short.frame_count)
                container.seek(timing.start_pts, stream=stream, backward=True, any_frame=False)  # leave end-of-stream
                continue
            return Clip(frames=frames, indices=wanted, timestamps=timestamps, info=info)


def _check_plausible_shortfall(path: str | Path, declared: int, decoded: int, previous_count: int) -> None:
    """Accept a stream a few frames shorter than its metadata says; reject a truncated one."""
    if decoded <= 0:
        raise VideoDecodeError(path, "no decodable video frames")
    slack = max(_METADATA_SLACK_FRAMES, int(declared * _METADATA_SLACK_FRACTION))
    if decoded >= previous_count or declared - decoded > slack:
        raise VideoDecodeError(
            path,
            f"truncated or corrupt: the container declares {declared} frames but decoding stops after "
            f"{decoded}; re-download or re-encode the file",
        )
