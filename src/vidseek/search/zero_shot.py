"""Zero-shot recall backend (`--recall clip:ARCH --weights FILE`): a stock CLIP as a video encoder.

The video vector is the mean of the frames' CLS features and the query vector CLIP's sentence
feature — CLIP4Clip's meanP (Luo et al. 2021, §3.2 "parameter-free type") without any training,
i.e. exactly `vidseek.load_encoder(ARCH, weights=FILE)`. Everything else is the dense backend:
the same feature store, dense index (FAISS or Milvus) and reranking.

The index records the architecture, the weights path and their sha256 (index.json "recall", and
``recall/zero_shot.json`` for the settings the text tower is rebuilt from), so `vidseek search`
/ `serve` rebuild the same text tower and refuse weights that changed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vidseek.errors import ConfigError, SearchIndexError
from vidseek.search.indexer import LoadedModel, file_sha256
from vidseek.search.recall_spec import ZERO_SHOT_PREFIX
from vidseek.search.searcher import DenseRecall, RecallOptions
from vidseek.utils import atomic_write_json

STATE_FILE = "zero_shot.json"
FRAMES = 12  # frames per video, as `load_encoder`
WORDS = 32   # query tokens, as `load_encoder` (captions are short; CLIP's causal mask makes it exact)


class ZeroShotRecall(DenseRecall):
    """`DenseRecall` over a stock CLIP (meanP) built from an architecture name and a weights file."""

    def __init__(self, loaded: LoadedModel, state_dir: Path, options: RecallOptions, arch: str):
        super().__init__(loaded, state_dir, options)
        self.arch = arch

    @classmethod
    def build(cls, checkpoint: str, state_dir: Path, options: RecallOptions, device: str,
              expected_sha256: str | None) -> "ZeroShotRecall":
        """`checkpoint` is the weights file. A new index takes the architecture from
        `options.clip_arch`; an existing one from its state file (and checks the weights' hash)."""
        from vidseek.api import load_encoder

        state_dir = Path(state_dir)
        state = read_state(state_dir)
        arch = options.clip_arch or state.get("arch")
        if arch is None:
            raise SearchIndexError(f"{state_dir / STATE_FILE} is missing, so the CLIP architecture of this "
                                   f"zero-shot index is unknown; rebuild it with `vidseek index … --recall "
                                   f"{ZERO_SHOT_PREFIX}:ARCH --weights FILE`")
        if state and state["arch"] != arch:
            raise SearchIndexError(f"this index was built with CLIP {state['arch']}, not {arch}; "
                                   f"use --recall {ZERO_SHOT_PREFIX}:{state['arch']} or a new --out folder")
        frames, words = int(state.get("frames", FRAMES)), int(state.get("words", WORDS))
        weights = Path(checkpoint)
        sha256 = check_weights(weights, arch, expected_sha256)
        encoder = load_encoder(arch, weights=weights, frames=frames, words=words, device=device)
        loaded = LoadedModel(model=encoder.model, checkpoint=str(weights.absolute()), sha256=sha256,
                             preset=f"{ZERO_SHOT_PREFIX}:{arch}", frames=frames, words=words)
        if not state:
            state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(state_dir / STATE_FILE, {"arch": arch, "frames": frames, "words": words})
        return cls(loaded, state_dir, options, arch)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backend": ZERO_SHOT_PREFIX, "arch": self.arch}


def read_state(state_dir: Path) -> dict[str, Any]:
    """The zero-shot settings saved in `state_dir` ({} for a new index)."""
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SearchIndexError(f"{path} is not valid JSON ({err.msg}); rebuild the index") from None


def check_weights(weights: Path, arch: str, expected_sha256: str | None) -> str:
    """sha256 of the weights file; for an existing index it must still be the recorded file."""
    repoint = (f"put the file back, or point the index at its new place with `vidseek index VIDEOS --out IDX "
               f"--recall {ZERO_SHOT_PREFIX}:{arch} --weights NEW_PATH` (the same file, checked by sha256)")
    if not weights.is_file():
        if expected_sha256 is None:
            raise ConfigError(f"CLIP weights {weights} not found; pass the path of a local weights file")
        raise SearchIndexError(f"the index was built with CLIP weights {weights}, which no longer exist there; {repoint}")
    sha256 = file_sha256(weights)
    if expected_sha256 is not None and sha256 != expected_sha256:
        raise SearchIndexError(f"CLIP weights {weights} changed since the index was built (sha256 differs); "
                               f"{repoint}, or rebuild the index in a new --out folder for other weights")
    return sha256


def register_recall_backends(register: Any) -> None:
    """Provider hook of `vidseek.search.searcher` (`--recall clip:ARCH`)."""
    register(ZERO_SHOT_PREFIX, ZeroShotRecall.build)
