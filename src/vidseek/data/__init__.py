"""Datasets: readers for the standard text-to-video benchmarks and the generic JSONL format."""
from vidseek.data.loader import DATASET_FORMATS, detect_format, load_dataset
from vidseek.data.records import Protocol, RetrievalDataset, VideoRecord

__all__ = ["DATASET_FORMATS", "Protocol", "RetrievalDataset", "VideoRecord", "detect_format", "load_dataset"]
