"""CLIP encoders: text and image towers (open_clip), the BPE tokenizer, local weight loading.

The temporal encoder lives in `vidseek.encoders.temporal`.
"""
from vidseek.encoders.clip import CLIP_CONFIGS, ClipBackbone, ImageFeatures, build_clip, clip_config
from vidseek.encoders.tokenizer import tokenize
from vidseek.encoders.weights import ClipCheckpoint, load_clip_weights, read_clip_checkpoint

__all__ = [
    "CLIP_CONFIGS",
    "ClipBackbone",
    "ClipCheckpoint",
    "ImageFeatures",
    "build_clip",
    "clip_config",
    "load_clip_weights",
    "read_clip_checkpoint",
    "tokenize",
]
