"""`vidseek synth`: a deterministic synthetic video–text benchmark, our offline stand-in for MSR-VTT.

Each clip shows 1–3 coloured shapes on a dark background doing simple motions (translations,
diagonals, grow, shrink, rotate, blink, stay), alone, at the same time, or one after another
("a red circle moves left, then a blue square grows"). Every clip gets several paraphrased
captions. Clips come in *groups*: a clip alone, or a clip with one hard negative that differs only
in the order of its two events (``kind="order"``) or in exactly one attribute — one object's
colour or shape, or one event's motion (``kind="attribute"``). A group never straddles splits, so
the test split measures whether a model tells these partners apart (mean pooling cannot see
order), and the trainer's hard-negative batching can put a group in one batch (DESIGN.md,
"The synthetic benchmark": order is learned only with hard-negative batching).

Layout written into the output folder:

    videos/all/<video_id>.mp4     H.264 (libx264, yuv420p) clips, ids synth00000, synth00001, ...
    annotations.jsonl             generic format: video_id, video, captions, split, meta
    MSRVTT_data.json              MSR-VTT layout (CLIP4Clip's msrvtt_data.zip) over the same clips
    MSRVTT_train.9k.csv           train + val ids
    MSRVTT_train.7k.csv           train ids
    MSRVTT_JSFUSION_test.csv      one sentence (the first caption) per test clip
    synth_config.json             the SynthConfig used
    synth_manifest.json           hash of config + generator version: finished mp4s are reused

A clip's ``meta`` is its complete description: `render_clip(meta, frames, size)` redraws it
exactly, so the annotations are the single source of truth for what is on screen.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from vidseek.errors import ConfigError
from vidseek.utils import atomic_path, atomic_write_json, atomic_write_text

# Bump when rendering, encoding or the spec sampler changes: finished mp4s of an older generator
# are then re-rendered instead of reused.
GENERATOR_VERSION = 1
CAPTIONS_PER_VIDEO = 8
VIDEO_DIR = "videos/all"  # the MSR-VTT layout's folder; the JSONL points into it too
MANIFEST_NAME = "synth_manifest.json"
ID_PREFIX = "synth"

# Saturated, mutually distant object colours (RGB) so they survive yuv420p chroma subsampling.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 250),
    "yellow": (245, 220, 40),
    "white": (240, 240, 240),
    "purple": (180, 60, 230),
}
# Dark backgrounds: every object colour stands out against every one of them.
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "black": (14, 14, 14),
    "gray": (72, 72, 72),
    "navy": (18, 24, 80),
    "dark green": (18, 66, 32),
    "brown": (84, 52, 26),
}
BACKGROUND_PATTERNS = ("plain", "gradient", "stripes", "checker", "noise")
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
# Circles and rings look the same at every angle, so "rotate" is never given to them.
ROTATION_INVARIANT_SHAPES = frozenset({"circle", "ring"})
SIZES: dict[str, float] = {"small": 0.11, "large": 0.17}  # bounding radius, fraction of frame side

TRANSLATIONS: dict[str, tuple[float, float]] = {  # total displacement (dx, dy); y grows downwards
    "left": (-0.40, 0.0),
    "right": (0.40, 0.0),
    "up": (0.0, -0.40),
    "down": (0.0, 0.40),
    "up_left": (-0.30, -0.30),
    "up_right": (0.30, -0.30),
    "down_left": (-0.30, 0.30),
    "down_right": (0.30, 0.30),
}
SCALE_CHANGES: dict[str, float] = {"grow": 1.7, "shrink": 0.45}  # final scale factor
ROTATION_TOTAL = math.pi  # radians turned over one event: 45° per sampled frame at 8 frames
MOTIONS = tuple(TRANSLATIONS) + tuple(SCALE_CHANGES) + ("rotate", "blink", "stay")
ACTIVE_MOTIONS = tuple(m for m in MOTIONS if m != "stay")
# The "one attribute differs" partner of a motion: the opposite direction where there is one.
OPPOSITE_MOTION: dict[str, str] = {
    "left": "right", "right": "left", "up": "down", "down": "up",
    "up_left": "down_right", "down_right": "up_left", "up_right": "down_left", "down_left": "up_right",
    "grow": "shrink", "shrink": "grow",
}

# ----------------------------------------------------------------------------------------------
# Caption vocabulary. The first entry of every list is the canonical word (caption 0).
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "round dot"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "ring": ("ring", "donut"),
    "cross": ("cross", "plus sign"),
}
COLOUR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
    "white": ("white",), "purple": ("purple", "violet"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
MOTION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("moves left", "moves to the left", "slides left", "goes to the left"),
    "right": ("moves right", "moves to the right", "slides right", "goes to the right"),
    "up": ("moves up", "moves upward", "rises", "goes up"),
    "down": ("moves down", "moves downward", "falls", "goes down"),
    "up_left": ("moves diagonally up and to the left", "moves up to the left",
                "drifts toward the top left"),
    "up_right": ("moves diagonally up and to the right", "moves up to the right",
                 "drifts toward the top right"),
    "down_left": ("moves diagonally down and to the left", "moves down to the left",
                  "drifts toward the bottom left"),
    "down_right": ("moves diagonally down and to the right", "moves down to the right",
                   "drifts toward the bottom right"),
    "grow": ("grows", "gets bigger", "expands", "becomes larger"),
    "shrink": ("shrinks", "gets smaller", "contracts", "becomes smaller"),
    "rotate": ("rotates", "spins", "turns around"),
    "blink": ("blinks", "flashes", "flickers on and off"),
    "stay": ("stays still", "does not move", "remains in place", "sits still"),
}
PATTERN_PHRASES: dict[str, str] = {  # "{c}" is the background colour
    "plain": "a {c} background",
    "gradient": "a {c} gradient background",
    "stripes": "a striped {c} background",
    "checker": "a checkered {c} background",
    "noise": "a grainy {c} background",
}
PREFIXES = ("", "a clip where ", "in this video ", "an animation in which ", "we see that ")
CONCURRENT_TEMPLATES = ("{a} while {b}", "{a} and at the same time {b}", "{a} as {b}",
                        "{a}, and simultaneously {b}")
SEQUENCE_TEMPLATES = ("{a}, then {b}", "first {a}, after that {b}", "{a} and then {b}",
                      "{a} before {b}", "at first {a}, afterwards {b}", "{a}; next {b}",
                      "first {a} and then {b}")
# Static objects that no event mentions: (phrase for one object, phrase for several).
BYSTANDER_TEMPLATES = (
    (" while {d} stays still", " while {d} stay still"),
    (" next to {d}", " next to {d}"),
    (", and {d} does not move", ", and {d} do not move"),
    (" beside {d}", " beside {d}"),
    (" while {d} remains in place", " while {d} remain in place"),
)


@dataclass
class SynthConfig:
    """What `generate` renders; the same config and seed always give the same dataset."""

    # 2,000 clips (1,399 train / 199 val / 402 test): with 420 training clips the tiny models
    # memorised them before learning order (docs/synthetic-recipe.md). Rendering: about a minute.
    num_videos: int = 2000  # total clips across splits
    seed: int = 0
    frames: int = 16  # frames per clip written to the mp4
    size: int = 64  # square frame side in pixels
    fps: int = 8
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    # More training clips, drawn after (and never repeating) the num_videos clips from their own
    # random stream, all in the train split: val and test stay exactly those of num_videos, so a
    # bigger training set is compared on the same queries (docs/synthetic-recipe.md, Round 3:
    # order is learned from the training twins, and 420 training twin pairs are memorised).
    extra_train_videos: int = 0


@dataclass
class SynthSummary:
    """What one `generate` call produced."""

    out_dir: Path
    counts: dict[str, int]  # clips per split: train, val, test
    hard_negative_pairs: int  # (clip, partner) pairs, each counted once
    written: int  # mp4 files rendered by this call
    reused: int  # finished mp4 files kept from an earlier call with the same config
    kinds: dict[str, int] = field(default_factory=dict)  # hard-negative pairs by kind


# ----------------------------------------------------------------------------------------------
# Scene specification: sampling clips and their hard-negative partners.

def _validate(config: SynthConfig) -> None:
    if config.num_videos < 1:
        raise ConfigError(f"synth --videos must be at least 1 (got {config.num_videos})")
    if config.extra_train_videos < 0:
        raise ConfigError(f"synth --extra-train must be at least 0 (got {config.extra_train_videos})")
    if config.frames < 2:
        raise ConfigError(f"synth --frames must be at least 2 (got {config.frames})")
    if config.size < 16 or config.size % 2:
        raise ConfigError(f"synth --size must be an even number of pixels >= 16 for H.264 yuv420p "
                          f"(got {config.size})")
    if config.fps < 1:
        raise ConfigError(f"synth fps must be at least 1 (got {config.fps})")
    fractions = (config.val_fraction, config.test_fraction)
    if any(not 0.0 <= f < 1.0 for f in fractions) or sum(fractions) >= 1.0:
        raise ConfigError(
            f"synth val_fraction={config.val_fraction} and test_fraction={config.test_fraction} must "
            "each be in [0, 1) and leave room for a train split (sum below 1)"
        )


def _motion_allowed(motion: str, shape: str) -> bool:
    return not (motion == "rotate" and shape in ROTATION_INVARIANT_SHAPES)


def _sample_objects(rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
    """`count` objects with distinct (colour, shape), so every caption names each one unambiguously."""
    objects: list[dict[str, Any]] = []
    taken: set[tuple[str, str]] = set()
    while len(objects) < count:
        colour = str(rng.choice(list(COLOURS)))
        shape = str(rng.choice(SHAPES))
        if (colour, shape) in taken:
            continue
        taken.add((colour, shape))
        objects.append({"shape": shape, "colour": colour, "size": str(rng.choice(list(SIZES)))})
    return objects


def _sample_motion(rng: np.random.Generator, shape: str, exclude: Iterable[str] = (),
                   allow_stay: bool = False) -> str:
    pool = [m for m in (MOTIONS if allow_stay else ACTIVE_MOTIONS)
            if _motion_allowed(m, shape) and m not in set(exclude)]
    return str(rng.choice(pool))


def _sample_scene(rng: np.random.Generator, kind: str) -> dict[str, Any]:
    """A clip's objects and events (no positions yet). `kind`: single | concurrent | sequence."""
    if kind == "single":
        objects = _sample_objects(rng, int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25])))
        # "stay" is rare: a clip where nothing moves carries little signal.
        allow_stay = bool(rng.random() < 0.08)
        events = [{"object": 0, "motion": _sample_motion(rng, objects[0]["shape"], allow_stay=allow_stay),
                   "step": 0}]
    elif kind == "concurrent":
        objects = _sample_objects(rng, int(rng.choice([2, 3], p=[0.7, 0.3])))
        events = [{"object": i, "motion": _sample_motion(rng, objects[i]["shape"]), "step": 0}
                  for i in (0, 1)]
    elif kind == "sequence":
        if rng.random() < 0.3:  # one object does two different things in turn
            objects = _sample_objects(rng, int(rng.choice([1, 2], p=[0.6, 0.4])))
            first = _sample_motion(rng, objects[0]["shape"])
            second = _sample_motion(rng, objects[0]["shape"], exclude=[first])
            events = [{"object": 0, "motion": first, "step": 0},
                      {"object": 0, "motion": second, "step": 1}]
        else:
            objects = _sample_objects(rng, int(rng.choice([2, 3], p=[0.7, 0.3])))
            events = [{"object": i, "motion": _sample_motion(rng, objects[i]["shape"]), "step": i}
                      for i in (0, 1)]
    else:
        raise ValueError(f"unknown clip kind {kind!r}")
    background = {
        "colour": str(rng.choice(list(BACKGROUND_COLOURS))),
        "pattern": str(rng.choice(BACKGROUND_PATTERNS)),
        "seed": int(rng.integers(0, 2**31 - 1)),
    }
    return {"kind": kind, "background": background, "objects": objects, "events": events}


