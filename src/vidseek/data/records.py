"""Record types shared by every dataset reader, and the file helpers the readers build them with.

A reader turns one benchmark's public annotation files into a `RetrievalDataset`: a list of
`VideoRecord`s (one per video or clip, every caption attached) plus the evaluation *protocol*
that says how captions become queries:

* ``"single"``    — one query per video: its first caption (MSR-VTT 1k-A puts the JSFusion
  sentence first, so this is the standard 1k-A query set; CLIP4Clip §4.1).
* ``"multi"``     — every caption is its own query (VATEX, MSVD, LSMDC, MSR-VTT full test).
* ``"paragraph"`` — one query per video: all its sentences joined with a space, the
  video-paragraph retrieval setting of CLIP4Clip §4.1 (DiDeMo, ActivityNet Captions).

Readers never decode videos and never fail on a missing video file: `missing_videos()` reports
them, so a user sees how many of the (often rotted) benchmark videos they actually have.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence, get_args

from vidseek.errors import ConfigError, DatasetError

Protocol = Literal["single", "multi", "paragraph"]
PROTOCOLS: tuple[str, ...] = get_args(Protocol)
SPLITS: tuple[str, ...] = ("train", "val", "test")

# Containers seen in the public benchmark downloads (DiDeMo's Flickr videos alone use several).
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp",
     ".ogv", ".mts", ".m2ts"}
)


@dataclass(frozen=True)
class VideoRecord:
    """One retrievable video (or clip cut from a longer video by `start`/`end`)."""

    video_id: str
    path: Path  # absolute path of the video file (may not exist; readers do not decode)
    captions: tuple[str, ...]  # every caption (paragraph datasets: the sentences, in time order)
    split: str  # "train" | "val" | "test"
    start: float | None = None  # seconds, for datasets that cut clips from longer videos
    end: float | None = None
    meta: Mapping[str, Any] = field(default_factory=dict)  # dataset-specific extras


@dataclass
class RetrievalDataset:
    """The records of one split of one dataset, with the protocol that turns captions into queries."""

    name: str
    split: str
    protocol: Protocol
    records: list[VideoRecord]
    root: Path

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"unknown retrieval protocol {self.protocol!r}: use one of {', '.join(PROTOCOLS)}"
            )
        seen: set[str] = set()
        for record in self.records:
            if record.video_id in seen:
                raise DatasetError(
                    f"video id {record.video_id!r} appears twice in {self.name} {self.split}: "
                    "each video id must be unique within a split"
                )
            if not record.captions:
                raise DatasetError(
                    f"video {record.video_id!r} in {self.name} {self.split} has no captions: "
                    "every video needs at least one caption"
                )
            seen.add(record.video_id)

    def __len__(self) -> int:
        return len(self.records)

    def queries(self) -> list[tuple[str, int]]:
        """Evaluation queries as (text, index into `records`), in record order."""
        if self.protocol == "single":
            return [(record.captions[0], i) for i, record in enumerate(self.records)]
        if self.protocol == "paragraph":
            return [(paragraph_text(record), i) for i, record in enumerate(self.records)]
        return [(caption, i) for i, record in enumerate(self.records) for caption in record.captions]

    def training_pairs(self) -> list[tuple[str, int]]:
        """Every (caption, record index) pair; paragraph datasets pair the joined paragraph."""
        if self.protocol == "paragraph":
            return [(paragraph_text(record), i) for i, record in enumerate(self.records)]
        return [(caption, i) for i, record in enumerate(self.records) for caption in record.captions]

    def subset(self, video_ids: Iterable[str]) -> "RetrievalDataset":
        """The records whose id is in `video_ids`, kept in this dataset's order."""
        wanted = set(video_ids)
        present = {record.video_id for record in self.records}
        unknown = sorted(wanted - present)
        if unknown:
            shown = ", ".join(unknown[:5]) + (f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else "")
            raise DatasetError(
                f"{len(unknown)} requested video id(s) are not in {self.name} {self.split}: {shown}"
            )
        kept = [record for record in self.records if record.video_id in wanted]
        return RetrievalDataset(self.name, self.split, self.protocol, kept, self.root)

    def missing_videos(self) -> list[VideoRecord]:
        """Records whose video file does not exist on disk (benchmark downloads are often incomplete)."""
        return [record for record in self.records if not record.path.is_file()]


