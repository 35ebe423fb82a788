"""Video decoding with PyAV: probe a file, then decode only the sampled frames.

Retrieval models see T = 12 frames of a clip (CLIP4Clip section 4.1), so decoding every frame
wastes most of the work. `read_frames` therefore

1. maps the requested segment and sampling strategy (`vidseek.video.sampling`) to frame indices;
2. seeks to a keyframe only when the container's index shows one between the last decoded frame
   and the next wanted frame (so seeking never decodes more than reading on would);
3. lets the decoder skip non-reference frames while the next wanted frame is far ahead;
4. converts to RGB only the wanted frames and stops right after the last one.

Measured on a 10 s 224x224 H.264 clip (one keyframe, x264 defaults), CPU time on this machine:
12 uniform frames 38 ms, decoding every frame to RGB 161 ms.

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
from functools import cached_property
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
# Frames far from the next wanted one are decoded only if other frames reference them. Skipping
# stops this many frames (plus one per decoder thread) before a wanted frame, more than the
# reorder delay of common encoders (x264's default is 2); should a deeper reorder still hide a
# wanted frame, the gap is noticed and that stretch is decoded again without skipping.
_SKIP_MARGIN_FRAMES = 8
# Containers that store no presentation times: with B-frames the decoder hands out frames with
# other frames' timestamps, so frames are counted from the start instead.
_FORMATS_WITHOUT_PRESENTATION_TIMES = frozenset({"avi"})


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

    @cached_property
    def _frames_per_tick(self) -> Fraction:
        return self.time_base * self.rate

    def index_of(self, pts: int) -> int:
        # Integer round-half-up of (pts - start) * time_base * rate: this runs once per decoded
        # frame, and Fraction arithmetic would cost more than the rest of the loop.
        ratio = self._frames_per_tick
        return (2 * (pts - self.start_pts) * ratio.numerator + ratio.denominator) // (2 * ratio.denominator)

    def pts_of(self, index: int) -> int:
        return self.start_pts + math.floor(Fraction(index) / self.rate / self.time_base)

    def seconds_of(self, pts: int) -> float:
        return float((pts - self.start_pts) * self.time_base)


def _stream_timing(stream) -> _Timing | None:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate or rate <= 0 or stream.time_base is None:
        return None
    start_pts = stream.start_time if stream.start_time is not None else 0
    return _Timing(Fraction(rate), Fraction(stream.time_base), start_pts)


class _NeedSequentialDecode(Exception):
    """Timestamps cannot be trusted (out of order, as H.264 with B-frames in AVI gives) or the
    demuxer cannot seek before a wanted frame: decode from the start and count frames instead."""


class _EndOfStream(Exception):
    """Decoding ended before a wanted frame: the stream holds `frame_count` frames, or, when
    `exact` is False (non-reference frames near the end were skipped), at least that many."""

    def __init__(self, frame_count: int, exact: bool):
        super().__init__(frame_count)
        self.frame_count = frame_count
        self.exact = exact


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
        timing = _stream_timing(stream)
        if timing is None:
            raise VideoDecodeError(path, "video stream has no frame rate or time base")
        # Bounded decoder threads: thread_count 0 ("AUTO") spawns one thread per core in every
        # loader worker and is a known source of PyAV deadlocks there.
        stream.codec_context.thread_count = threads
        stream.codec_context.thread_type = "FRAME" if threads > 1 else "SLICE"
        yield container, stream, timing
    except (av.error.FFmpegError, OSError) as err:
        raise VideoDecodeError(path, f"corrupt or truncated video data ({_one_line(err)})") from err
    finally:
        container.close()


def _iter_decoded_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> Iterator[av.VideoFrame]:
    """Every decoded frame from the container's current position (the one place frames are decoded)."""
    yield from container.decode(stream)


def _frame_indices(
    frames: Iterator[av.VideoFrame], timing: _Timing, first_index: int, use_timestamps: bool = True
) -> Iterator[tuple[av.VideoFrame, int]]:
    """Pair each frame with its frame number, from its timestamp or (use_timestamps=False) by
    counting. Missing timestamps, or timestamps that go backwards, raise `_NeedSequentialDecode`."""
    index = first_index - 1
    previous_pts = None
    for frame in frames:
        if use_timestamps:
            if frame.pts is None or (previous_pts is not None and frame.pts < previous_pts):
                raise _NeedSequentialDecode()
            previous_pts = frame.pts
            index = timing.index_of(frame.pts)
        else:
            index += 1
        yield frame, index


