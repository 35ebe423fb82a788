"""MSVD (Chen & Dolan, ACL 2011) retrieval in the CLIP4Clip layout (`msvd_data.zip`, from
collaborative-experts): 1,200 train / 100 val / 670 test videos.

Files::

    raw-captions.pkl   pickle of {video id: [[token, token, ...], ...]} (about 40 captions each)
    train_list.txt, val_list.txt, test_list.txt   one video id per line
    YouTubeClips/<video id>.avi  or  videos/<video id>.avi

A caption is its tokens joined with spaces (as CLIP4Clip does); every caption is a query.
The pickle is read with an unpickler that only rebuilds plain containers and strings, so a
tampered annotation file cannot run code.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from vidseek.data.records import (
    SPLITS,
    RetrievalDataset,
    VideoFileIndex,
    check_split,
    dataset_root,
    expect,
    listed_video_records,
    require_file,
    resolve_video_dir,
)
from vidseek.errors import DatasetError

CAPTIONS = "raw-captions.pkl"
VIDEO_DIRS = ("videos", "YouTubeClips")
WHERE_FROM = (
    "download the MSVD annotations (CLIP4Clip's msvd_data.zip, "
    "github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msvd_data.zip) into that folder"
)


class _PlainDataUnpickler(pickle.Unpickler):
    """Refuses every class/function reference: dicts, lists, tuples and strings need none."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def load_msvd(root: str | Path, split: str, *, video_dir: str | Path | None = None) -> RetrievalDataset:
    """Read one split of MSVD; every caption is a query."""
    root = dataset_root(root)
    check_split(split, SPLITS, "msvd")
    caption_path = require_file(root / CAPTIONS, WHERE_FROM)
    captions = _read_captions(caption_path)
    files = VideoFileIndex(resolve_video_dir(root, video_dir, VIDEO_DIRS))
    records = listed_video_records(
        root / f"{split}_list.txt", captions, caption_path, files, ".avi", split, WHERE_FROM
    )
    return RetrievalDataset("msvd", split, "multi", records, root)


def _read_captions(path: Path) -> dict[str, list[str]]:
    try:
        with open(path, "rb") as fh:
            data = _PlainDataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise DatasetError(f"{path} is not a readable caption pickle ({err}): re-download msvd_data.zip") from None
    expect(isinstance(data, dict), path, "the top level", "must map video ids to caption lists")
    captions: dict[str, list[str]] = {}
    for video_id, value in data.items():
        where = f"video {video_id!r}"
        expect(isinstance(value, list) and len(value) > 0, path, where, "must have a non-empty list of captions")
        texts = []
        for position, caption in enumerate(value):
            # Captions are token lists in the CLIP4Clip release; accept plain strings too.
            tokens = caption if isinstance(caption, (list, tuple)) else [caption]
            expect(all(isinstance(token, str) for token in tokens), path, f"{where} caption {position}",
                   "must be a list of string tokens")
            text = " ".join(token.strip() for token in tokens if token.strip())
            expect(text != "", path, f"{where} caption {position}", "is empty")
            texts.append(text)
        captions[str(video_id)] = texts
    return captions
