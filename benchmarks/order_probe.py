"""Which side fails to learn order on the synthetic benchmark: the frame features or the temporal head?

    python benchmarks/order_probe.py --data data/synth --features runs/clip/features-8f \\
        [--inputs cls,cls+diff,grid,pixels] [--heads linear,mlp,transformer,transformer-big] [--text runs/clip]

Supervised probes on *frozen* per-frame features, no text tower and no contrastive loss
(docs/synthetic-recipe.md, "Round 3"):

* **order probe.** Every two-step sequence clip ("X, then Y") of the train split is a labelled
  example: a head reads the clip's T frame features and predicts, for each half of the clip, who
  moves (colour, shape) and how (one of `synth.MOTIONS`). On the evaluation split the probe
  decides the order of the clip's two events, (e1, e2) or (e2, e1), by the summed log-probabilities
  of the half heads: chance 50 %. `order.twin` is the same decision made the way the retrieval
  benchmark asks it (the order-pair accuracy of `vidseek eval`): for an order-twin pair (A, B)
  and the caption of A, is A's margin for (e1, e2) over (e2, e1) larger than B's? This is
  the video side with a perfect text side, so its accuracy bounds what any temporal model on
  these features can learn from this much data (CLIP4Clip's seqTransf, Luo et al. 2022 §3.3,
  is one such head).
* **state probe.** A ridge regression from one frame's features to the x, y (fractions of the
  frame side) and scale of the only object of one-object clips, as `synth.object_states` draws
  them at the frame's time: R² on the evaluation split. "moves left, then grows" can only be
  ordered if the frames say where and how big the object is.
* **text probe** (`--text RUN`): the same half heads on the sentence features of the run's text
  tower, one row per caption — does the text side keep "X, then Y" apart from "Y, then X"?

Inputs: `cls` (the store's per-frame CLS features), `cls+diff` (plus the difference to the
previous frame: motion made explicit), `grid` (CLS plus the patch tokens mean-pooled to a 3×3
grid, a store extracted with patches), `pixels` (the rendered frames at 16×16, `render_clip`:
what the tower was given, an upper reference for the probe itself).
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vidseek.data.synth import COLOURS, MOTIONS, SHAPES, object_states, render_clip
from vidseek.models.twotower import pool_patch_grid
from vidseek.video.sampling import uniform_indices

# What each half head predicts about the event of that half: (field, class names).
EVENT_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (("colour", tuple(COLOURS)), ("shape", SHAPES),
                                                         ("motion", MOTIONS))
FIELD_SIZES = tuple(len(names) for _, names in EVENT_FIELDS)
INPUTS = ("cls", "cls+diff", "grid", "pixels")
HEADS = ("linear", "mlp", "transformer", "transformer-big")
PIXEL_SIDE = 16  # rendered frames are block-averaged to this side for the `pixels` input


def event_label(meta: dict[str, Any], event: dict[str, Any]) -> tuple[int, ...]:
    """(colour, shape, motion) class indices of one event: who moves and how."""
    obj = meta["objects"][event["object"]]
    values = {"colour": obj["colour"], "shape": obj["shape"], "motion": event["motion"]}
    return tuple(names.index(values[field]) for field, names in EVENT_FIELDS)


def sequence_labels(meta: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(first event, second event) labels of a two-step sequence clip; None for any other clip."""
    events = meta["events"]
    if meta["kind"] != "sequence" or len(events) != 2 or {e["step"] for e in events} != {0, 1}:
        return None
    first, second = sorted(events, key=lambda e: e["step"])
    return event_label(meta, first), event_label(meta, second)


def frame_times(clip_frames: int, sampled: int) -> np.ndarray:
    """Times in [0, 1] of the `sampled` frames uniform sampling takes from a `clip_frames` clip."""
    return np.asarray(uniform_indices(clip_frames, sampled), dtype=np.float64) / (clip_frames - 1)


def half_log_probs(logits: Tensor) -> list[list[Tensor]]:
    """Split [n, 2·Σ fields] logits into log-probabilities per half and field: out[half][field] [n, C]."""
    per_half = sum(FIELD_SIZES)
    out = []
    for half in range(2):
        chunk = logits[:, half * per_half:(half + 1) * per_half]
        out.append([F.log_softmax(part, dim=-1) for part in chunk.split(list(FIELD_SIZES), dim=-1)])
    return out


