"""Quality on the synthetic benchmark: train every synth preset and print the README table.

    python benchmarks/synth_quality.py --data data/synth --runs runs/synth [--only "meanP;seqTransf"]

Chain (each step resumes/reuses a finished run in --runs):
  synth-clip-tiny (end-to-end, the 'pretrained CLIP')
    ├─ synth-meanp-tiny, synth-seqtransf-tiny, synth-tcmgc-tiny     (--init clip, frozen-tower features)
    ├─ synth-pig-baseline-tiny, synth-pig-stage1-tiny → synth-pig-tiny
    └─ (GRDR: see benchmarks/recall.py and `vidseek eval` on a synth-grdr-tiny run)
Every model is selected on the validation split and evaluated once on test. Rows: T2V / V2T
R@1, R@5, MnR, and the hard-negative subset (pairwise accuracy own video vs order-swapped or
one-attribute-changed partner; R@1 among queries that have an order-swapped partner).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

# (row label, preset, init-from row label or None, model_config overrides)
CHAIN: list[tuple[str, str, str | None, dict]] = [
    ("CLIP (end-to-end)", "synth-clip-tiny", None, {}),
    ("meanP", "synth-meanp-tiny", "CLIP (end-to-end)", {}),
    ("seqTransf", "synth-seqtransf-tiny", "CLIP (end-to-end)", {}),
    ("TC-MGC", "synth-tcmgc-tiny", "CLIP (end-to-end)", {}),
    ("TC-MGC, SDR off", "synth-tcmgc-tiny", "CLIP (end-to-end)", {"sdr": False}),
    ("TC-MGC, LSA -> avg", "synth-tcmgc-tiny", "CLIP (end-to-end)", {"aggregation": "avg"}),
    ("PIG baseline", "synth-pig-baseline-tiny", "CLIP (end-to-end)", {}),
    ("PIG stage 1", "synth-pig-stage1-tiny", "CLIP (end-to-end)", {}),
    ("PIG (gen. weight 1)", "synth-pig-tiny", "PIG stage 1", {}),
    ("PIG, gen. weight 0", "synth-pig-tiny", "PIG stage 1", {"generation_weight": 0.0}),
    ("PIG, gen. weight 0.5", "synth-pig-tiny", "PIG stage 1", {"generation_weight": 0.5}),
    ("PIG, gen. weight 2", "synth-pig-tiny", "PIG stage 1", {"generation_weight": 2.0}),
]
BY_LABEL = {label: (preset, init, model) for label, preset, init, model in CHAIN}


def run_dir(runs: Path, label: str) -> Path:
    return runs / re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def with_dependencies(labels: list[str]) -> list[str]:
    """The labels plus every run they --init from, in chain order."""
    needed: set[str] = set()
    for label in labels:
        while label is not None:
            if label not in BY_LABEL:
                raise SystemExit(f"unknown row {label!r}: choose from {list(BY_LABEL)}")
            needed.add(label)
            label = BY_LABEL[label][1]
    return [label for label, *_ in CHAIN if label in needed]


def preset_for(label: str):
    import dataclasses

    from vidseek.models.registry import get_preset

    name, _, model_overrides = BY_LABEL[label]
    preset = get_preset(name)
    return dataclasses.replace(preset, model_config={**preset.model_config, **model_overrides})


def train_one(label: str, data: Path, runs: Path) -> float:
    from vidseek.train.loop import train

    out = run_dir(runs, label)
    preset = preset_for(label)
    init = BY_LABEL[label][1]
    if (out / "log.jsonl").exists():
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x]
        if log and max(x["step"] for x in log) >= (preset.train.max_steps or 0) and (out / "best.pt").exists():
            return 0.0
    t0 = time.perf_counter()
    train(preset, data, out, init_from=str(run_dir(runs, init)) if init else None,
          resume=(out / "last.pt").exists(), progress=False)
    return time.perf_counter() - t0


def evaluate(label: str, data: Path, runs: Path) -> dict[str, float]:
    from vidseek.eval.runner import evaluate_model
    from vidseek.models.registry import Preset
    from vidseek.train.checkpoint import load_model
    from vidseek.train.loop import load_split, video_source

    model, payload = load_model(run_dir(runs, label))
    preset = Preset.from_dict(payload["preset"])
    test = load_split(preset, data, "test")
    source = video_source(preset, test, run_dir(runs, label), None, model, False)
    metrics = evaluate_model(model, test, source, preset.words)
    metrics["best_step"] = payload["step"]
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--only", default="", help="row labels separated by ; (plus the runs they start from)")
    args = parser.parse_args()
    labels = with_dependencies([x.strip() for x in args.only.split(";") if x.strip()] or [c[0] for c in CHAIN])
    rows = []
    for label in labels:
        seconds = train_one(label, args.data, args.runs)
        m = evaluate(label, args.data, args.runs)
        rows.append((label, m, seconds))
        print(f"{label}: trained in {seconds:.0f}s (0 = reused), best val step {m['best_step']}, "
              f"test T2V R@1 {m['t2v.R@1']:.1f}", flush=True)
    num_videos = rows[0][1]["num_videos"] if rows else 0
    print()
    print(f"| model | T2V R@1 | R@5 | MnR | V2T R@1 | R@5 | order-pair acc | attribute-pair acc | order-subset R@1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| chance | {100 / num_videos:.1f} | {500 / num_videos:.1f} | {(num_videos + 1) / 2:.1f} | {100 / num_videos:.1f} | "
          f"{500 / num_videos:.1f} | 50.0 | 50.0 | {100 / num_videos:.1f} |")
    for name, m, _ in rows:
        print(f"| {name} | {m['t2v.R@1']:.1f} | {m['t2v.R@5']:.1f} | {m['t2v.MnR']:.1f} | {m['v2t.R@1']:.1f} | "
              f"{m['v2t.R@5']:.1f} | {m.get('hardneg.order.acc', float('nan')):.1f} | "
              f"{m.get('hardneg.attribute.acc', float('nan')):.1f} | {m.get('hardneg.order.t2v.R@1', float('nan')):.1f} |")


if __name__ == "__main__":
    main()