def paragraph_text(record: VideoRecord) -> str:
    """The paragraph query of a video: its sentences joined with single spaces (CLIP4Clip §4.1)."""
    return " ".join(caption.strip() for caption in record.captions)


# --- helpers the readers share ---------------------------------------------------------------

def dataset_root(root: str | Path) -> Path:
    """The dataset folder as an absolute path; a DatasetError when it does not exist."""
    path = Path(root).expanduser().absolute()
    if path.is_file():
        raise DatasetError(f"{path} is a file: pass the dataset folder that holds it")
    if not path.is_dir():
        raise DatasetError(f"dataset folder {path} does not exist: pass the folder that holds the annotations")
    return path


def check_split(split: str, valid: Sequence[str], dataset: str) -> None:
    if split not in valid:
        raise DatasetError(f"unknown split {split!r} for {dataset}: valid splits are {', '.join(valid)}")


def check_choice(option: str, value: str, valid: Sequence[str], dataset: str) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {option} {value!r} for {dataset}: use one of {', '.join(valid)}")


def require_file(path: Path, where_from: str) -> Path:
    """`path` if it is a file; otherwise a DatasetError naming it and where the standard one comes from."""
    if not path.is_file():
        raise DatasetError(f"{path.name} not found in {path.parent}: {where_from}")
    return path


def read_text(path: Path, where_from: str) -> str:
    """The text of an annotation file (UTF-8, a leading byte-order mark ignored)."""
    require_file(path, where_from)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text ({err.reason}): re-download or re-save the file") from None


def read_json(path: Path, where_from: str) -> Any:
    text = read_text(path, where_from)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DatasetError(
            f"malformed JSON in {path} at line {err.lineno}, column {err.colno}: {err.msg}; "
            "re-download or fix the file"
        ) from None


def read_id_list(path: Path, where_from: str) -> list[str]:
    """One id per line (blank lines skipped), as in the CLIP4Clip `*_list.txt` split files."""
    ids = [line.strip() for line in read_text(path, where_from).splitlines()]
    return [video_id for video_id in ids if video_id]


def read_csv_column_rows(
    path: Path, columns: Sequence[str], where_from: str
) -> list[tuple[int, dict[str, str]]]:
    """Rows of a comma-separated file with a header, as (line number, row); each needs `columns`."""
    reader = csv.DictReader(io.StringIO(read_text(path, where_from)), strict=True)
    header = reader.fieldnames or []
    absent = [column for column in columns if column not in header]
    if absent:
        raise DatasetError(
            f"{path} has no {', '.join(repr(c) for c in absent)} column (header: {','.join(header) or 'empty'}): "
            f"expected a header with {','.join(columns)}"
        )
    rows = []
    try:
        for row in reader:
            line = reader.line_num
            empty = [column for column in columns if not (row.get(column) or "").strip()]
            if empty:
                raise DatasetError(f"{path}: line {line}: empty or missing {', '.join(empty)}; fix the line")
            rows.append((line, {key: value.strip() for key, value in row.items() if isinstance(value, str)}))
    except csv.Error as err:
        # line_num counts the lines of the rows completed so far: the bad row starts on the next one
        raise DatasetError(f"{path}: line {reader.line_num + 1}: malformed CSV ({err}); fix the line") from None
    return rows


def expect(condition: bool, path: Path, where: str, what: str) -> None:
    """Raise a DatasetError naming the file and the field when an annotation has the wrong shape."""
    if not condition:
        raise DatasetError(f"{path}: {where} {what}; fix or re-download the file")


def caption_list(value: Any, path: Path, where: str) -> list[str]:
    """A non-empty list of non-empty strings (stripped), or a DatasetError naming the field."""
    expect(isinstance(value, list) and len(value) > 0, path, where, "must be a non-empty list of captions")
    captions = []
    for position, caption in enumerate(value):
        expect(isinstance(caption, str) and caption.strip() != "", path, f"{where}[{position}]",
               "must be a non-empty string")
        captions.append(caption.strip())
    return captions