def _count_frames_from_tail(path: str | Path, duration: float | None) -> int:
    """Exact frame count when the container does not store one: decode only the last GOP.

    Seek to the keyframe before the end and read to end of stream; the last frame's number + 1
    is the count. When that is impossible (no duration, the seek finds nothing, no usable
    timestamps) every frame is decoded and counted. Uses its own containers so the caller's
    stays at the start (some demuxers, MPEG-TS, cannot seek back exactly).
    """
    if duration is not None and duration > 0:
        try:
            with av.open(str(path), mode="r") as container:
                stream = container.streams.video[0]
                stream.codec_context.thread_count = 1
                timing = _stream_timing(stream)
                end_pts = timing.start_pts + math.floor(Fraction(duration) / timing.time_base)
                container.seek(end_pts, stream=stream, backward=True, any_frame=False)
                last_index = max((index for _, index in _frame_indices(_iter_decoded_frames(container, stream), timing, 0)), default=-1)
            if last_index >= 0:
                return last_index + 1
        except (_NeedSequentialDecode, av.error.FFmpegError):
            pass  # fall through to counting
    with av.open(str(path), mode="r") as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        return sum(1 for _ in _iter_decoded_frames(container, stream))


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
        total_frames = _count_frames_from_tail(path, duration)
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


class _KeyframeIndex:
    """Keyframe lookups in the container index (mp4 sample table, Matroska cues).

    The index is sorted by time, so a lookup is a binary search plus a short backward scan to the
    keyframe: O(log n + GOP) instead of reading the hundreds of thousands of entries of a long
    video on every segment read. Index times are decode timestamps; with B-frames they run a
    constant reorder delay ahead of presentation times, which the first entry (the first frame,
    presented at the stream start) reveals.
    """

    _MAX_SCAN = 4096  # entries looked at backwards for a keyframe before giving up

    def __init__(self, stream, timing: _Timing):
        self._entries = stream.index_entries
        self.usable = len(self._entries) > 0
        self._delay = timing.start_pts - self._entries[0].timestamp if self.usable else 0

    def keyframe_at_or_before(self, pts: int) -> int | None:
        """Estimated presentation timestamp of the last keyframe at or before `pts` (None: unknown)."""
        if not self.usable:
            return None
        position = bisect.bisect_right(self._entries, pts - self._delay, key=lambda entry: entry.timestamp) - 1
        for candidate in range(position, max(position - self._MAX_SCAN, -1), -1):
            entry = self._entries[candidate]
            if entry.is_keyframe:
                return entry.timestamp + self._delay
        return None


def _decode_wanted(
    container, stream, timing: _Timing, wanted: list[int], width: int, height: int, allow_seek: bool = True
) -> tuple[np.ndarray, list[float]]:
    """Decode exactly the frames numbered `wanted` (sorted, distinct) and stop after the last one.

    For each wanted frame we take the frame on screen at its time: the decoded frame with that
    number, or the last one before it when a variable-rate stream skips the number.
    Raises `_EndOfStream` when the stream ends before the last wanted frame, and
    `_NeedSequentialDecode` when timestamps or seeking cannot be trusted (call again with
    allow_seek=False on a freshly opened container: no seeks, frames counted from the start).
    """
    keyframes = _KeyframeIndex(stream, timing)
    keyframes.usable = keyframes.usable and allow_seek
    frames = np.empty((len(wanted), height, width, 3), dtype=np.uint8)
    timestamps: list[float] = []
    pending = 0  # position in `wanted` of the next frame to find
    last_index = -1  # frame number of the last decoded frame
    seek_target = _first_seek_target(keyframes, timing, wanted[0]) if allow_seek else None
    backoff_steps = 0
    codec = stream.codec_context
    skip_margin = _SKIP_MARGIN_FRAMES + max(codec.thread_count, 1)
    skip_allowed = allow_seek  # counting frames (no timestamps) needs every frame
    while pending < len(wanted):
        codec.skip_frame = "DEFAULT"  # after a seek, the frame we land on is unknown
        skipped_in_run = False
        # A seek (to the wanted frame's time; the demuxer lands on the keyframe at or before it)
        # must move forward and must not pass the wanted frame; both are checked on landing.
        if seek_target is not None:
            try:
                container.seek(seek_target, stream=stream, backward=True, any_frame=False)
            except av.error.FFmpegError as err:  # e.g. AVI refuses targets before its start
                raise _NeedSequentialDecode() from err
        landed_check, failed_target, seek_target = seek_target is not None, seek_target, None
        previous: tuple[av.VideoFrame, int] | None = None
        decoded = _iter_decoded_frames(container, stream)
        for frame, index in _frame_indices(decoded, timing, last_index + 1, use_timestamps=allow_seek):
            if landed_check and previous is None:
                if index > wanted[pending]:  # landed too late (imprecise seeking): retry earlier
                    if failed_target < timing.start_pts:
                        raise _NeedSequentialDecode()
                    backoff_steps += 1
                    seek_target = _earlier_seek_target(timing, frame.pts, backoff_steps)
                    break
                if index <= last_index:  # landed behind us: the index misled; read on from here
                    keyframes.usable = False
            if skipped_in_run and previous is not None and index > wanted[pending] > previous[1]:
                # The wanted frame never came out: it was a skipped non-reference frame. Decode
                # this stretch again without skipping.
                skip_allowed = False
                seek_target = timing.pts_of(wanted[pending])
                break
            resolved = pending
            while pending < len(wanted) and wanted[pending] <= index:
                shown = frame if wanted[pending] == index or previous is None else previous[0]
                frames[pending] = shown.to_ndarray(format="rgb24", width=width, height=height)
                shown_seconds = (
                    timing.seconds_of(shown.pts) if allow_seek and shown.pts is not None else float(wanted[pending] / timing.rate)
                )
                timestamps.append(shown_seconds)
                pending += 1
            previous = (frame, index)
            last_index = max(last_index, index)
            if pending == len(wanted):
                break
            # Skip non-reference frames while far from the next wanted one: nothing depends on them.
            far = skip_allowed and wanted[pending] - index > skip_margin
            codec.skip_frame = "NONREF" if far else "DEFAULT"
            skipped_in_run = skipped_in_run or far
            if pending > resolved:  # just passed a wanted frame: jump ahead if a keyframe allows
                seek_target = _worthwhile_seek_target(keyframes, timing, frame.pts, wanted[pending])
                if seek_target is not None:
                    break
        else:
            if pending < len(wanted):
                raise _EndOfStream(last_index + 1, exact=not skipped_in_run)
    return frames, timestamps