def order_swapped(scene: dict[str, Any]) -> dict[str, Any]:
    """The same events in the other order (a two-step sequence's "order" hard negative)."""
    swapped = json.loads(json.dumps(scene))
    steps = max(e["step"] for e in scene["events"])
    swapped["events"] = [{**e, "step": steps - e["step"]} for e in reversed(scene["events"])]
    return swapped


def _attribute_variant(rng: np.random.Generator, scene: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """`scene` with exactly one attribute changed: colour, shape (of an object an event names) or
    motion (of one event; the opposite direction where one exists). None when no change is valid."""
    variant = json.loads(json.dumps(scene))
    objects, events = variant["objects"], variant["events"]
    subjects = sorted({e["object"] for e in events})
    for attribute in [str(a) for a in rng.permutation(["colour", "shape", "motion"])]:
        if attribute == "motion":
            index = int(rng.integers(len(events)))
            event = events[index]
            shape = objects[event["object"]]["shape"]
            siblings = [e["motion"] for j, e in enumerate(events)
                        if j != index and e["object"] == event["object"]]
            new = OPPOSITE_MOTION.get(event["motion"])
            if new is None or new in siblings:
                pool = [m for m in ("rotate", "blink", "grow", "shrink")
                        if m != event["motion"] and _motion_allowed(m, shape) and m not in siblings]
                new = str(rng.choice(pool))
            event["motion"] = new
            return variant, attribute
        target = objects[int(rng.choice(subjects))]
        others = {(o["colour"], o["shape"]) for o in objects if o is not target}
        if attribute == "colour":
            pool = [c for c in COLOURS if c != target["colour"] and (c, target["shape"]) not in others]
        else:
            motions = [e["motion"] for e in events if objects[e["object"]] is target]
            pool = [s for s in SHAPES if s != target["shape"] and (target["colour"], s) not in others
                    and all(_motion_allowed(m, s) for m in motions)]
        if pool:
            target[attribute] = str(rng.choice(pool))
            return variant, attribute
    return None


def scene_key(scene: dict[str, Any]) -> tuple:
    """What a caption can tell apart: objects' colour/shape/size and the timed events."""
    return (
        scene["kind"],
        tuple((o["colour"], o["shape"], o["size"]) for o in scene["objects"]),
        tuple((e["object"], e["motion"], e["step"]) for e in scene["events"]),
    )


# ----------------------------------------------------------------------------------------------
# Kinematics: where every object is at a time t in [0, 1]. Shared by layout and rendering.

def object_states(meta: dict[str, Any], times: np.ndarray) -> dict[str, np.ndarray]:
    """Per-object centre x/y (fractions of the frame side), scale, angle and visibility.

    Returns arrays of shape (objects, len(times)). Events with step k run over
    [k / steps, (k + 1) / steps]; an event's change accumulates linearly over its interval and
    holds afterwards, so a moved object stays where it arrived.
    """
    times = np.asarray(times, dtype=np.float64)
    steps = max(e["step"] for e in meta["events"]) + 1
    n = len(meta["objects"])
    x = np.array([[o.get("x", 0.0)] for o in meta["objects"]], dtype=np.float64).repeat(len(times), 1)
    y = np.array([[o.get("y", 0.0)] for o in meta["objects"]], dtype=np.float64).repeat(len(times), 1)
    scale = np.ones((n, len(times)))
    angle = np.zeros((n, len(times)))
    visible = np.ones((n, len(times)), dtype=bool)
    for event in meta["events"]:
        i, motion = event["object"], event["motion"]
        progress = np.clip(times * steps - event["step"], 0.0, 1.0)
        if motion in TRANSLATIONS:
            dx, dy = TRANSLATIONS[motion]
            x[i] += dx * progress
            y[i] += dy * progress
        elif motion in SCALE_CHANGES:
            scale[i] *= 1.0 + (SCALE_CHANGES[motion] - 1.0) * progress
        elif motion == "rotate":
            angle[i] += ROTATION_TOTAL * progress
        elif motion == "blink":
            # On for a quarter of the event, off for a quarter, twice: any uniform sampling of
            # >= 4 frames per event sees it both on and off.
            running = (progress > 0.0) & (progress < 1.0)
            visible[i] &= ~(running & (np.floor(progress * 4.0).astype(int) % 2 == 1))
    return {"x": x, "y": y, "scale": scale, "angle": angle, "visible": visible}


_LAYOUT_TIMES = np.linspace(0.0, 1.0, 33)
_FRAME_MARGIN = 0.01
_GAP = 0.02


def _layout_ok(meta: dict[str, Any]) -> bool:
    """Every object stays inside the frame and no two objects touch, at every layout time."""
    states = object_states(meta, _LAYOUT_TIMES)
    radius = np.array([SIZES[o["size"]] for o in meta["objects"]])[:, None] * states["scale"]
    for axis in ("x", "y"):
        if np.any(states[axis] - radius < _FRAME_MARGIN) or np.any(states[axis] + radius > 1 - _FRAME_MARGIN):
            return False
    n = len(meta["objects"])
    for i in range(n):
        for j in range(i + 1, n):
            distance = np.hypot(states["x"][i] - states["x"][j], states["y"][i] - states["y"][j])
            if np.any(distance < radius[i] + radius[j] + _GAP):
                return False
    return True


def _place(rng: np.random.Generator, scenes: list[dict[str, Any]], tries: int = 60) -> bool:
    """Give every object a start position, shared by all `scenes` of a group where possible.

    Each object gets one *anchor* (the centre of its path's bounding box); each scene starts the
    object so that its own path is centred on that anchor. A "moves left" clip and its "moves
    right" partner thus cover the same stretch of the frame in opposite directions.
    """
    offsets, half_extents = [], []
    for scene in scenes:
        relative = {**scene, "objects": [{**o, "x": 0.0, "y": 0.0} for o in scene["objects"]]}
        states = object_states(relative, _LAYOUT_TIMES)
        radius = np.array([SIZES[o["size"]] for o in scene["objects"]])[:, None] * states["scale"]
        lo_x, hi_x = states["x"].min(1), states["x"].max(1)
        lo_y, hi_y = states["y"].min(1), states["y"].max(1)
        offsets.append(((lo_x + hi_x) / 2, (lo_y + hi_y) / 2))
        half_extents.append(((hi_x - lo_x) / 2 + radius.max(1), (hi_y - lo_y) / 2 + radius.max(1)))
    reach_x = np.max([h[0] for h in half_extents], axis=0) + _FRAME_MARGIN + 0.005
    reach_y = np.max([h[1] for h in half_extents], axis=0) + _FRAME_MARGIN + 0.005
    if np.any(reach_x >= 0.5) or np.any(reach_y >= 0.5):
        return False
    for _ in range(tries):
        anchor_x = rng.uniform(reach_x, 1.0 - reach_x)
        anchor_y = rng.uniform(reach_y, 1.0 - reach_y)
        for scene, (off_x, off_y) in zip(scenes, offsets):
            for i, obj in enumerate(scene["objects"]):
                # Rounded so the annotations (which renderers read) hold the exact positions.
                obj["x"] = round(float(anchor_x[i] - off_x[i]), 4)
                obj["y"] = round(float(anchor_y[i] - off_y[i]), 4)
        if all(_layout_ok(scene) for scene in scenes):
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Captions.

def _noun_phrase(rng: np.random.Generator | None, obj: dict[str, Any]) -> str:
    """"a large red circle"; with an rng, synonyms vary and the size is sometimes left out."""
    if rng is None:
        return f"a {SIZE_WORDS[obj['size']][0]} {COLOUR_WORDS[obj['colour']][0]} {SHAPE_WORDS[obj['shape']][0]}"
    colour = str(rng.choice(COLOUR_WORDS[obj["colour"]]))
    shape = str(rng.choice(SHAPE_WORDS[obj["shape"]]))
    if rng.random() < 0.3:
        return f"a {colour} {shape}"
    return f"a {rng.choice(SIZE_WORDS[obj['size']])} {colour} {shape}"


def _pick(rng: np.random.Generator | None, options: tuple[str, ...] | tuple) -> Any:
    return options[0] if rng is None else options[int(rng.integers(len(options)))]


def _caption(meta: dict[str, Any], rng: np.random.Generator | None) -> str:
    """One caption of the clip; `rng=None` gives the canonical one (first words, no extras)."""
    objects, events = meta["objects"], meta["events"]
    phrases = [_noun_phrase(rng, o) for o in objects]
    clauses, previous_subject = [], None
    for event in events:
        subject = "it" if event["object"] == previous_subject else phrases[event["object"]]
        clauses.append(f"{subject} {_pick(rng, MOTION_WORDS[event['motion']])}")
        previous_subject = event["object"]
    if meta["kind"] == "single":
        text = clauses[0]
    elif meta["kind"] == "concurrent":
        text = _pick(rng, CONCURRENT_TEMPLATES).format(a=clauses[0], b=clauses[1])
    else:
        text = _pick(rng, SEQUENCE_TEMPLATES).format(a=clauses[0], b=clauses[1])
    bystanders = [phrases[i] for i in range(len(objects)) if i not in {e["object"] for e in events}]
    if bystanders:
        one, several = _pick(rng, BYSTANDER_TEMPLATES)
        text += (one if len(bystanders) == 1 else several).format(d=" and ".join(bystanders))
    if rng is not None:
        text = _pick(rng, PREFIXES) + text
        where = rng.random()
        if where < 0.35:
            background = PATTERN_PHRASES[meta["background"]["pattern"]].format(c=meta["background"]["colour"])
            text = f"on {background}, {text}" if where < 0.15 else f"{text} on {background}"
    return text


def captions_for(meta: dict[str, Any], rng: np.random.Generator, count: int = CAPTIONS_PER_VIDEO) -> list[str]:
    """`count` distinct paraphrases: the canonical caption first, then varied templates/synonyms."""
    captions = [_caption(meta, None)]
    for _ in range(200 * count):
        if len(captions) == count:
            break
        text = _caption(meta, rng)
        if text not in captions:
            captions.append(text)
    return captions


# ----------------------------------------------------------------------------------------------
# The whole dataset's annotations (no pixels).

def _group_kinds(num_videos: int, rng: np.random.Generator) -> list[str]:
    """About a third of the clips in order pairs, a third in attribute pairs, the rest alone."""
    pairs = num_videos // 6
    kinds = ["order"] * pairs + ["attribute"] * pairs + ["single"] * (num_videos - 4 * pairs)
    return [str(k) for k in rng.permutation(kinds)]


def _sample_scene_kind(rng: np.random.Generator) -> str:
    """Scene kind of a clip outside an order pair (those are always sequences)."""
    return str(rng.choice(["single", "concurrent", "sequence"], p=[0.4, 0.2, 0.4]))


def _sample_group(rng: np.random.Generator, kind: str, seen: set[tuple]) -> list[dict[str, Any]]:
    """The scenes of one group (1 or 2 clips) with hard-negative links by position in the list."""
    while True:
        if kind == "order":
            base = _sample_scene(rng, "sequence")
            scenes = [base, order_swapped(base)]
            links = [("order", None)]
        elif kind == "attribute":
            base = _sample_scene(rng, _sample_scene_kind(rng))
            variant = _attribute_variant(rng, base)
            if variant is None:
                continue
            scenes = [base, variant[0]]
            links = [("attribute", variant[1])]
        else:
            scenes = [_sample_scene(rng, _sample_scene_kind(rng))]
            links = []
        keys = [scene_key(s) for s in scenes]
        if any(k in seen for k in keys) or len(set(keys)) != len(keys):
            continue
        if not _place(rng, scenes):
            continue
        seen.update(keys)
        for scene in scenes:
            scene["hard_negatives"] = []
        for kind_name, attribute in links:
            for mine, theirs in ((0, 1), (1, 0)):
                link = {"index": theirs, "kind": kind_name}
                if attribute is not None:
                    link["attribute"] = attribute
                scenes[mine]["hard_negatives"].append(link)
        return scenes


def _assign_splits(group_kinds: list[str], config: SynthConfig, rng: np.random.Generator) -> list[str]:
    """A split per group, stratified by group kind so test (and train) hold both hard-negative kinds."""
    splits = ["train"] * len(group_kinds)
    for kind in ("order", "attribute", "single"):
        members = [g for g, k in enumerate(group_kinds) if k == kind]
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        n_test = round(n * config.test_fraction)
        n_val = round(n * config.val_fraction)
        if kind != "single" and config.test_fraction > 0 and n >= 1:
            n_test = max(1, n_test)  # the test split must contain hard negatives
        n_test = min(n_test, max(n - 1, 0)) if n >= 2 else n_test
        n_val = min(n_val, max(n - n_test - 1, 0))
        for position, g in enumerate(members):
            splits[g] = "test" if position < n_test else "val" if position < n_test + n_val else "train"
    return splits


def build_annotations(config: SynthConfig) -> list[dict[str, Any]]:
    """The annotation records (generic JSONL format) of the dataset `config` describes, in id order."""
    _validate(config)
    rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0x5EED]))
    kinds = _group_kinds(config.num_videos, rng)
    seen: set[tuple] = set()
    groups = [_sample_group(rng, kind, seen) for kind in kinds]
    splits = _assign_splits(kinds, config, rng)
    # Ids are handed out in a random order so partners are not neighbours.
    order = rng.permutation(config.num_videos)
    flat = [(g, i) for g, group in enumerate(groups) for i in range(len(group))]
    total = config.num_videos + config.extra_train_videos
    digits = max(5, len(str(total - 1)))  # fixed width keeps id order = file order
    ids = {clip: f"{ID_PREFIX}{int(order[k]):0{digits}d}" for k, clip in enumerate(flat)}
    if config.extra_train_videos:
        # Their own stream: the first num_videos clips (and so val and test) do not change.
        extra_rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xE7A]))
        extra_kinds = _group_kinds(config.extra_train_videos, extra_rng)
        first = len(groups)
        groups += [_sample_group(extra_rng, kind, seen) for kind in extra_kinds]
        splits += ["train"] * len(extra_kinds)
        extra_order = config.num_videos + extra_rng.permutation(config.extra_train_videos)
        extra_flat = [(g, i) for g in range(first, len(groups)) for i in range(len(groups[g]))]
        ids.update({clip: f"{ID_PREFIX}{int(extra_order[k]):0{digits}d}" for k, clip in enumerate(extra_flat)})
    records = []
    for (g, i), video_id in ids.items():
        scene = groups[g][i]
        caption_rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0xCA9, g, i]))
        meta = {
            "kind": scene["kind"],
            "background": scene["background"],
            "objects": scene["objects"],
            "events": scene["events"],
            "group": f"g{g:05d}",
            "hard_negatives": [{**{k: v for k, v in link.items() if k != "index"},
                                "video_id": ids[(g, link["index"])]} for link in scene["hard_negatives"]],
        }
        records.append({
            "video_id": video_id,
            "video": f"{VIDEO_DIR}/{video_id}.mp4",
            "captions": captions_for(meta, caption_rng),
            "split": splits[g],
            "meta": meta,
        })
    records.sort(key=lambda r: r["video_id"])
    return records


