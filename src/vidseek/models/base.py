"""The one interface every vidseek model implements (DESIGN.md, "Models share one small interface").

Data flow inside a model::

    tokens [B,L] ──encode_text──► TextFeatures ─┐
    frames [B,T,3,H,W] ──encode_frames──► FrameFeatures ──encode_video_features──► video repr
                                                 └──► score(text, video) [B_t,B_v]  (ranking)
                                                      loss(text, video)             (training)
                                                      index_text / index_video      (dense recall)

Representations are tensors or dataclasses of tensors so the training loop can cut them into
micro-batches, concatenate them (gradient caching), and all-gather them across ranks (DDP)
without knowing which model produced them — see `tree_map`, `tree_cat`, `tree_slice`.
"""
from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor, nn


@dataclass
class TextFeatures:
    """Text tower outputs. D = joint embedding width."""

    sentence: Tensor  # [B, D] feature at the EOT token (projected), not normalised
    words: Tensor  # [B, W, D] every token position after the final LN, projected
    mask: Tensor  # [B, W] bool, True at real tokens (SOT .. EOT), False at padding


@dataclass
class FrameFeatures:
    """Per-frame image tower outputs for a batch of videos."""

    frames: Tensor  # [B, T, D] per-frame CLS feature (projected), not normalised
    mask: Tensor  # [B, T] bool, True at real (decoded) frames
    patches: Tensor | None = None  # [B, T, P, D] projected patch tokens, when the model needs them


@dataclass
class LossOutput:
    loss: Tensor  # scalar to back-propagate
    terms: dict[str, float] = field(default_factory=dict)  # named parts, for logging
    logits: Tensor | None = None  # the scaled [B, B] text×video matrix of the contrastive loss, if any


# --- pytrees of tensors -------------------------------------------------------------------------

def tree_map(fn: Callable[[Tensor], Tensor], tree: Any) -> Any:
    """Apply `fn` to every tensor in a tensor / dataclass / tuple / list / dict (None kept)."""
    if tree is None:
        return None
    if isinstance(tree, Tensor):
        return fn(tree)
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return type(tree)(**{f.name: tree_map(fn, getattr(tree, f.name)) for f in dataclasses.fields(tree)})
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, t) for t in tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return tree


def tree_leaves(tree: Any) -> list[Tensor]:
    out: list[Tensor] = []
    tree_map(lambda t: out.append(t) or t, tree)
    return out


def tree_cat(trees: list[Any]) -> Any:
    """Concatenate same-shaped pytrees along dim 0."""
    first = trees[0]
    if first is None:
        return None
    if isinstance(first, Tensor):
        return torch.cat(trees, dim=0)
    if dataclasses.is_dataclass(first):
        return type(first)(**{f.name: tree_cat([getattr(t, f.name) for t in trees]) for f in dataclasses.fields(first)})
    if isinstance(first, (list, tuple)):
        return type(first)(tree_cat(list(parts)) for parts in zip(*trees))
    if isinstance(first, dict):
        return {k: tree_cat([t[k] for t in trees]) for k in first}
    raise TypeError(f"cannot concatenate {type(first).__name__}")


def tree_slice(tree: Any, start: int, stop: int) -> Any:
    return tree_map(lambda t: t[start:stop], tree)


def tree_to(tree: Any, device: torch.device | str) -> Any:
    return tree_map(lambda t: t.to(device, non_blocking=True), tree)


# --- the model interface ------------------------------------------------------------------------

class RetrievalModel(nn.Module, metaclass=abc.ABCMeta):
    """Base class. Subclasses set `name` and implement the video side, `score` and `loss`.

    `self.clip` is the CLIP backbone (`vidseek.encoders.ClipBackbone`): text tower and image
    tower. The default `encode_text` / `encode_frames` use it; models override what they change.
    """

    name: ClassVar[str] = "base"
    #: True when `index_video` gives one vector per video (dense recall); False for rerank-only.
    supports_dense_recall: ClassVar[bool] = True

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def start_from_pretrained_clip(self) -> None:
        """Called once after construction when `self.clip` holds pretrained weights (not for
        random init): models initialise what their release initialises from the checkpoint."""

    #: True when scoring reads the text tower's outputs at padding positions (TC-MGC's word
    #: granularities, as released). False: the tower skips the batch's trailing padding
    #: (`ClipBackbone.encode_text(skip_padding=True)`), same scores at a fraction of the cost.
    reads_padding_words: ClassVar[bool] = False

    # text side ---------------------------------------------------------------------------------
    def encode_text(self, tokens: Tensor) -> TextFeatures:
        return self.clip.encode_text(tokens, skip_padding=not self.reads_padding_words)

    # video side --------------------------------------------------------------------------------
    def encode_frames(self, frames: Tensor, mask: Tensor) -> FrameFeatures:
        """frames [B,T,3,H,W] (CLIP-normalised) → per-frame features through the image tower."""
        b, t = frames.shape[:2]
        out = self.clip.encode_image(frames.flatten(0, 1), patches=self.needs_patches)
        patches = None if out.patches is None else out.patches.unflatten(0, (b, t))
        return FrameFeatures(frames=out.cls.unflatten(0, (b, t)), mask=mask, patches=patches)

    #: models that read patch tokens (PIG) set this so extraction stores them.
    needs_patches: ClassVar[bool] = False

    @abc.abstractmethod
    def encode_video_features(self, feats: FrameFeatures) -> Any:
        """Per-frame features → this model's video representation (a pytree of tensors)."""
        ...

    # scoring / training ------------------------------------------------------------------------
    @abc.abstractmethod
    def score(self, text: TextFeatures, video: Any) -> Tensor:
        """Similarity [B_t, B_v] used for ranking (no temperature)."""
        ...

    @abc.abstractmethod
    def loss(self, text: TextFeatures, video: Any) -> LossOutput:
        ...

    # dense recall ------------------------------------------------------------------------------
    def index_text(self, text: TextFeatures) -> Tensor:
        """Query vector [B, D], L2-normalised, for the dense index."""
        return nn.functional.normalize(text.sentence, dim=-1)

    def index_video(self, video: Any) -> Tensor:
        """What goes into the dense index: one L2-normalised vector [B, D] per video."""
        from vidseek.errors import ConfigError

        raise ConfigError(f"model '{type(self).__name__}' is a reranker and has no dense index vector; "
                          "use a two-tower or PIG checkpoint for --recall")

    # convenience -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

