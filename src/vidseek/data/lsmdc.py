"""LSMDC 2016 (Rohrbach et al., "Movie Description", IJCV 2017) retrieval, as read by CLIP4Clip:
101,079 train / 7,408 val clips and the 1,000-clip public test.

Files (tab-separated, no header, six fields per line)::

    LSMDC16_annos_training.csv, LSMDC16_annos_val.csv, LSMDC16_challenge_1000_publictect.csv
        <CLIP_ID> \\t <START_ALIGNED> \\t <END_ALIGNED> \\t <START_EXTRACTED> \\t <END_EXTRACTED> \\t <SENTENCE>
    avi/<movie>/<CLIP_ID>.avi   (or videos/<movie>/...); <movie> is the clip id without its
        trailing "_HH.MM.SS.mmm-HH.MM.SS.mmm" span, e.g. 0001_American_Beauty.

A clip id can carry several sentences in train/val (grouped into one record, in file order);
every sentence is a query. Clips are already cut to their span, so `start`/`end` stay None and
the four timestamps are kept verbatim in `meta`.
"""
from __future__ import annotations

import re
from pathlib import Path

from vidseek.data.records import (
    SPLITS,
    RetrievalDataset,
    VideoFileIndex,
    VideoRecord,
    check_split,
    dataset_root,
    read_text,
    resolve_video_dir,
)
from vidseek.errors import DatasetError

ANNOTATION_FILES = {
    "train": "LSMDC16_annos_training.csv",
    "val": "LSMDC16_annos_val.csv",
    "test": "LSMDC16_challenge_1000_publictect.csv",  # sic: the file's real name
}
VIDEO_DIRS = ("avi", "videos")
TIME_FIELDS = ("start_aligned", "end_aligned", "start_extracted", "end_extracted")
_CLIP_SPAN = re.compile(r"_\d{2}\.\d{2}\.\d{2}\.\d{3}-\d{2}\.\d{2}\.\d{2}\.\d{3}$")
WHERE_FROM = (
    "request the LSMDC 2016 annotations from the MPII Movie Description dataset "
    "(sites.google.com/site/describingmovies/download) and put them in that folder"
)


def movie_of_clip(clip_id: str) -> str:
    """The movie folder of a clip: its id without the trailing time span."""
    return _CLIP_SPAN.sub("", clip_id)


def load_lsmdc(root: str | Path, split: str, *, video_dir: str | Path | None = None) -> RetrievalDataset:
    """Read one split of LSMDC; every sentence is a query."""
    root = dataset_root(root)
    check_split(split, SPLITS, "lsmdc")
    path = root / ANNOTATION_FILES[split]
    sentences: dict[str, list[str]] = {}
    times: dict[str, tuple[str, ...]] = {}
    # split on "\n" only: str.splitlines would also cut at Unicode separators inside a sentence
    for line_number, line in enumerate(read_text(path, WHERE_FROM).split("\n"), start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 6:
            raise DatasetError(
                f"{path}: line {line_number}: expected 6 tab-separated fields (clip id, 4 times, "
                f"sentence), found {len(fields)}; fix the line"
            )
        clip_id, sentence = fields[0].strip(), fields[5].strip()
        if not clip_id or not sentence:
            raise DatasetError(f"{path}: line {line_number}: empty clip id or sentence; fix the line")
        sentences.setdefault(clip_id, []).append(sentence)
        times.setdefault(clip_id, tuple(field.strip() for field in fields[1:5]))

    files = VideoFileIndex(resolve_video_dir(root, video_dir, VIDEO_DIRS))
    records = []
    for clip_id, clip_sentences in sentences.items():
        file_name = f"{clip_id}.avi"
        default = files.folder / movie_of_clip(clip_id) / file_name
        meta = {"movie": movie_of_clip(clip_id), **dict(zip(TIME_FIELDS, times[clip_id]))}
        path_on_disk = files.locate([file_name, clip_id], default)
        records.append(VideoRecord(clip_id, path_on_disk, tuple(clip_sentences), split, meta=meta))
    return RetrievalDataset("lsmdc", split, "multi", records, root)
