"""ActivityNet Captions (Krishna et al., ICCV 2017) for video-paragraph retrieval, as evaluated
by CLIP4Clip §4.1 and its successors.

Files::

    train.json   {"v_<youtube id>": {"duration": s, "timestamps": [[s, e], ...],
                                     "sentences": [str, ...]}, ...}   (10,009 videos)
    val_1.json   same shape (4,917 videos)
    videos/<youtube id>.mp4 or videos/v_<youtube id>.mp4   (any container, nested allowed)

Splits: ``test`` = val_1.json, the standard paragraph-retrieval test set (every released method
reports on it). ``val`` = a deterministic hold-out of train.json — the ceil(5 %) videos with the
smallest BLAKE2b hash of their id (`holdout_ids`) — and ``train`` = train.json without them, so
model selection never looks at the test videos.

Each video is one record: its sentences ordered by segment start (stable, so ties keep the file
order), and the query is their concatenation. Whole videos are retrieved, so `start`/`end` stay
None; the duration and the (sorted) segment timestamps are kept in `meta`.
"""
from __future__ import annotations

from pathlib import Path

from vidseek.data.records import (
    SPLITS,
    RetrievalDataset,
    VideoFileIndex,
    VideoRecord,
    caption_list,
    check_split,
    dataset_root,
    expect,
    holdout_ids,
    read_json,
    resolve_video_dir,
)

TRAIN_FILE = "train.json"
TEST_FILE = "val_1.json"
VIDEO_DIRS = ("videos",)
WHERE_FROM = (
    "download the ActivityNet Captions annotations (captions.zip from "
    "cs.stanford.edu/people/ranjaykrishna/densevid) into that folder"
)


def load_activitynet(
    root: str | Path,
    split: str,
    *,
    val_fraction: float = 0.05,
    video_dir: str | Path | None = None,
) -> RetrievalDataset:
    """Read one split of ActivityNet Captions as paragraph-retrieval records."""
    root = dataset_root(root)
    check_split(split, SPLITS, "activitynet")
    path = root / (TEST_FILE if split == "test" else TRAIN_FILE)
    videos = _read_videos(path)
    ids = list(videos)
    if split != "test":
        held_out = holdout_ids(ids, val_fraction, salt="activitynet-val")
        ids = [video_id for video_id in ids if (video_id in held_out) == (split == "val")]

    files = VideoFileIndex(resolve_video_dir(root, video_dir, VIDEO_DIRS))
    records = []
    for video_id in ids:
        duration, segments = videos[video_id]
        youtube_id = video_id[2:] if video_id.startswith("v_") else video_id
        # Files are named with or without the "v_" prefix depending on the download.
        names = [f"{youtube_id}.mp4", f"{video_id}.mp4", youtube_id, video_id]
        path_on_disk = files.locate(names, files.folder / f"{youtube_id}.mp4")
        meta = {"duration": duration, "timestamps": [span for span, _ in segments]}
        captions = tuple(sentence for _, sentence in segments)
        records.append(VideoRecord(video_id, path_on_disk, captions, split, meta=meta))
    return RetrievalDataset("activitynet", split, "paragraph", records, root)


def _read_videos(path: Path) -> dict[str, tuple[float, list[tuple[tuple[float, float], str]]]]:
    """duration and [((start, end), sentence)] sorted by start, per video id, in file order."""
    data = read_json(path, WHERE_FROM)
    expect(isinstance(data, dict), path, "the top level", "must map video ids to annotations")
    videos = {}
    for video_id, entry in data.items():
        where = f"video {video_id!r}"
        expect(isinstance(entry, dict), path, where, "must be an object")
        duration = entry.get("duration")
        expect(isinstance(duration, (int, float)) and duration > 0, path, f"{where} 'duration'",
               "must be a positive number")
        sentences = caption_list(entry.get("sentences"), path, f"{where} 'sentences'")
        timestamps = entry.get("timestamps")
        expect(
            isinstance(timestamps, list) and len(timestamps) == len(sentences)
            and all(isinstance(t, list) and len(t) == 2 and all(isinstance(v, (int, float)) for v in t)
                    for t in timestamps),
            path, f"{where} 'timestamps'", "must hold one [start, end] pair per sentence",
        )
        segments = [((float(t[0]), float(t[1])), s) for t, s in zip(timestamps, sentences)]
        segments.sort(key=lambda segment: segment[0][0])
        videos[video_id] = (float(duration), segments)
    return videos
