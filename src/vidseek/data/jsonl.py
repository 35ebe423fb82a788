"""The generic vidseek annotation format: one JSON object per line.

    {"video_id": "clip001", "video": "videos/clip001.mp4", "captions": ["a dog ...", ...],
     "split": "train", "start": 3.0, "end": 9.5, "meta": {...}}

`video_id` (default: the `video` path as written), `start`, `end` (seconds, for clips cut from a
longer file) and `meta` (free-form extras, e.g. the synthetic benchmark's hard-negative partners)
are optional. Relative `video` paths are relative
to the JSONL file's folder. The file is `annotations.jsonl` in the dataset folder, or any
`.jsonl` file passed as the root. Blank lines are skipped; video ids are unique in the file.

Protocol: "multi" (every caption a query) by default; "single" queries with each video's first
caption; "paragraph" joins the captions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vidseek.data.records import (
    PROTOCOLS,
    SPLITS,
    RetrievalDataset,
    VideoRecord,
    caption_list,
    check_choice,
    check_split,
    read_text,
    require_file,
)
from vidseek.errors import DatasetError

ANNOTATIONS = "annotations.jsonl"
WHERE_FROM = (
    "write one JSON object per line with video_id, video, captions and split "
    "(or generate a dataset with `vidseek synth`)"
)


def annotation_file(root: str | Path) -> Path:
    """The JSONL file for a root that is either the file itself or the folder holding annotations.jsonl."""
    path = Path(root).expanduser().absolute()
    if path.suffix == ".jsonl":
        return require_file(path, WHERE_FROM)
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist: pass the folder that holds {ANNOTATIONS}")
    return require_file(path / ANNOTATIONS, WHERE_FROM)


def load_jsonl(root: str | Path, split: str, *, protocol: str = "multi") -> RetrievalDataset:
    """Read the records of one split from a generic JSONL annotation file."""
    check_split(split, SPLITS, "jsonl")
    check_choice("protocol", protocol, PROTOCOLS, "jsonl")
    path = annotation_file(root)
    records: list[VideoRecord] = []
    lines_of_ids: dict[str, int] = {}
    splits_present: set[str] = set()
    for line_number, line in enumerate(read_text(path, WHERE_FROM).split("\n"), start=1):
        if not line.strip():
            continue
        record = _parse_line(line, path, line_number)
        if record.video_id in lines_of_ids:
            raise DatasetError(
                f"{path}: line {line_number}: video_id {record.video_id!r} already used on line "
                f"{lines_of_ids[record.video_id]}; video ids must be unique"
            )
        lines_of_ids[record.video_id] = line_number
        splits_present.add(record.split)
        if record.split == split:
            records.append(record)
    if not records:
        present = ", ".join(s for s in SPLITS if s in splits_present) or "none"
        raise DatasetError(f"{path} has no videos in split {split!r} (splits present: {present})")
    return RetrievalDataset("jsonl", split, protocol, records, path.parent)


def _parse_line(line: str, path: Path, line_number: int) -> VideoRecord:
    where = f"{path}: line {line_number}"
    try:
        item: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise DatasetError(f"{where}: malformed JSON at column {err.colno} ({err.msg}); fix the line") from None
    if not isinstance(item, dict):
        raise DatasetError(f"{where}: expected a JSON object, found {type(item).__name__}")
    item.setdefault("video_id", item.get("video"))  # a file is its own id unless clips share it
    for key in ("video_id", "video", "split"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise DatasetError(f"{where}: field {key!r} must be a non-empty string")
    if item["split"] not in SPLITS:
        raise DatasetError(f"{where}: split {item['split']!r} is not one of {', '.join(SPLITS)}")
    captions = caption_list(item.get("captions"), path, f"line {line_number}: field 'captions'")
    times = {}
    for key in ("start", "end"):
        value = item.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0):
            raise DatasetError(f"{where}: field {key!r} must be a non-negative number of seconds")
        times[key] = None if value is None else float(value)
    if times["start"] is not None and times["end"] is not None and times["end"] <= times["start"]:
        raise DatasetError(f"{where}: 'end' ({times['end']}) must be after 'start' ({times['start']})")
    meta = item.get("meta", {})
    if not isinstance(meta, dict):
        raise DatasetError(f"{where}: field 'meta' must be a JSON object")
    video = Path(item["video"]).expanduser()
    video = (video if video.is_absolute() else path.parent / video).absolute()
    return VideoRecord(item["video_id"], video, tuple(captions), item["split"], times["start"], times["end"], meta)
