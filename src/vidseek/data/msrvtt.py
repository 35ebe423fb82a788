"""MSR-VTT in the CLIP4Clip layout (`msrvtt_data.zip` + the raw videos).

Files (the ones CLIP4Clip, X-CLIP, TS2-Net and CLIP-ViP read)::

    MSRVTT_data.json          {"videos": [{"video_id", "split", "category", "url", ...}],
                               "sentences": [{"video_id", "caption", "sen_id"}]}
    MSRVTT_train.9k.csv       column video_id: the 9k training videos (Gabeur et al. split)
    MSRVTT_train.7k.csv       column video_id: the 7k training videos (Miech et al. split)
    MSRVTT_JSFUSION_test.csv  columns key,vid_key,video_id,sentence: the 1k-A test (Yu et al.,
                              JSFusion), one sentence per video
    videos/all/<video_id>.mp4 (also MSRVTT/videos/all/, MSRVTT_Videos/, videos/; .webm accepted)

Splits:

* ``train`` — the chosen train csv minus the validation hold-out; every caption of each video.
  Protocol "multi", as for ``val``: every caption of a held-out video is a query.
* ``val``   — MSR-VTT has no clean validation split for the 9k/7k protocols (the official
  "validate" videos are inside the 9k training csv, and released code validates on test).
  vidseek holds out a deterministic 5 % of the chosen train csv (`holdout_ids`: the videos with
  the smallest BLAKE2b hash of their id), which `train` then excludes. Test is never used as val.
* ``test``  — ``test_split="1k-A"``: the 1,000 JSFusion videos, protocol "single" with the
  JSFusion sentence as each video's first caption (the remaining MSR-VTT captions follow);
  ``test_split="full"``: the 2,990 videos whose split is "test" in MSRVTT_data.json, every
  caption a query (protocol "multi").
"""
from __future__ import annotations

from pathlib import Path

from vidseek.data.records import (
    SPLITS,
    RetrievalDataset,
    VideoFileIndex,
    VideoRecord,
    check_choice,
    check_split,
    dataset_root,
    expect,
    holdout_ids,
    read_csv_column_rows,
    read_json,
    resolve_video_dir,
)
from vidseek.errors import DatasetError

ANNOTATIONS = "MSRVTT_data.json"
TRAIN_CSVS = {"9k": "MSRVTT_train.9k.csv", "7k": "MSRVTT_train.7k.csv"}
JSFUSION_TEST_CSV = "MSRVTT_JSFUSION_test.csv"
TEST_SPLITS = ("1k-A", "full")
VIDEO_DIRS = ("videos/all", "MSRVTT/videos/all", "MSRVTT_Videos", "videos")
WHERE_FROM = (
    "download the MSR-VTT annotations (CLIP4Clip's msrvtt_data.zip, "
    "github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip) into that folder"
)


def load_msrvtt(
    root: str | Path,
    split: str,
    *,
    train_split: str = "9k",
    test_split: str = "1k-A",
    val_fraction: float = 0.05,
    video_dir: str | Path | None = None,
) -> RetrievalDataset:
    """Read one split of MSR-VTT (see the module docstring for what each split holds)."""
    root = dataset_root(root)
    check_split(split, SPLITS, "msrvtt")
    check_choice("train_split", train_split, tuple(TRAIN_CSVS), "msrvtt")
    check_choice("test_split", test_split, TEST_SPLITS, "msrvtt")
    annotations = root / ANNOTATIONS
    videos, captions = _read_annotations(annotations)
    files = VideoFileIndex(resolve_video_dir(root, video_dir, VIDEO_DIRS))

    if split in ("train", "val"):
        train_csv = root / TRAIN_CSVS[train_split]
        ids = [row["video_id"] for _, row in read_csv_column_rows(train_csv, ["video_id"], WHERE_FROM)]
        held_out = holdout_ids(ids, val_fraction, salt="msrvtt-val")
        chosen = [video_id for video_id in ids if (video_id in held_out) == (split == "val")]
        first_captions = {video_id: [] for video_id in chosen}
        protocol = "multi"
        source = train_csv
    elif test_split == "1k-A":
        test_csv = root / JSFUSION_TEST_CSV
        rows = read_csv_column_rows(test_csv, ["video_id", "sentence"], WHERE_FROM)
        chosen = [row["video_id"] for _, row in rows]
        first_captions = {row["video_id"]: [row["sentence"]] for _, row in rows}
        protocol = "single"
        source = test_csv
    else:
        chosen = [video_id for video_id, info in videos.items() if info.get("split") == "test"]
        first_captions = {video_id: [] for video_id in chosen}
        protocol = "multi"
        source = annotations

    records = []
    for video_id in dict.fromkeys(chosen):
        # The JSFusion sentence leads so that the "single" protocol queries with it; the other
        # MSR-VTT captions of the video follow for training-style use of the test videos.
        ordered = list(dict.fromkeys(first_captions[video_id] + captions.get(video_id, [])))
        if not ordered:
            raise DatasetError(
                f"video {video_id} listed in {source.name} has no captions in {annotations}: "
                "re-download msrvtt_data.zip so both files come from the same release"
            )
        info = videos.get(video_id, {})
        meta = {key: info[key] for key in ("category", "url") if key in info}
        path = files.locate([f"{video_id}.mp4", video_id], files.folder / f"{video_id}.mp4")
        records.append(VideoRecord(video_id, path, tuple(ordered), split, meta=meta))
    return RetrievalDataset("msrvtt", split, protocol, records, root)


def _read_annotations(path: Path) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Video info by id and captions by video id (file order) from MSRVTT_data.json."""
    data = read_json(path, WHERE_FROM)
    expect(isinstance(data, dict), path, "the top level", "must be an object with 'videos' and 'sentences'")
    expect(isinstance(data.get("sentences"), list), path, "'sentences'", "must be a list")
    expect(isinstance(data.get("videos"), list), path, "'videos'", "must be a list")
    videos: dict[str, dict] = {}
    for position, video in enumerate(data["videos"]):
        expect(isinstance(video, dict) and isinstance(video.get("video_id"), str), path,
               f"videos[{position}]", "needs a string 'video_id'")
        videos[video["video_id"]] = video
    captions: dict[str, list[str]] = {}
    for position, sentence in enumerate(data["sentences"]):
        expect(isinstance(sentence, dict), path, f"sentences[{position}]", "must be an object")
        expect(isinstance(sentence.get("video_id"), str), path, f"sentences[{position}]",
               "needs a string 'video_id'")
        caption = sentence.get("caption")
        expect(isinstance(caption, str) and caption.strip() != "", path, f"sentences[{position}]",
               "needs a non-empty string 'caption'")
        captions.setdefault(sentence["video_id"], []).append(caption.strip())
    return videos, captions
