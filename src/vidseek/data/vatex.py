"""VATEX (Wang et al., ICCV 2019) retrieval in the CLIP4Clip-family layout (TS2-Net, X-CLIP,
TC-MGC `dataloader_vatex_retrieval.py`), using the HGR split (Chen et al., CVPR 2020):
25,991 train / 1,500 val / 1,500 test videos.

Files::

    ref_captions.json    {"<youtube id>_<start>_<end>": ["english caption", ...], ...}
                         (10 English captions per video; HGR's annotation/RET release)
    train_list.txt, val_list.txt, test_list.txt   one video id per line
    videos/<video id>.mp4   (any container; found by id stem, nested folders allowed)

Every English caption is a query (protocol "multi").
"""
from __future__ import annotations

from pathlib import Path

from vidseek.data.records import (
    SPLITS,
    RetrievalDataset,
    VideoFileIndex,
    caption_list,
    check_split,
    dataset_root,
    expect,
    listed_video_records,
    read_json,
    resolve_video_dir,
)

CAPTIONS = "ref_captions.json"
VIDEO_DIRS = ("videos",)
WHERE_FROM = (
    "download the VATEX retrieval annotations in the CLIP4Clip-family layout (ref_captions.json "
    "and train_list.txt/val_list.txt/test_list.txt, HGR split, as used by TS2-Net and X-CLIP) "
    "into that folder"
)


def load_vatex(root: str | Path, split: str, *, video_dir: str | Path | None = None) -> RetrievalDataset:
    """Read one split of VATEX; every English caption is a query."""
    root = dataset_root(root)
    check_split(split, SPLITS, "vatex")
    caption_path = root / CAPTIONS
    data = read_json(caption_path, WHERE_FROM)
    expect(isinstance(data, dict), caption_path, "the top level", "must map video ids to caption lists")
    captions = {video_id: caption_list(value, caption_path, repr(video_id)) for video_id, value in data.items()}
    files = VideoFileIndex(resolve_video_dir(root, video_dir, VIDEO_DIRS))
    records = listed_video_records(
        root / f"{split}_list.txt", captions, caption_path, files, ".mp4", split, WHERE_FROM
    )
    return RetrievalDataset("vatex", split, "multi", records, root)