def holdout_ids(video_ids: Sequence[str], fraction: float, salt: str) -> set[str]:
    """A deterministic validation hold-out: the ceil(fraction·n) ids with the smallest hash.

    Membership depends only on the ids (BLAKE2b of `salt:id`, never Python's randomised `hash`),
    so the same annotation files give the same split on every machine and every run.
    """
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {fraction}")
    unique = list(dict.fromkeys(video_ids))
    if len(unique) < 2:
        return set()
    count = min(len(unique) - 1, math.ceil(fraction * len(unique)))

    def rank(video_id: str) -> bytes:
        return hashlib.blake2b(f"{salt}:{video_id}".encode("utf-8"), digest_size=8).digest()

    return set(sorted(unique, key=rank)[:count])


def resolve_video_dir(root: Path, video_dir: str | Path | None, candidates: Sequence[str]) -> Path:
    """The folder holding the videos: `video_dir` when given, else the first standard one present."""
    if video_dir is not None:
        folder = Path(video_dir).expanduser()
        folder = (folder if folder.is_absolute() else root / folder).absolute()
        if not folder.is_dir():
            raise DatasetError(f"video folder {folder} does not exist: fix video_dir or omit it")
        return folder
    for candidate in candidates:
        if (root / candidate).is_dir():
            return root / candidate
    return root / candidates[0]


class VideoFileIndex:
    """Finds video files under a folder (recursively) by exact file name or by name stem.

    Benchmark downloads differ in container (DiDeMo: .mov/.mp4/.avi/...; MSR-VTT: .mp4 or .webm)
    and in nesting, so readers look up ids here instead of assuming one extension. The folder is
    walked once, on the first lookup.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        self._by_name: dict[str, Path] | None = None
        self._by_stem: dict[str, Path] = {}

    def _build(self) -> dict[str, Path]:
        by_name: dict[str, Path] = {}
        if self.folder.is_dir():
            for current, dirs, files in os.walk(self.folder):
                dirs.sort()  # deterministic choice when two folders hold the same name
                for name in sorted(files):
                    suffix = os.path.splitext(name)[1].lower()
                    if suffix not in VIDEO_EXTENSIONS:
                        continue
                    path = Path(current, name)
                    by_name.setdefault(name, path)
                    self._by_stem.setdefault(name[: -len(suffix)], path)
        return by_name

    def find(self, names: Sequence[str]) -> Path | None:
        """The first file matching one of `names` exactly, else one whose stem matches a name's stem."""
        if self._by_name is None:
            self._by_name = self._build()
        for name in names:
            if name in self._by_name:
                return self._by_name[name]
        for name in names:
            for stem in (name, strip_video_extension(name)):
                if stem in self._by_stem:
                    return self._by_stem[stem]
        return None

    def locate(self, names: Sequence[str], default: Path) -> Path:
        """The found file, or `default` (the standard location) when the video is missing."""
        found = self.find(names)
        return (found if found is not None else default).absolute()


def strip_video_extension(name: str) -> str:
    stem, suffix = os.path.splitext(name)
    return stem if suffix.lower() in VIDEO_EXTENSIONS else name


def listed_video_records(
    list_path: Path,
    captions: Mapping[str, Sequence[str]],
    caption_path: Path,
    files: VideoFileIndex,
    extension: str,
    split: str,
    where_from: str,
) -> list[VideoRecord]:
    """Records for the ids in a `<split>_list.txt` file, captions looked up by id.

    The CLIP4Clip-family layout of MSVD and VATEX: split lists plus one caption file keyed by id.
    """
    records = []
    for video_id in dict.fromkeys(read_id_list(list_path, where_from)):
        if video_id not in captions:
            raise DatasetError(
                f"video {video_id} listed in {list_path.name} has no captions in {caption_path.name}: "
                "use the list and the caption file from the same release"
            )
        file_name = f"{video_id}{extension}"
        path = files.locate([file_name, video_id], files.folder / file_name)
        records.append(VideoRecord(video_id, path, tuple(captions[video_id]), split))
    return records
