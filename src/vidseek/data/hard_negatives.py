"""Hard-negative partners of each clip: from dataset metadata ("groups") or mined from captions.

Order is learned only when a clip's order-swapped twin shares its contrastive batch (DESIGN.md,
"The synthetic benchmark"). The synthetic benchmark records those twins; generic JSONL, MSR-VTT
and the other readers do not. `mine_caption_partners` finds them from the captions alone:

* **order** — two clips have captions with the same multiset of words in a different order
  ("X, then Y" / "Y, then X"; "a red circle and a blue square" / "a blue circle and a red square").
  Bucketed by the sorted word multiset.
* **attribute** — two clips have captions of the same length that differ in exactly one content
  word ("a *red* square moves left" / "a *blue* square moves left"). Bucketed by the caption with
  one position masked, so a bucket holds exactly the captions that agree everywhere else.

Both are hash joins: O(total words) keys, never a pairwise loop over the dataset. Buckets with
more than `max_bucket` clips (generic captions such as "a man is [·]") pair each clip only with
its `max_bucket` successors in a seeded shuffle, which bounds the work per caption. Partners are
clip-level (a clip has many captions) and never the clip itself. Paraphrases do not count as an
attribute change: two words seen in the same slot of two captions of ONE clip ("a big box" /
"a large box") are synonyms of that dataset, and a cross-clip difference in a synonym pair is
ignored. Each clip keeps its `max_partners` best-supported partners (most caption pairs).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from vidseek.errors import ConfigError

__all__ = [
    "HARD_NEGATIVE_SOURCES",
    "Partner",
    "group_partners",
    "mine_caption_partners",
    "partner_links",
    "partners_for",
    "words_of",
]

HardNegativeSource = Literal["none", "groups", "mined"]
HARD_NEGATIVE_SOURCES: tuple[str, ...] = ("none", "groups", "mined")

# Function words: swapping one of these ("a" → "the") is not an attribute change.
STOPWORDS = frozenset(
    "a an the and or of to in on at by for with from into onto is are was were be being been it its "
    "this that these those there here while as then than next after before first afterwards".split()
)
_WORD = re.compile(r"[a-z0-9']+")


@dataclass(frozen=True, order=True)
class Partner:
    """Clip `index` (position in the record list) is a `kind` hard negative of some clip."""

    index: int
    kind: str


def words_of(caption: str) -> tuple[str, ...]:
    """Lower-cased word tokens; punctuation dropped ("X, then Y" and "X then Y" are the same)."""
    return tuple(_WORD.findall(caption.lower()))


def group_partners(groups: Sequence[str | None]) -> list[list[Partner]]:
    """Clips sharing a group id are each other's partners (kind "group"); None = no group."""
    members: dict[str, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        if group is not None:
            members[group].append(index)
    out: list[list[Partner]] = [[] for _ in groups]
    for clips in members.values():
        for index in clips:
            out[index] = [Partner(other, "group") for other in clips if other != index]
    return out


def _bucket_pairs(clips: list[int], max_bucket: int, rng: np.random.Generator):
    """Clip pairs (a < b or a > b, a != b) of one bucket; at most `max_bucket` per clip."""
    distinct = sorted(set(clips))
    if len(distinct) < 2:
        return
    if len(distinct) <= max_bucket + 1:
        for i, a in enumerate(distinct):
            for b in distinct[i + 1:]:
                yield a, b
        return
    ring = [distinct[i] for i in rng.permutation(len(distinct))]
    for i, a in enumerate(ring):
        for step in range(1, max_bucket // 2 + 1):  # each clip meets max_bucket others (both sides of the ring)
            yield a, ring[(i + step) % len(ring)]


def mine_caption_partners(captions: Sequence[Sequence[str]], *, max_partners: int = 4, max_bucket: int = 32,
                          kinds: Sequence[str] = ("order", "attribute"), seed: int = 0) -> list[list[Partner]]:
    """Partners of each clip (`captions[i]` = all captions of clip i) mined from caption text.

    Returns one list per clip, best-supported first, at most `max_partners` long, never holding
    the clip itself; kinds "order" (same words, other order) and "attribute" (one content word
    changed). Deterministic for a given `seed` (it only orders over-full buckets).
    """
    if max_partners < 1 or max_bucket < 2:
        raise ConfigError(f"max_partners ({max_partners}) must be >= 1 and max_bucket ({max_bucket}) >= 2")
    unknown = set(kinds) - {"order", "attribute"}
    if unknown:
        raise ConfigError(f"unknown mined hard-negative kind(s) {sorted(unknown)}: use 'order' and/or 'attribute'")
    rng = np.random.default_rng(seed)
    support: dict[tuple[int, int, str], int] = defaultdict(int)

    tokenised = [[words_of(c) for c in clip_captions] for clip_captions in captions]
    if "order" in kinds:
        # sorted multiset → {word sequence → clips}; a pair needs two DIFFERENT sequences.
        by_multiset: dict[tuple[str, ...], dict[tuple[str, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
        for clip, sequences in enumerate(tokenised):
            for sequence in set(sequences):
                if len(sequence) > 1:
                    by_multiset[tuple(sorted(sequence))][sequence].append(clip)
        for variants in by_multiset.values():
            if len(variants) < 2:
                continue
            sequence_of = {}
            for sequence, clips in variants.items():
                for clip in clips:
                    sequence_of.setdefault(clip, set()).add(sequence)
            for a, b in _bucket_pairs([c for clips in variants.values() for c in clips], max_bucket, rng):
                if not sequence_of[a] & sequence_of[b]:  # same words in another order, no identical caption
                    support[(min(a, b), max(a, b), "order")] += 1

    if "attribute" in kinds:
        # "words before␟words after" (one slot masked; a string, so its hash is cached) → [(clip, word)]
        by_masked: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for clip, sequences in enumerate(tokenised):
            for sequence in set(sequences):
                text = " ".join(sequence)
                start = 0
                for word in sequence:
                    end = start + len(word)
                    if word not in STOPWORDS:
                        by_masked[text[:start] + "\x1f" + text[end:]].append((clip, word))
                    start = end + 1
        buckets: list[dict[int, set[str]]] = []  # per shared context: clip → words filling the slot
        for entries in by_masked.values():
            if len(entries) > 1:
                words_by_clip: dict[int, set[str]] = defaultdict(set)
                for clip, word in entries:
                    words_by_clip[clip].add(word)
                buckets.append(words_by_clip)
        del by_masked
        synonyms: set[tuple[str, str]] = set()  # words that fill one slot within ONE clip's captions
        for words_by_clip in buckets:
            for words in words_by_clip.values():
                if len(words) > 1:
                    synonyms.update((u, v) for u in words for v in words if u != v)
        for words_by_clip in buckets:
            if len(words_by_clip) < 2:
                continue
            for a, b in _bucket_pairs(list(words_by_clip), max_bucket, rng):
                if words_by_clip[a] & words_by_clip[b]:
                    continue  # a shared word here means the two clips have an identical caption
                if any((u, v) not in synonyms for u in words_by_clip[a] for v in words_by_clip[b]):
                    support[(min(a, b), max(a, b), "attribute")] += 1

    ranked: list[dict[int, tuple[int, str]]] = [dict() for _ in captions]
    for (a, b, kind), count in support.items():
        for mine, other in ((a, b), (b, a)):
            best = ranked[mine].get(other)
            # one partner entry per clip pair; "order" wins a tie (the rarer, more useful signal)
            if best is None or (count, kind == "order") > (best[0], best[1] == "order"):
                ranked[mine][other] = (count, kind)
    out = []
    for mine, candidates in enumerate(ranked):
        order = sorted(candidates.items(), key=lambda item: (-item[1][0], item[1][1] != "order", item[0]))
        out.append([Partner(other, kind) for other, (_, kind) in order[:max_partners]])
    return out


def partners_for(records: Sequence[Any], source: str, **mine_options: Any) -> list[list[Partner]] | None:
    """Hard-negative partners of `records` (VideoRecords) from `source`: "none" → None;
    "groups" → the dataset's `meta["group"]` (clips without one stand alone); "mined" →
    `mine_caption_partners` on the captions."""
    if source not in HARD_NEGATIVE_SOURCES:
        raise ConfigError(f"unknown hard-negative source {source!r}: use one of {', '.join(HARD_NEGATIVE_SOURCES)}")
    if source == "none":
        return None
    if source == "groups":
        return group_partners([_group_of(r.meta) for r in records])
    return mine_caption_partners([r.captions for r in records], **mine_options)


def _group_of(meta: Mapping[str, Any]) -> str | None:
    group = meta.get("group")
    return None if group is None else str(group)


def partner_links(records: Sequence[Any]) -> list[list[dict[str, str]]]:
    """Mined partners of `records` as the synthetic benchmark's metadata links
    (``[{"video_id": ..., "kind": "order" | "attribute"}, ...]`` per record), so evaluation can
    report hard-negative pair accuracy on data that carries no partner metadata."""
    mined = mine_caption_partners([r.captions for r in records])
    return [[{"video_id": records[p.index].video_id, "kind": p.kind} for p in ps] for ps in mined]
