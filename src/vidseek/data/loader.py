"""One entry point for every dataset format: `load_dataset(root, split)` and `detect_format(root)`."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

from vidseek.data import activitynet, didemo, jsonl, lsmdc, msrvtt, msvd, vatex
from vidseek.data.records import RetrievalDataset, dataset_root
from vidseek.errors import ConfigError, DatasetError

DATASET_FORMATS = ("jsonl", "msrvtt", "didemo", "vatex", "msvd", "lsmdc", "activitynet")

_READERS: dict[str, Callable[..., RetrievalDataset]] = {
    "jsonl": jsonl.load_jsonl,
    "msrvtt": msrvtt.load_msrvtt,
    "didemo": didemo.load_didemo,
    "vatex": vatex.load_vatex,
    "msvd": msvd.load_msvd,
    "lsmdc": lsmdc.load_lsmdc,
    "activitynet": activitynet.load_activitynet,
}

# The files whose presence identifies each format, checked in DATASET_FORMATS order: a folder
# that holds several (vidseek synth writes both JSONL and the MSR-VTT layout) is read as
# generic JSONL, the format that carries every field; pass `fmt` to choose another.
FORMAT_MARKERS: dict[str, tuple[str, ...]] = {
    "jsonl": (jsonl.ANNOTATIONS,),
    "msrvtt": (msrvtt.ANNOTATIONS, msrvtt.JSFUSION_TEST_CSV),
    "didemo": tuple(didemo.ANNOTATION_FILES.values()),
    "vatex": (vatex.CAPTIONS,),
    "msvd": (msvd.CAPTIONS,),
    "lsmdc": tuple(lsmdc.ANNOTATION_FILES.values()),
    "activitynet": (activitynet.TRAIN_FILE, activitynet.TEST_FILE),
}


def detect_format(root: str | Path) -> str:
    """The dataset format of `root`, judged from the annotation files present."""
    path = Path(root).expanduser().absolute()
    if path.suffix == ".jsonl":
        return "jsonl"  # a missing file is reported by the reader, which names it
    dataset_root(path)
    for fmt in DATASET_FORMATS:
        if any((path / marker).is_file() for marker in FORMAT_MARKERS[fmt]):
            return fmt
    expected = "; ".join(f"{fmt}: {' or '.join(FORMAT_MARKERS[fmt])}" for fmt in DATASET_FORMATS)
    raise DatasetError(f"no dataset annotations found in {path}: expected one of {expected}")


def load_dataset(root: str | Path, split: str, fmt: str | None = None, **options: Any) -> RetrievalDataset:
    """Read `split` of the dataset in `root`; `fmt` defaults to `detect_format(root)`.

    Options per format (keyword arguments): msrvtt: train_split ("9k"|"7k"), test_split
    ("1k-A"|"full"), val_fraction, video_dir; didemo: sentence_order ("time"|"file"), video_dir;
    activitynet: val_fraction, video_dir; vatex, msvd, lsmdc: video_dir; jsonl: protocol.
    """
    if fmt is None:
        fmt = detect_format(root)
    if fmt not in _READERS:
        raise ConfigError(f"unknown dataset format {fmt!r}: use one of {', '.join(DATASET_FORMATS)}")
    reader = _READERS[fmt]
    accepted = [name for name, p in inspect.signature(reader).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} for dataset format {fmt}: "
            f"accepted options are {', '.join(accepted) or 'none'}"
        )
    return reader(root, split, **options)
