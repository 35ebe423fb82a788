"""Mined hard negatives on the synthetic benchmark with its partner metadata stripped.

    python benchmarks/mined_hard_negatives.py --data data/synth --runs runs/mined \
        [--preset synth-seqtransf-tiny] [--init runs/synth/clip-end-to-end] [--max-steps N] [--seeds 1] [--with-groups]

1. Writes `<runs>/generic/annotations.jsonl`: the dataset as a user's generic JSONL would be,
   only `video`, `captions` and `split` per clip (no ids, no groups, no partner links).
2. Trains the preset on it twice per seed, `--hard-negatives none` and `--hard-negatives mined`
   (same steps, same seed; validation sees caption-mined pairs in both, since the data has none).
   `--with-groups` adds the reference: `--hard-negatives groups` on the ORIGINAL data (planted twins).
3. Evaluates all on the test split with the ORIGINAL planted order/attribute twins as the ground
   truth (not the mined ones), and prints mean [95% bootstrap CI over queries] per source and the paired Δ mined − none.
Also prints how many of the planted twins of the training split the caption miner recovered.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SOURCES = ("none", "mined")
METRICS = [("T2V R@1", "t2v.R@1"), ("order-pair acc", "hardneg.order.acc"),
           ("attribute-pair acc", "hardneg.attribute.acc"), ("order-subset R@1", "hardneg.order.t2v.R@1")]


def strip_metadata(data: Path, out: Path) -> Path:
    """A generic JSONL copy of `data` with only video (absolute path), captions and split."""
    from vidseek.data.jsonl import annotation_file
    from vidseek.utils import atomic_write_text

    source = annotation_file(data)
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "annotations.jsonl", "".join(
        json.dumps({"video": str((source.parent / r["video"]).absolute()), "captions": r["captions"],
                    "split": r["split"]}) + "\n" for r in rows))
    return out


def with_planted_pairs(generic, original):
    """The generic test split (ids = video paths, so the run's features apply) carrying the
    original split's planted twins as partner metadata: the ground truth for the pair accuracies."""
    import dataclasses

    path_of = {r.video_id: str(r.path) for r in original.records}
    links = {str(r.path): [{**link, "video_id": path_of[link["video_id"]]} for link in r.meta.get("hard_negatives", [])
                           if link["video_id"] in path_of] for r in original.records}
    records = [dataclasses.replace(r, meta={"hard_negatives": links[str(r.path)]}) for r in generic.records]
    return dataclasses.replace(generic, records=records)


def miner_recovery(data: Path) -> str:
    """Planted twins of the training split that the caption miner finds, per kind."""
    from vidseek.data.hard_negatives import mine_caption_partners
    from vidseek.data.jsonl import load_jsonl

    records = load_jsonl(data, "train").records
    index = {r.video_id: i for i, r in enumerate(records)}
    mined = mine_caption_partners([r.captions for r in records])
    found = {(i, p.index) for i, ps in enumerate(mined) for p in ps}
    parts = []
    for kind in ("order", "attribute"):
        planted = {(i, index[link["video_id"]]) for i, r in enumerate(records)
                   for link in r.meta.get("hard_negatives", []) if link["kind"] == kind and link["video_id"] in index}
        mined_kind = sum(p.kind == kind for ps in mined for p in ps)
        parts.append(f"{kind}: {len(planted & found)}/{len(planted)} planted twins found, {mined_kind} mined links")
    return f"{sum(bool(p) for p in mined)} of {len(records)} training clips got a partner; " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a `vidseek synth` folder (with partner metadata)")
    parser.add_argument("--runs", type=Path, required=True)
    parser.add_argument("--preset", default="synth-seqtransf-tiny")
    parser.add_argument("--init", type=Path, default=None, help="checkpoint/run to start from (e.g. the synth CLIP run)")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--with-groups", action="store_true", help="also train with the planted twins (groups) as a reference")
    args = parser.parse_args()

    from vidseek.eval.bootstrap import compare_runs, summarize_runs
    from vidseek.eval.report import ci_cells
    from vidseek.eval.runner import evaluate_model
    from vidseek.models.registry import get_preset
    from vidseek.train.checkpoint import load_model
    from vidseek.train.loop import load_split, train, video_source

    generic = strip_metadata(args.data, args.runs / "generic")
    print(miner_recovery(args.data), flush=True)
    sources = SOURCES + (("groups",) if args.with_groups else ())
    outcomes: dict[str, list] = {source: [] for source in sources}
    details: dict[str, list[str]] = {source: [] for source in sources}
    for seed in range(args.seeds):
        for source in sources:
            base = get_preset(args.preset)
            preset = base.with_overrides(hard_negatives=source, max_steps=args.max_steps,
                                        batch_size=args.batch_size, seed=base.train.seed + seed)
            out = args.runs / f"{source}-s{seed}"
            t0 = time.perf_counter()
            if not (out / "best.pt").exists() or (out / "last.pt").exists() and _unfinished(out, preset):
                train(preset, args.data if source == "groups" else generic, out, init_from=str(args.init) if args.init else None,
                      resume=(out / "last.pt").exists(), progress=False)
            seconds = time.perf_counter() - t0
            model, payload = load_model(out)
            test = with_planted_pairs(load_split(preset, generic, "test"), load_split(preset, args.data, "test"))
            source_videos = video_source(preset, test, out, None, model, False)
            per_query: dict = {}
            metrics = evaluate_model(model, test, source_videos, preset.words, outcomes_out=per_query)
            outcomes[source].append(per_query["outcomes"])
            details[source].append(f"seed {seed}: best val step {payload['step']}, {seconds:.0f} s")
            print(f"{source} seed {seed}: best step {payload['step']} ({seconds:.0f} s), test R@1 {metrics['t2v.R@1']:.1f}, "
                  f"order {metrics.get('hardneg.order.acc', float('nan')):.1f}, "
                  f"attribute {metrics.get('hardneg.attribute.acc', float('nan')):.1f}", flush=True)
    num_queries = len(outcomes["none"][0].query_ids)
    print(f"\n{args.preset}, {args.seeds} seed(s), partner metadata stripped for training; test split of {args.data} "
          f"({num_queries} queries); mean [95% bootstrap CI over queries]\n")
    print("| hard negatives | " + " | ".join(h for h, _ in METRICS) + " | runs |")
    print("|---|" + "---|" * (len(METRICS) + 1))
    for source in sources:
        cells = ci_cells(summarize_runs(outcomes[source]), [k for _, k in METRICS])
        print(f"| {source} | " + " | ".join(cells) + f" | {'; '.join(details[source])} |")
    for baseline in [b for b in ("groups", "none") if b in outcomes]:
        cells = ci_cells(compare_runs(outcomes["mined"], outcomes[baseline]), [k for _, k in METRICS])
        print(f"| Δ mined − {baseline} (paired) | " + " | ".join(cells) + " | |")


def _unfinished(run: Path, preset) -> bool:
    """Whether a run folder stopped before the preset's last step (then it is resumed)."""
    log = run / "log.jsonl"
    steps = [json.loads(line).get("step", 0) for line in log.read_text().splitlines() if line] if log.exists() else []
    return not steps or max(steps) < (preset.train.max_steps or 0)


if __name__ == "__main__":
    main()
