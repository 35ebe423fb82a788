"""Video decoding (PyAV), frame sampling and CLIP preprocessing."""
from vidseek.video.decode import Clip, VideoInfo, probe, read_frames
from vidseek.video.preprocess import CLIP_MEAN, CLIP_STD, load_video_tensor, pad_frames, preprocess_frames
from vidseek.video.sampling import fps_indices, jitter_indices, segment_windows, uniform_indices

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "Clip",
    "VideoInfo",
    "fps_indices",
    "jitter_indices",
    "load_video_tensor",
    "pad_frames",
    "preprocess_frames",
    "probe",
    "read_frames",
    "segment_windows",
    "uniform_indices",
]
