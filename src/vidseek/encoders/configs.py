"""Named CLIP architectures in open_clip's config format, and lookup by name.

A leaf of `vidseek.encoders`: both the towers (`clip.py`) and the weight loader (`weights.py`,
which guesses an architecture from a state dict's shapes) read these configs.
"""
from __future__ import annotations

import copy
from typing import Any

from vidseek.errors import ConfigError

#: Architectures by name, in open_clip's config format. "tiny" is ours (tests, demo, synthetic
#: benchmark); the ViT entries are CLIP's Table 20 sizes and equal open_clip's own configs (a test
#: checks). Any other open_clip model name with a ViT image tower also works in `build_clip`.
CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    "ViT-B-32": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    },
    "ViT-B-16": {
        "embed_dim": 512,
        "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
    },
    "ViT-L-14": {
        "embed_dim": 768,
        "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12},
    },
    "tiny": {
        "embed_dim": 64,
        # open_clip derives vision heads as width // head_width: 96 // 24 = 4 heads.
        "vision_cfg": {"image_size": 48, "layers": 3, "width": 96, "patch_size": 8, "head_width": 24},
        "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 96, "heads": 4, "layers": 2},
    },
}

def known_config_names() -> list[str]:
    """Our named configs plus every architecture open_clip ships a config for."""
    import open_clip

    return [*CLIP_CONFIGS, *(n for n in open_clip.list_models() if n not in CLIP_CONFIGS)]


def clip_config(name: str) -> dict[str, Any]:
    """A deep copy of the config for `name` (ours first, then open_clip's). ConfigError if unknown."""
    if name in CLIP_CONFIGS:
        return copy.deepcopy(CLIP_CONFIGS[name])
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ConfigError(f"unknown CLIP architecture '{name}'; use one of {', '.join(CLIP_CONFIGS)} "
                          "or another open_clip model name")
    return cfg
