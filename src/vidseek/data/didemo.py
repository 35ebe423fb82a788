"""DiDeMo (Hendricks et al., "Localizing Moments in Video with Natural Language") for
video-paragraph retrieval, as evaluated by CLIP4Clip §4.1 and its successors.

Files::

    train_data.json, val_data.json, test_data.json
        lists of {"video": "<flickr name>.mov", "times": [[s, e], ...], "description": str,
                  "annotation_id", "dl_link", ...}; `times` are per-annotator 5-second chunk
                  indices (0..5) over the first 30 s of the video.
    train_list.txt, val_list.txt, test_list.txt   (optional, the collaborative-experts /
        CLIP4Clip split lists): when present, only the listed videos are kept, in list order.
    videos/   the video files, found by the "video" name or, because the downloads re-encoded
              many Flickr originals (.mov -> .mp4 ...), by its stem.

Each video becomes one record whose captions are its descriptions; the query is the paragraph
(all descriptions joined). By default the sentences are ordered by their moment's start time
(`sentence_order="time"`); `sentence_order="file"` keeps the JSON order, which is what
CLIP4Clip concatenates. Each description's moment in seconds — start = mean(chunk starts)·5,
end = (mean(chunk ends) + 1)·5, CLIP4Clip's conversion — is kept in `meta["moments"]`.
Whole videos are retrieved, so `start`/`end` stay None.
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
    read_id_list,
    read_json,
    resolve_video_dir,
)
from vidseek.errors import DatasetError

ANNOTATION_FILES = {split: f"{split}_data.json" for split in SPLITS}
LIST_FILES = {split: f"{split}_list.txt" for split in SPLITS}
SENTENCE_ORDERS = ("time", "file")
VIDEO_DIRS = ("videos",)
CHUNK_SECONDS = 5.0
WHERE_FROM = (
    "download the DiDeMo annotations (train_data.json, val_data.json, test_data.json from "
    "github.com/LisaAnne/LocalizingMoments, data/) into that folder"
)


def load_didemo(
    root: str | Path,
    split: str,
    *,
    sentence_order: str = "time",
    video_dir: str | Path | None = None,
) -> RetrievalDataset:
    """Read one split of DiDeMo as paragraph-retrieval records (see the module docstring)."""
    root = dataset_root(root)
    check_split(split, SPLITS, "didemo")
    check_choice("sentence_order", sentence_order, SENTENCE_ORDERS, "didemo")
    path = root / ANNOTATION_FILES[split]
    grouped = _read_descriptions(path)

    list_path = root / LIST_FILES[split]
    if list_path.is_file():
        listed = read_id_list(list_path, WHERE_FROM)
        unknown = [name for name in listed if name not in grouped]
        if unknown:
            raise DatasetError(
                f"{list_path.name} lists {len(unknown)} video(s) with no description in {path.name} "
                f"(first: {unknown[0]}): use the list and the JSON from the same release"
            )
        names = list(dict.fromkeys(listed))
    else:
        names = list(grouped)

    files = VideoFileIndex(resolve_video_dir(root, video_dir, VIDEO_DIRS))
    records = []
    for name in names:
        moments = grouped[name]
        if sentence_order == "time":
            moments = sorted(moments, key=lambda moment: (moment[1], moment[2]))  # stable on ties
        captions = tuple(description for description, _, _ in moments)
        meta = {"moments": [(start, end) for _, start, end in moments]}
        path_on_disk = files.locate([name], files.folder / name)
        records.append(VideoRecord(name, path_on_disk, captions, split, meta=meta))
    return RetrievalDataset("didemo", split, "paragraph", records, root)


def _read_descriptions(path: Path) -> dict[str, list[tuple[str, float, float]]]:
    """(description, start s, end s) per video name, in file order."""
    data = read_json(path, WHERE_FROM)
    expect(isinstance(data, list), path, "the top level", "must be a list of annotations")
    grouped: dict[str, list[tuple[str, float, float]]] = {}
    for position, item in enumerate(data):
        where = f"item {position}"
        expect(isinstance(item, dict), path, where, "must be an object")
        expect(isinstance(item.get("video"), str) and item["video"] != "", path, where,
               "needs a non-empty string 'video'")
        description = item.get("description")
        expect(isinstance(description, str) and description.strip() != "", path, where,
               "needs a non-empty string 'description'")
        times = item.get("times")
        expect(
            isinstance(times, list) and len(times) > 0
            and all(isinstance(t, list) and len(t) == 2 and all(isinstance(v, (int, float)) for v in t)
                    for t in times),
            path, f"{where} 'times'", "must be a non-empty list of [start_chunk, end_chunk] pairs",
        )
        start = sum(t[0] for t in times) / len(times) * CHUNK_SECONDS
        end = (sum(t[1] for t in times) / len(times) + 1) * CHUNK_SECONDS
        grouped.setdefault(item["video"], []).append((description.strip(), start, end))
    return grouped