def _first_seek_target(keyframes: _KeyframeIndex, timing: _Timing, first_wanted: int) -> int | None:
    """Where to seek before decoding anything; None when the wanted frame is in the first GOP."""
    if first_wanted <= 0:
        return None
    target = timing.pts_of(first_wanted)
    keyframe = keyframes.keyframe_at_or_before(target)
    if keyframe is not None and keyframe <= timing.start_pts:
        return None
    return target  # the demuxer lands on the keyframe at or before the wanted frame's time


def _worthwhile_seek_target(keyframes: _KeyframeIndex, timing: _Timing, current_pts: int | None, next_wanted: int) -> int | None:
    """The wanted frame's time, when a keyframe lies after the current frame and not after it.

    Then seeking decodes strictly fewer frames than reading on. Without a usable container index
    we cannot know, so we read on.
    """
    if current_pts is None or not keyframes.usable:
        return None
    target = timing.pts_of(next_wanted)
    keyframe = keyframes.keyframe_at_or_before(target)
    return target if keyframe is not None and keyframe > current_pts else None


def _earlier_seek_target(timing: _Timing, landed_pts: int, attempt: int) -> int:
    """Retry target after landing past the wanted frame: 1 s, 2 s, 4 s, ... before where we landed.

    The last resort aims one second before the stream start: MPEG-TS, for one, lands on the
    first keyframe after a target at the exact start time.
    """
    one_second = math.ceil(1 / timing.time_base)
    return max(landed_pts - one_second * 2 ** (attempt - 1), timing.start_pts - one_second)


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
    info: VideoInfo | None = None
    wanted: list[int] = []
    allow_seek: bool | None = None
    # A few passes at most: the first; one after learning that the stream is a little shorter
    # than its metadata; one counting frames without seeking when timestamps or seeking cannot be
    # trusted. Each pass opens the file afresh: not every demuxer can seek back to the start.
    for _ in range(4):
        with _open_video(path, threads) as (container, stream, timing):
            if info is None:
                info = declared = _info_from_stream(path, container, stream, timing)
            if allow_seek is None:
                allow_seek = container.format.name not in _FORMATS_WITHOUT_PRESENTATION_TIMES
            if not wanted:
                first, last = _segment_frame_range(info, start, end)
                offsets = _sample_offsets(last - first + 1, num_frames, sampling, info.fps, target_fps, rng)
                wanted = [first + offset for offset in offsets]
            try:
                frames, timestamps = _decode_wanted(container, stream, timing, wanted, info.width, info.height, allow_seek)
            except _EndOfStream as short:
                frame_count = short.frame_count if short.exact else _count_frames_from_tail(path, info.duration)
                _check_plausible_shortfall(path, declared.total_frames, frame_count, info.total_frames)
                info, wanted = replace(info, total_frames=frame_count), []
                continue
            except _NeedSequentialDecode:
                allow_seek = False
                continue
            return Clip(frames=frames, indices=wanted, timestamps=timestamps, info=info)
    raise VideoDecodeError(path, "the frames found differ on every decoding pass; re-encode the file")


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
