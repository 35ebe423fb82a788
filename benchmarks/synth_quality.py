"""Quality on the synthetic benchmark: train every synth preset and print the README table.

    python benchmarks/synth_quality.py --data data/synth --runs runs/synth [--only "meanP;seqTransf"] [--seeds 3]

Chain (each step resumes/reuses a finished run in --runs):
  synth-clip-tiny (end-to-end, the 'pretrained CLIP')
    ├─ synth-meanp-tiny, synth-seqtransf-tiny, synth-tcmgc-tiny     (--init clip, frozen-tower features)
    ├─ synth-pig-baseline-tiny, synth-pig-stage1-tiny → synth-pig-tiny
    └─ (GRDR: see benchmarks/recall.py and `vidseek eval` on a synth-grdr-tiny run)
Every model is selected on the validation split and evaluated once on test. Rows: T2V / V2T
R@1, R@5, MnR, and the hard-negative subset (pairwise accuracy own video vs order-swapped or
one-attribute-changed partner; R@1 among queries that have an order-swapped partner).

`--seeds N` trains every row with training seeds preset+0 … preset+N-1 (run folders `<row>-s<k>`,
each --init from the same seed's parent) and prints each T2V metric as the mean over seeds with
its 95% bootstrap CI over test queries (`vidseek.eval.bootstrap.summarize_runs`), plus the paired
Δ (95% CI) of each method against its baseline (`compare_runs`).
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
# (method, baseline) pairs whose paired Δ is printed when both rows ran.
COMPARISONS = [("seqTransf", "meanP"), ("TC-MGC", "seqTransf"), ("PIG (gen. weight 1)", "PIG baseline")]


def run_dir(runs: Path, label: str, seed: int | None = None) -> Path:
    """A row's run folder; `seed` k (with --seeds) gets its own folder `<row>-s<k>`."""
    name = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return runs / (name if seed is None else f"{name}-s{seed}")


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


def preset_for(label: str, seed: int | None = None):
    import dataclasses

    from vidseek.models.registry import get_preset

    name, _, model_overrides = BY_LABEL[label]
    preset = get_preset(name)
    preset = dataclasses.replace(preset, model_config={**preset.model_config, **model_overrides})
    return preset if seed is None else preset.with_overrides(seed=preset.train.seed + seed)


def parent_seed(label: str, seed: int | None) -> int | None:
    """The root row (the 'pretrained CLIP') is trained once and shared by every seed, as every
    paper model starts from the same OpenAI CLIP; seeds vary the training of the methods."""
    return None if BY_LABEL[label][1] is None else seed


def shared_features(runs: Path, data: Path, frames: int) -> Path:
    """One feature store (CLS + patch tokens, every split) from the root row's frozen image tower.

    Every feature-mode row starts (directly or through PIG stage 1) from that tower and never
    trains it, so all of them read the same features; extracting once instead of once per run
    saves decoding the clips again for every row and seed.
    """
    from vidseek.store.extract import extract
    from vidseek.train.checkpoint import load_model

    root = CHAIN[0][0]
    out = run_dir(runs, root) / f"features-{frames}f"
    model, _ = load_model(run_dir(runs, root))
    extract(data, model.clip, out, frames=frames, patches=True, progress=False)
    return out


def train_one(label: str, data: Path, runs: Path, seed: int | None = None) -> float:
    from vidseek.train.loop import train

    seed = parent_seed(label, seed)
    out = run_dir(runs, label, seed)
    preset = preset_for(label, seed)
    init = BY_LABEL[label][1]
    if (out / "log.jsonl").exists():
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if x]
        if log and max(x["step"] for x in log) >= (preset.train.max_steps or 0) and (out / "best.pt").exists():
            return 0.0
    features = shared_features(runs, data, preset.frames) if preset.train.mode == "features" else None
    t0 = time.perf_counter()
    train(preset, data, out, init_from=str(run_dir(runs, init, parent_seed(init, seed))) if init else None,
          features=str(features) if features else None, resume=(out / "last.pt").exists(), progress=False)
    return time.perf_counter() - t0