def order_margin(logits: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """log p(first in half 1, second in half 2) − log p(second in half 1, first in half 2), per row.

    `first`, `second`: [n, fields] class indices of the true first and second events. Positive
    means the probe puts the events in their true order.
    """
    halves = half_log_probs(logits)

    def joint(a: Tensor, b: Tensor) -> Tensor:
        return sum(halves[0][f].gather(1, a[:, f:f + 1]).squeeze(1) + halves[1][f].gather(1, b[:, f:f + 1]).squeeze(1)
                   for f in range(len(FIELD_SIZES)))

    return joint(first, second) - joint(second, first)


def half_loss(logits: Tensor, first: Tensor, second: Tensor) -> Tensor:
    """Sum over halves and fields of the mean cross-entropy of the true class."""
    halves = half_log_probs(logits)
    return -sum(halves[h][f].gather(1, target[:, f:f + 1]).mean()
                for h, target in enumerate((first, second)) for f in range(len(FIELD_SIZES)))


def twin_accuracy(margins: np.ndarray, ids: Sequence[str], pairs: Sequence[tuple[str, str]]) -> float:
    """Percentage of order-twin pairs (A, B) for which A's own-order margin beats B's (ties: half).

    B shows A's events in the other order, so B's margin for *B's* order is −(B's margin for A's
    order): A wins for A's caption when margin(A) + margin(B) > 0, as `vidseek eval` scores an
    order pair with a perfect text side. Each unordered pair is counted from both captions.
    """
    if not pairs:
        raise ValueError("no order-twin pairs in the evaluation split")
    at = {video_id: float(m) for video_id, m in zip(ids, margins)}
    wins = [1.0 if at[a] + at[b] > 0 else 0.5 if at[a] + at[b] == 0 else 0.0 for a, b in pairs]
    return 100.0 * float(np.mean(wins))


class TemporalProbe(nn.Module):
    """Per-frame linear map, learned frame positions, `layers` pre-LN transformer blocks (the
    seqTransf shape, Luo et al. 2022 §3.3), then every frame's output read by one linear layer."""

    def __init__(self, frames: int, dim: int, out: int, width: int = 64, layers: int = 2, dropout: float = 0.1):
        super().__init__()
        self.inp = nn.Linear(dim, width)
        self.position = nn.Parameter(torch.zeros(1, frames, width))
        block = nn.TransformerEncoderLayer(width, max(1, width // 32), 4 * width, dropout, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.out = nn.Linear(frames * width, out)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.inp(x) + self.position)
        return self.out(h.flatten(1))


def make_head(kind: str, frames: int, dim: int, out: int) -> nn.Module:
    """A probe head over [n, frames, dim] inputs (`HEADS`)."""
    if kind == "linear":
        return nn.Sequential(nn.Flatten(), nn.Linear(frames * dim, out))
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(frames * dim, 256), nn.GELU(), nn.Dropout(0.2),
                             nn.Linear(256, out))
    if kind == "transformer":
        return TemporalProbe(frames, dim, out)
    if kind == "transformer-big":
        return TemporalProbe(frames, dim, out, width=128, layers=4)
    raise ValueError(f"unknown probe head {kind!r}: choose from {', '.join(HEADS)}")


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Z-score every feature column with the train rows' mean and SD (the last axis)."""
    axes = tuple(range(train.ndim - 1))
    mean, sd = train.mean(axes), train.std(axes) + 1e-6
    return [(a - mean) / sd for a in (train, *others)]


@dataclass
class OrderProbeResult:
    head: str
    order_acc: float  # % of evaluation sequence clips whose two events the probe orders correctly
    twin_acc: float | None  # % order-twin pairs decided correctly (vidseek eval's order-pair acc)
    half_acc: dict[str, float]  # % argmax accuracy per half and field, e.g. "first.motion"
    train_order_acc: float
    seconds: float


def fit_order_probe(head: str, x_train: np.ndarray, y_train: tuple[np.ndarray, np.ndarray], x_eval: np.ndarray,
                    y_eval: tuple[np.ndarray, np.ndarray], eval_ids: Sequence[str] | None = None,
                    twin_pairs: Sequence[tuple[str, str]] = (), epochs: int = 300, lr: float = 1e-3,
                    weight_decay: float = 1e-2, seed: int = 0) -> OrderProbeResult:
    """Train one half-head probe full-batch (AdamW) on x_train [n, T, D] and score it on x_eval.

    `y_*` = (first, second) int arrays [n, fields] (`sequence_labels`). Fixed hyper-parameters for
    every input and head, so the comparison does not depend on tuning on the evaluation split.
    """
    began = time.perf_counter()
    torch.manual_seed(seed)
    xt, xe = (torch.as_tensor(a, dtype=torch.float32) for a in standardise(x_train, x_eval))
    ft, st = (torch.as_tensor(a, dtype=torch.long) for a in y_train)
    fe, se = (torch.as_tensor(a, dtype=torch.long) for a in y_eval)
    model = make_head(head, xt.shape[1], xt.shape[2], 2 * sum(FIELD_SIZES))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    batch = 256
    for _ in range(epochs):
        model.train()
        for rows in torch.randperm(len(xt), generator=generator).split(batch):
            loss = half_loss(model(xt[rows]), ft[rows], st[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():
        train_margin = order_margin(model(xt), ft, st).numpy()
        logits = model(xe)
        margin = order_margin(logits, fe, se).numpy()
        halves = half_log_probs(logits)
    half_acc = {}
    for h, (name, target) in enumerate((("first", fe), ("second", se))):
        for f, (field, _) in enumerate(EVENT_FIELDS):
            half_acc[f"{name}.{field}"] = 100.0 * float((halves[h][f].argmax(1) == target[:, f]).float().mean())
    twin = twin_accuracy(margin, eval_ids, twin_pairs) if eval_ids is not None and twin_pairs else None
    return OrderProbeResult(head, _pct_positive(margin), twin, half_acc, _pct_positive(train_margin),
                            time.perf_counter() - began)


def _pct_positive(margin: np.ndarray) -> float:
    return 100.0 * float(np.mean(np.where(margin > 0, 1.0, np.where(margin == 0, 0.5, 0.0))))


def ridge_r2(x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray,
             alpha: float = 1.0) -> np.ndarray:
    """Held-out R² per target column of a ridge regression (standardised inputs, intercept)."""
    xt, xe = standardise(x_train, x_eval)
    xt = np.hstack([xt, np.ones((len(xt), 1))])
    xe = np.hstack([xe, np.ones((len(xe), 1))])
    penalty = alpha * np.eye(xt.shape[1])
    penalty[-1, -1] = 0.0
    weights = np.linalg.solve(xt.T @ xt + penalty, xt.T @ y_train)
    residual = ((xe @ weights - y_eval) ** 2).sum(0)
    total = ((y_eval - y_eval.mean(0)) ** 2).sum(0)
    return 1.0 - residual / total


def object_state_targets(meta: dict[str, Any], times: np.ndarray) -> np.ndarray | None:
    """[T, 3] x, y, scale of the clip's only object at `times`; None unless it has one object."""
    if len(meta["objects"]) != 1:
        return None
    states = object_states(meta, times)
    return np.stack([states["x"][0], states["y"][0], states["scale"][0]], axis=1)


# ----------------------------------------------------------------------------------------------
# Inputs.

def rendered_pixels(meta: dict[str, Any], clip_frames: int, size: int, indices: Sequence[int]) -> np.ndarray:
    """[T, 3·PIXEL_SIDE²] the sampled frames as rendered, block-averaged to PIXEL_SIDE, in 0..1."""
    frames = render_clip(meta, clip_frames, size)[list(indices)].astype(np.float32) / 255.0
    k = size // PIXEL_SIDE
    small = frames.reshape(len(indices), PIXEL_SIDE, k, PIXEL_SIDE, k, 3).mean(axis=(2, 4))
    return small.reshape(len(indices), -1)


def build_inputs(kind: str, records: Sequence[dict[str, Any]], store: Any, clip_frames: int, size: int) -> np.ndarray:
    """[n, T, D] probe inputs of `kind` (`INPUTS`) for `records`, from the store's frames (or from
    the store a record names under "store": every record of one call must name the same)."""
    keys = [r["video_id"] for r in records]
    store = records[0].get("store", store) if records else store
    if kind == "pixels":
        indices = uniform_indices(clip_frames, store.frames)
        return np.stack([rendered_pixels(r["meta"], clip_frames, size, indices) for r in records])
    cls = store.frame_features(keys)[0].astype(np.float32)
    if kind == "cls":
        return cls
    if kind == "cls+diff":
        diff = np.concatenate([np.zeros_like(cls[:, :1]), np.diff(cls, axis=1)], axis=1)
        return np.concatenate([cls, diff], axis=2)
    if kind == "grid":
        patches = torch.from_numpy(store.patch_features(keys).astype(np.float32))
        return np.concatenate([cls, pool_patch_grid(patches, 3).numpy()], axis=2)
    raise ValueError(f"unknown probe input {kind!r}: choose from {', '.join(INPUTS)}")


def load_records(data: Path) -> list[dict[str, Any]]:
    """The annotation records of a `vidseek synth` folder."""
    return [json.loads(line) for line in (data / "annotations.jsonl").read_text().splitlines() if line]


def order_twin_pairs(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(A, B) for every order-twin link among `records` (both directions, as the benchmark counts)."""
    present = {r["video_id"] for r in records}
    return [(r["video_id"], link["video_id"]) for r in records for link in r["meta"]["hard_negatives"]
            if link["kind"] == "order" and link["video_id"] in present]


def text_features(run: Path, captions: Sequence[str]) -> np.ndarray:
    """[n, D] sentence features of `captions` from the text tower of the checkpoint in `run`."""
    from vidseek.train.checkpoint import load_model

    model, payload = load_model(run)
    context = int(payload["preset"]["words"])
    out = []
    with torch.no_grad():
        for start in range(0, len(captions), 256):
            tokens = model.clip.tokenize(list(captions[start:start + 256]), context_length=context)
            out.append(model.encode_text(tokens).sentence.float().numpy())
    return np.concatenate(out)


# ----------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `vidseek synth` folder")
    parser.add_argument("--features", type=Path, required=True, help="a feature store of its clips (vidseek extract)")
    parser.add_argument("--inputs", default="cls,cls+diff,grid,pixels")
    parser.add_argument("--heads", default="linear,mlp,transformer,transformer-big")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--train-data", type=Path, default=None,
                        help="train the probes on every clip of this other synth folder (e.g. another --seed) instead")
    parser.add_argument("--train-features", type=Path, default=None, help="its feature store (with --train-data)")
    parser.add_argument("--eval-split", default="val", help="val for every decision; never tune on test")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--text", type=Path, default=None, help="a run folder whose text tower to probe")
    parser.add_argument("--json", type=Path, default=None, help="write every number here too")
    args = parser.parse_args()

    from vidseek.store.shards import FeatureStore

    if (args.train_data is None) != (args.train_features is None):
        raise SystemExit("--train-data and --train-features go together")
    config = json.loads((args.data / "synth_config.json").read_text())
    clip_frames, size = int(config["frames"]), int(config["size"])
    records = load_records(args.data)
    inputs = [x.strip() for x in args.inputs.split(",") if x.strip()]
    heads = [x.strip() for x in args.heads.split(",") if x.strip()]
    for name in inputs:
        if name not in INPUTS:
            raise SystemExit(f"unknown --inputs {name!r}: choose from {', '.join(INPUTS)}")
    for name in heads:
        if name not in HEADS:
            raise SystemExit(f"unknown --heads {name!r}: choose from {', '.join(HEADS)}")
    results: dict[str, Any] = {"order": [], "state": [], "text": []}
    store = FeatureStore(args.features)
    times = frame_times(clip_frames, store.frames)
    split = {s: [r for r in records if r["split"] == s] for s in (args.train_split, args.eval_split)}
    if args.train_data is not None:  # every clip of the other folder, read from its own store
        other = FeatureStore(args.train_features)
        if other.frames != store.frames or json.loads((args.train_data / "synth_config.json").read_text()) \
                ["frames"] != clip_frames:
            raise SystemExit("--train-data/--train-features must have the frame counts of --data/--features")
        args.train_split = "other"
        split["other"] = [{**r, "store": other} for r in load_records(args.train_data)]
    seq = {s: [r for r in rs if sequence_labels(r["meta"]) is not None] for s, rs in split.items()}
    labels = {s: tuple(np.array([sequence_labels(r["meta"])[h] for r in rs]) for h in (0, 1)) for s, rs in seq.items()}
    pairs = order_twin_pairs(seq[args.eval_split])
    print(f"order probe: {len(seq[args.train_split])} {args.train_split} / {len(seq[args.eval_split])} "
          f"{args.eval_split} sequence clips, {len(pairs)} order-twin comparisons; {store.frames} frames at t = "
          + ", ".join(f"{t:.2f}" for t in times), flush=True)
    print("\n| input | head | order acc (clips) | order-twin acc | first motion | second motion | first colour | "
          "train order acc | s |\n|---|---|---|---|---|---|---|---|---|", flush=True)
    for name in inputs:
        x_train = build_inputs(name, seq[args.train_split], store, clip_frames, size)
        x_eval = build_inputs(name, seq[args.eval_split], store, clip_frames, size)
        for head in heads:
            r = fit_order_probe(head, x_train, labels[args.train_split], x_eval, labels[args.eval_split],
                                [x["video_id"] for x in seq[args.eval_split]], pairs, epochs=args.epochs)
            results["order"].append({"input": name, **r.__dict__})
            print(f"| {name} | {head} | {r.order_acc:.1f} | {r.twin_acc:.1f} | {r.half_acc['first.motion']:.1f} | "
                  f"{r.half_acc['second.motion']:.1f} | {r.half_acc['first.colour']:.1f} | {r.train_order_acc:.1f} | "
                  f"{r.seconds:.0f} |", flush=True)

    one = {s: [r for r in rs if object_state_targets(r["meta"], times) is not None] for s, rs in split.items()}
    print(f"\nstate probe (ridge, one frame → the only object's x / y / scale; {len(one[args.train_split])} / "
          f"{len(one[args.eval_split])} one-object clips × {store.frames} frames)\n\n| input | x R² | y R² | scale R² |\n|---|---|---|---|")
    for name in inputs:
        xs = {s: build_inputs(name, rs, store, clip_frames, size) for s, rs in one.items()}
        ys = {s: np.stack([object_state_targets(r["meta"], times) for r in rs]) for s, rs in one.items()}
        flat = {s: (xs[s].reshape(-1, xs[s].shape[-1]), ys[s].reshape(-1, 3)) for s in xs}
        r2 = ridge_r2(*flat[args.train_split], *flat[args.eval_split])
        results["state"].append({"input": name, "x": r2[0], "y": r2[1], "scale": r2[2]})
        print(f"| {name} | {r2[0]:.2f} | {r2[1]:.2f} | {r2[2]:.2f} |", flush=True)

    if args.text is not None:
        rows = {s: [(r, c) for r in rs for c in r["captions"]] for s, rs in seq.items()}
        tx = {s: text_features(args.text, [c for _, c in rows[s]])[:, None, :] for s in rows}
        ty = {s: tuple(np.array([sequence_labels(r["meta"])[h] for r, _ in rows[s]]) for h in (0, 1)) for s in rows}
        print(f"\ntext probe ({args.text}: sentence features of {len(rows[args.train_split])} / "
              f"{len(rows[args.eval_split])} captions)\n\n| head | order acc (captions) | first motion | second motion |\n|---|---|---|---|")
        for head in ("linear", "mlp"):
            r = fit_order_probe(head, tx[args.train_split], ty[args.train_split], tx[args.eval_split],
                                ty[args.eval_split], epochs=args.epochs)
            results["text"].append(r.__dict__)
            print(f"| {head} | {r.order_acc:.1f} | {r.half_acc['first.motion']:.1f} | {r.half_acc['second.motion']:.1f} |",
                  flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