# ----------------------------------------------------------------------------------------------
# Rendering.

def _background(meta: dict[str, Any], size: int) -> np.ndarray:
    """The static background (size, size, 3) float32 in 0..255."""
    bg = meta["background"]
    base = np.array(BACKGROUND_COLOURS[bg["colour"]], dtype=np.float32)
    rng = np.random.default_rng(bg["seed"])
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    along = xx if rng.random() < 0.5 else yy
    pattern = bg["pattern"]
    if pattern == "plain":
        shade = np.ones_like(xx)
    elif pattern == "gradient":
        shade = 0.55 + 0.9 * along
    elif pattern == "stripes":
        shade = np.where(np.floor(along * 8) % 2 == 0, 0.75, 1.3)
    elif pattern == "checker":
        shade = np.where((np.floor(xx * 8) + np.floor(yy * 8)) % 2 == 0, 0.75, 1.3)
    elif pattern == "noise":
        shade = np.ones_like(xx)
    else:
        raise ValueError(f"unknown background pattern {pattern!r}")
    image = base[None, None, :] * shade[..., None] + 6.0  # lifts pure black so shading shows
    if pattern == "noise":
        image = image + rng.normal(0.0, 10.0, size=(size, size, 1)).astype(np.float32)
    return np.clip(image, 0, 255)


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Pixels inside `shape` of bounding radius `r`, in object-local coordinates (u right, v down)."""
    rho = np.hypot(u, v)
    if shape == "circle":
        return rho <= r
    if shape == "ring":
        return (rho <= r) & (rho >= 0.55 * r)
    if shape == "square":
        half = 0.72 * r
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "cross":
        arm = 0.3 * r
        return ((np.abs(u) <= r) & (np.abs(v) <= arm)) | ((np.abs(v) <= r) & (np.abs(u) <= arm))
    if shape == "triangle":
        # Equilateral, apex up, circumradius r: inside all three edges (inradius r / 2).
        inside = np.ones_like(u, dtype=bool)
        for normal_angle in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3):
            inside &= u * math.cos(normal_angle) + v * math.sin(normal_angle) <= r / 2
        return inside
    if shape == "star":
        # Five points, outer radius r, inner radius 0.45 r. Fold the angle into one half-spike:
        # the edge runs from the inner vertex I (angle 0) to the outer vertex O (angle pi/5).
        theta = np.arctan2(-v, u) - math.pi / 2  # a point straight up is on a spike
        sector = 2 * math.pi / 5
        folded = np.abs(np.mod(theta + sector / 2, sector) - sector / 2)  # 0 at a tip, pi/5 between
        beta = math.pi / 5 - folded  # 0 at an inner vertex, pi/5 at a tip
        px, py = rho * np.cos(beta), rho * np.sin(beta)
        ix, iy = 0.45 * r, 0.0
        ox, oy = r * math.cos(math.pi / 5), r * math.sin(math.pi / 5)
        edge = (ox - ix) * (py - iy) - (oy - iy) * (px - ix)
        origin_side = (ox - ix) * (0 - iy) - (oy - iy) * (0 - ix)
        return edge * origin_side >= 0
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(meta: dict[str, Any], frames: int, size: int) -> np.ndarray:
    """The clip `meta` describes as uint8 RGB frames of shape (frames, size, size, 3).

    Frame k shows time t = k / (frames - 1); objects are drawn in list order over the background.
    """
    times = np.linspace(0.0, 1.0, frames)
    states = object_states(meta, times)
    background = _background(meta, size)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    for k in range(frames):
        image = background.copy()
        for i, obj in enumerate(meta["objects"]):
            if not states["visible"][i, k]:
                continue
            dx, dy = xx - states["x"][i, k], yy - states["y"][i, k]
            cos, sin = math.cos(states["angle"][i, k]), math.sin(states["angle"][i, k])
            u, v = dx * cos + dy * sin, -dx * sin + dy * cos
            mask = _shape_mask(obj["shape"], u, v, SIZES[obj["size"]] * states["scale"][i, k])
            image[mask] = COLOURS[obj["colour"]]
        video[k] = image.round().astype(np.uint8)
    return video


def encode_mp4(frames: np.ndarray, path: str | Path, fps: int) -> None:
    """Write uint8 RGB frames (T, H, W, 3) atomically as H.264 (libx264, yuv420p) mp4.

    One encoder thread keeps the bitstream deterministic and avoids thread start-up costs on
    these tiny frames; crf 17 keeps colours and edges close to the rendered pixels.
    """
    import av

    height, width = frames.shape[1:3]
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            stream.codec_context.thread_count = 1
            stream.options = {"crf": "17", "preset": "fast"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)


# ----------------------------------------------------------------------------------------------
# Files.

def config_hash(config: SynthConfig) -> str:
    fields = asdict(config)
    if not fields["extra_train_videos"]:  # folders rendered before the option keep their hash
        del fields["extra_train_videos"]
    payload = json.dumps({"config": fields, "generator_version": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _csv_text(header: list[str], rows: Iterable[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_annotation_files(out: Path, records: list[dict[str, Any]], config: SynthConfig) -> None:
    """annotations.jsonl plus the MSR-VTT layout over the same clips (CLIP4Clip's file formats)."""
    atomic_write_text(out / "annotations.jsonl",
                      "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    msrvtt_split = {"train": "train", "val": "validate", "test": "test"}
    duration = config.frames / config.fps
    sentences, sen_id = [], 0
    for record in records:
        for caption in record["captions"]:
            sentences.append({"caption": caption, "video_id": record["video_id"], "sen_id": sen_id})
            sen_id += 1
    data = {
        "videos": [{"video_id": r["video_id"], "split": msrvtt_split[r["split"]], "category": 0, "url": "",
                    "start time": 0, "end time": duration, "id": n} for n, r in enumerate(records)],
        "sentences": sentences,
    }
    atomic_write_text(out / "MSRVTT_data.json", json.dumps(data, ensure_ascii=False) + "\n")
    ids = {split: [r["video_id"] for r in records if r["split"] == split] for split in ("train", "val", "test")}
    atomic_write_text(out / "MSRVTT_train.9k.csv",
                      _csv_text(["video_id"], [[v] for v in sorted(ids["train"] + ids["val"])]))
    atomic_write_text(out / "MSRVTT_train.7k.csv", _csv_text(["video_id"], [[v] for v in ids["train"]]))
    test_rows = [[f"ret{n}", f"msr{r['video_id'][len(ID_PREFIX):]}", r["video_id"], r["captions"][0]]
                 for n, r in enumerate(x for x in records if x["split"] == "test")]
    atomic_write_text(out / "MSRVTT_JSFUSION_test.csv", _csv_text(["key", "vid_key", "video_id", "sentence"], test_rows))
    atomic_write_json(out / "synth_config.json", asdict(config))


OUTPUT_FILES = ("annotations.jsonl", "MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv",
                "MSRVTT_JSFUSION_test.csv", "synth_config.json")


def _start_or_resume(out: Path, config: SynthConfig) -> bool:
    """True when finished mp4s in `out` belong to this config and may be reused.

    Otherwise the folder's synth outputs (from another config or generator version) are removed
    and a fresh manifest is written before any clip, so every later mp4 belongs to it.
    """
    if out.exists() and not out.is_dir():
        raise ConfigError(f"synth output {out} is a file: pass a folder (new or from an earlier synth run)")
    video_dir = out / VIDEO_DIR
    video_dir.mkdir(parents=True, exist_ok=True)
    # A killed run's partial files (atomic writes leave them only under their temporary names).
    leftovers = list(video_dir.glob(f".{ID_PREFIX}*.mp4.*.tmp"))
    for name in OUTPUT_FILES + (MANIFEST_NAME,):
        leftovers += out.glob(f".{name}.*.tmp")
    for leftover in leftovers:
        leftover.unlink()
    manifest_path = out / MANIFEST_NAME
    wanted = {"config_hash": config_hash(config), "generator_version": GENERATOR_VERSION}
    if manifest_path.is_file():
        try:
            if json.loads(manifest_path.read_text(encoding="utf-8")) == wanted:
                return True
        except (OSError, json.JSONDecodeError):
            pass
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    for stale in video_dir.glob(f"{ID_PREFIX}[0-9]*.mp4"):
        stale.unlink()
    atomic_write_json(manifest_path, wanted)
    return False


def generate(out_dir: str | Path, config: SynthConfig = SynthConfig(), progress: bool = True) -> SynthSummary:
    """Render the synthetic benchmark into `out_dir` (see the module docstring for the layout).

    Resumable: with the same config, finished mp4s (non-empty, written atomically) are kept and
    only missing ones are rendered. Deterministic: the same config gives byte-identical
    annotations and identical decoded frames.
    """
    _validate(config)
    out = Path(out_dir)
    records = build_annotations(config)
    reuse = _start_or_resume(out, config)
    written = reused = 0
    from rich.progress import track

    for record in track(records, description="rendering synth clips", disable=not progress):
        path = out / record["video"]
        if reuse and path.is_file() and path.stat().st_size > 0:
            reused += 1
            continue
        encode_mp4(render_clip(record["meta"], config.frames, config.size), path, config.fps)
        written += 1
    _write_annotation_files(out, records, config)
    counts = {split: sum(r["split"] == split for r in records) for split in ("train", "val", "test")}
    kinds: dict[str, int] = {}
    for record in records:
        for link in record["meta"]["hard_negatives"]:
            kinds[link["kind"]] = kinds.get(link["kind"], 0) + 1
    kinds = {k: v // 2 for k, v in sorted(kinds.items())}  # each pair is listed by both partners
    return SynthSummary(out_dir=out, counts=counts, hard_negative_pairs=sum(kinds.values()),
                        written=written, reused=reused, kinds=kinds)