def evaluate(label: str, data: Path, runs: Path, seed: int | None = None, outcomes_out: dict | None = None) -> dict[str, float]:
    from vidseek.eval.runner import evaluate_model
    from vidseek.models.registry import Preset
    from vidseek.train.checkpoint import load_model
    from vidseek.train.loop import load_split, video_source

    seed = parent_seed(label, seed)
    model, payload = load_model(run_dir(runs, label, seed))
    preset = Preset.from_dict(payload["preset"])
    test = load_split(preset, data, "test")
    features = shared_features(runs, data, preset.frames) if preset.train.mode == "features" else None
    source = video_source(preset, test, run_dir(runs, label, seed), features, model, False)
    metrics = evaluate_model(model, test, source, preset.words, outcomes_out=outcomes_out)
    metrics["best_step"] = payload["step"]
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--only", default="", help="row labels separated by ; (plus the runs they start from)")
    parser.add_argument("--seeds", type=int, default=None,
                        help="train N seeds per row and print mean with 95%% CI (default: one run per row)")
    args = parser.parse_args()
    labels = with_dependencies([x.strip() for x in args.only.split(";") if x.strip()] or [c[0] for c in CHAIN])
    if args.seeds is not None:
        return print_seeded_table(labels, args.data, args.runs, args.seeds)
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


SEEDED_METRICS = [("T2V R@1", "t2v.R@1"), ("R@5", "t2v.R@5"), ("R@10", "t2v.R@10"), ("order-pair acc", "hardneg.order.acc"),
                  ("attribute-pair acc", "hardneg.attribute.acc"), ("R@1, 120-video gallery", "t2v.R@1.gallery120")]
DELTA_METRICS = [m for m in SEEDED_METRICS if m[1] not in ("t2v.R@5", "t2v.R@10")]


def print_seeded_table(labels: list[str], data: Path, runs: Path, seeds: int) -> None:
    """Train/evaluate every row for `seeds` training seeds; print mean [95% CI] and paired Δs."""
    if seeds < 1:
        raise SystemExit(f"--seeds must be at least 1, got {seeds}")
    outcomes: dict[str, list] = {}
    seconds: dict[str, float] = {}
    for label in labels:
        for seed in range(seeds):
            seconds[label] = seconds.get(label, 0.0) + train_one(label, data, runs, seed)
            out: dict = {}
            m = evaluate(label, data, runs, seed, outcomes_out=out)
            outcomes.setdefault(label, []).append(out["outcomes"])
            print(f"{label} seed {seed}: best val step {m['best_step']}, test T2V R@1 {m['t2v.R@1']:.1f}", flush=True)
    print_seeded_tables(outcomes, seconds)


def print_seeded_tables(outcomes: dict[str, list], seconds: dict[str, float]) -> None:
    """The mean [95% CI] table of every row's seeds (`outcomes[label]`: one `QueryOutcomes` per
    seed, all on the same test queries) and the paired Δ of each method against its baseline."""
    from vidseek.eval.bootstrap import compare_runs, summarize_runs
    from vidseek.eval.report import ci_cells

    counts = sorted({len(runs) for runs in outcomes.values()})
    print(f"\n{'/'.join(map(str, counts))} training seed(s) per row; mean over seeds [95% bootstrap CI over "
          f"{len(next(iter(outcomes.values()))[0].query_ids)} test queries]\n")
    # The CI covers test-query sampling for these trained seeds; the seed-to-seed spread of R@1 is
    # printed beside it because three seeds are too few to resample (vidseek.eval.bootstrap).
    print("| model | " + " | ".join(h for h, _ in SEEDED_METRICS) + " | T2V R@1 seed SD | train s, all seeds (0 = reused) |")
    print("|---|" + "---|" * (len(SEEDED_METRICS) + 2))
    for label in outcomes:
        summary = summarize_runs(outcomes[label])
        cells = ci_cells(summary, [k for _, k in SEEDED_METRICS])
        print(f"| {label} ({len(outcomes[label])} seeds) | " + " | ".join(cells)
              + f" | {summary['t2v.R@1']['seed_sd']:.1f} | {seconds[label]:.0f} |")
    pairs = [(a, b) for a, b in COMPARISONS if a in outcomes and b in outcomes]
    if pairs:
        print("\n| method vs baseline | " + " | ".join(f"Δ {h} [95% CI]" for h, _ in DELTA_METRICS) + " |")
        print("|---|" + "---|" * len(DELTA_METRICS))
    for a, b in pairs:
        cells = ci_cells(compare_runs(outcomes[a], outcomes[b]), [k for _, k in DELTA_METRICS])
        print(f"| {a} vs {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
