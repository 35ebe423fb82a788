"""`--recall clip:ARCH --weights FILE`: zero-shot recall with a stock CLIP, no trained checkpoint.

The most common starting point (clip-retrieval's whole workflow) is OpenAI's CLIP weights and a
folder of videos. This module turns that request into what the indexer hands every recall
backend: the checkpoint is the weights file (hashed and recorded like any checkpoint), and the
CLIP architecture travels as a recall option. The backend itself is `vidseek.search.zero_shot`.
Kept free of the searcher so that the indexer can call it without an import cycle.
"""
from __future__ import annotations

from pathlib import Path

from vidseek.errors import ConfigError

#: The `--recall` prefix of zero-shot CLIP recall.
ZERO_SHOT_PREFIX = "clip"


def zero_shot_recall(backend: str, checkpoint: str, weights: str | Path | None) -> tuple[str, str | None]:
    """(backend, checkpoint) parsed from --recall, plus --weights → (checkpoint, CLIP architecture).

    'clip', 'ViT-B-32', 'w.pt' → ('/abs/w.pt', 'ViT-B-32'); any other backend → (checkpoint, None).
    """
    if backend != ZERO_SHOT_PREFIX:
        if weights is not None:
            raise ConfigError(f"--weights is for zero-shot recall (--recall {ZERO_SHOT_PREFIX}:ARCH); a trained "
                              f"checkpoint carries its own weights: drop --weights")
        return checkpoint, None
    from vidseek.encoders.configs import clip_config
    from vidseek.encoders.weights import weights_file

    arch = checkpoint.strip()
    if not arch:
        raise ConfigError(f"--recall {ZERO_SHOT_PREFIX}: needs an architecture, e.g. "
                          f"--recall {ZERO_SHOT_PREFIX}:ViT-B-32 --weights ViT-B-32.pt")
    clip_config(arch)  # an unknown name fails here, naming the known ones
    if weights is None:
        raise ConfigError(f"--recall {ZERO_SHOT_PREFIX}:{arch} needs --weights FILE: a local CLIP weights file "
                          f"(OpenAI .pt, open_clip or Hugging Face); nothing is downloaded")
    return str(weights_file(weights).absolute()), arch
