"""`vidseek` command line (Typer). Every user mistake ends in one line `error: …` and exit 2.

Commands: synth, extract, presets, train, eval, compare, plot, verify, and the search-engine commands
(index, search, serve, demo) registered from `vidseek.serve.commands`.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from vidseek.errors import VidseekError
from vidseek.serve.commands import RAY_HELP, RAY_OPTION, RayCommand

cli = typer.Typer(add_completion=False, no_args_is_help=True, help="vidseek: text-to-video retrieval — train, evaluate, index, search, serve.")


@cli.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder to write the synthetic benchmark into."),
    videos: int = typer.Option(2000, "--videos", help="Number of clips (train/val/test together)."),
    seed: int = typer.Option(0, "--seed"),
    frames: int = typer.Option(16, "--frames", help="Frames per clip."),
    size: int = typer.Option(64, "--size", help="Frame side in pixels."),
    extra_train: int = typer.Option(0, "--extra-train", help="More clips, all training, after the --videos ones "
                                    "(whose val/test stay the same)."),
) -> None:
    """Render the deterministic synthetic video–text benchmark (mp4 + JSONL + MSR-VTT layout)."""
    from vidseek.data.synth import SynthConfig, generate

    summary = generate(out, SynthConfig(num_videos=videos, seed=seed, frames=frames, size=size,
                                        extra_train_videos=extra_train))
    typer.echo(f"wrote {summary.written} clips, reused {summary.reused}; splits {summary.counts}; "
               f"hard-negative pairs {summary.hard_negative_pairs} → {summary.out_dir}")


@cli.command(cls=RayCommand)
def extract(
    source: Path = typer.Argument(..., help="Dataset folder, .jsonl file, or a folder of videos."),
    out: Path = typer.Option(..., "--out", help="Feature store folder (created or resumed)."),
    model: str = typer.Option("ViT-B-32", "--model", help="CLIP config: ViT-B-32, ViT-B-16, tiny, …"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Local CLIP weights file (OpenAI .pt, open_clip, HF)."),
    frames: int = typer.Option(12, "--frames"),
    patches: bool = typer.Option(False, "--patches", help="Also store patch tokens (PIG)."),
    split: Optional[str] = typer.Option(None, "--split", help="Only this split of a dataset."),
    segment_seconds: Optional[float] = typer.Option(None, "--segment-seconds", help="Cut long videos into windows."),
    overlap: float = typer.Option(0.0, "--overlap", help="Window overlap in seconds."),
    batch_size: int = typer.Option(8, "--batch-size"),
    workers: int = typer.Option(2, "--workers", help="Background decoding workers."),
    ray: Optional[str] = typer.Option(None, RAY_OPTION, metavar="[ADDRESS]", help=RAY_HELP),
) -> None:
    """Extract per-frame CLIP features into a resumable feature store."""
    from vidseek.encoders import build_clip
    from vidseek.store.extract import extract as run_extract
    from vidseek.store.ray_ingest import runner_for

    encoder = build_clip(model, weights=weights)
    summary = run_extract(source, encoder, out, frames=frames, patches=patches, split=split,
                          segment_seconds=segment_seconds, overlap_seconds=overlap, batch_size=batch_size, workers=workers,
                          runner=runner_for(ray))
    typer.echo(f"processed {summary.processed}, already done {summary.skipped_existing}, failed {summary.failed} "
               f"({summary.videos_per_second:.1f} videos/s)")
    for key, err in summary.failures[:20]:
        typer.echo(f"  failed {key}: {err}")


@cli.command()
def presets() -> None:
    """List the named presets."""
    from rich.console import Console
    from rich.table import Table

    from vidseek.models.registry import list_presets

    table = Table("preset", "model", "clip", "frames", "words", "batch", "description")
    for p in list_presets():
        table.add_row(p.name, p.model, p.clip, str(p.frames), str(p.words), str(p.train.batch_size), p.description)
    Console().print(table)


@cli.command()
def train(
    preset: str = typer.Option(..., "--preset", help="Preset name (see `vidseek presets`)."),
    data: Path = typer.Option(..., "--data", help="Dataset folder."),
    out: Path = typer.Option(Path("runs/run"), "--out", help="Run folder (last.pt, best.pt, log.jsonl)."),
    weights: Optional[Path] = typer.Option(None, "--weights", "--clip", help="Local CLIP weights to start from."),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature store (for feature-mode presets)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly."),
    init: Optional[Path] = typer.Option(None, "--init", help="Start from another checkpoint's weights (e.g. PIG stage 1)."),
    epochs: Optional[int] = typer.Option(None, "--epochs"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Global contrastive batch."),
    micro_batch_size: Optional[int] = typer.Option(None, "--micro-batch-size", help="Gradient caching chunk."),
    lr: Optional[float] = typer.Option(None, "--lr"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    hard_negatives: Optional[str] = typer.Option(None, "--hard-negatives", help="Partners kept in one batch: none, "
                                                 "groups (dataset metadata) or mined (from the captions)."),
    twin_share: Optional[float] = typer.Option(None, "--twin-share", help="Fraction of each batch filled with partner "
                                               "pairs (0: partners only kept adjacent)."),
    twin_kind: Optional[str] = typer.Option(None, "--twin-kind", help="Partner kind of those pairs: any, order, attribute."),
    partner_loss_weight: Optional[float] = typer.Option(None, "--partner-loss-weight",
                                                        help="Weight of the 2-way partner cross-entropy (0: off)."),
    device: Optional[str] = typer.Option(None, "--device"),
) -> None:
    """Train a preset; the best checkpoint is chosen on the validation split."""
    from vidseek.models.registry import get_preset
    from vidseek.train.loop import train as run_train

    if not data.exists():
        raise VidseekError(f"data folder {data} does not exist: pass --data pointing at a dataset (or run `vidseek synth --out {data}`)")
    p = get_preset(preset).with_overrides(epochs=epochs, max_steps=max_steps, batch_size=batch_size,
                                          micro_batch_size=micro_batch_size, lr=lr, seed=seed,
                                          hard_negatives=hard_negatives, twin_share=twin_share, twin_kind=twin_kind,
                                          partner_loss_weight=partner_loss_weight)
    result = run_train(p, data, out, weights=str(weights) if weights else None,
                       features=str(features) if features else None, resume=resume,
                       init_from=str(init) if init else None, device=device)
    typer.echo(f"trained {result.step} steps → {result.run_dir}; best {result.best['metric']} = {result.best['value']} "
               f"at step {result.best['step']}")


@cli.command("eval")
def eval_cmd(
    checkpoint: Path = typer.Argument(..., help="Run folder (uses best.pt) or checkpoint file."),
    data: Path = typer.Option(..., "--data", help="Dataset folder."),
    split: str = typer.Option("test", "--split"),
    features: Optional[Path] = typer.Option(None, "--features", help="Feature store for feature-mode models."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the metrics + settings as JSON."),
    dsl: bool = typer.Option(False, "--dsl", help="Add a separately labelled dual-softmax (DSL) row."),
    recall_curve: Optional[Path] = typer.Option(None, "--recall-curve", help="Also draw the T2V recall@K curve to this PNG."),
    beams: int = typer.Option(100, "--beams", help="GRDR runs: beam width of the trie-constrained search."),
    rerank: Optional[Path] = typer.Option(None, "--rerank", help="GRDR runs: checkpoint that reranks the candidates."),
    device: Optional[str] = typer.Option(None, "--device"),
    index: Optional[Path] = typer.Option(None, "--index", help="T2V R@K by searching this built index (Searcher)."),
    http: Optional[str] = typer.Option(None, "--http", help="T2V R@K through a running `vidseek serve` at this URL."),
    k: int = typer.Option(10, "--k", help="--index/--http: results per query (R@K measurable for K ≤ k)."),
    recall_k: int = typer.Option(100, "--recall-k", help="--index/--http: candidates the recall stage passes on."),
) -> None:
    """Evaluate a checkpoint: paper-style T2V/V2T table (R@1/5/10, MdR, MnR, RSum, SumR)."""
    from vidseek.train.checkpoint import read_checkpoint

    if index is not None or http is not None:
        from vidseek.eval.through_index import eval_command

        typer.echo(eval_command(checkpoint, data, split, index=index, http=http, k=k, recall_k=recall_k,
                                device=device or "cpu", json_out=json_out))
        return

    if read_checkpoint(checkpoint)["preset"].get("model") == "grdr":
        from vidseek.eval.grdr_eval import run_grdr_eval

        run_grdr_eval(checkpoint, data, split=split, beams=beams, rerank=str(rerank) if rerank else None,
                      json_out=json_out, device=device)
        return
    from vidseek.eval.report import format_table, write_report
    from vidseek.eval.runner import evaluate_model
    from vidseek.train.checkpoint import load_model
    from vidseek.train.loop import load_split, video_source
    from vidseek.utils import default_device

    device = device or default_device()
    model, payload = load_model(checkpoint, device=device)
    from vidseek.models.registry import Preset

    p = Preset.from_dict(payload["preset"])
    dataset = load_split(p, data, split)
    cache_root = Path(payload["path"]).parent
    source = video_source(p, dataset, cache_root, str(features) if features else None, model, True)
    ranks: dict = {}
    per_query: dict = {}
    metrics = evaluate_model(model, dataset, source, p.words, dsl=dsl, ranks_out=ranks, outcomes_out=per_query)
    if recall_curve:
        from vidseek.eval.plots import plot_recall_curves

        plot_recall_curves({p.name: ranks["t2v"]}, recall_curve, title=f"T2V recall@K, {split}")
    rows = {p.name: {k: v for k, v in metrics.items() if not k.startswith("dsl.")}}
    if dsl:
        rows[f"{p.name} + DSL"] = {k[4:]: v for k, v in metrics.items() if k.startswith("dsl.")}
    typer.echo(format_table(rows, title=f"{p.name} on {data} [{split}]"))
    extra = {k: v for k, v in metrics.items() if k.startswith("hardneg.")}
    for key, value in extra.items():
        typer.echo(f"{key}: {value:.1f}")
    if extra and per_query["hardneg_source"] == "mined":
        typer.echo("(hard-negative pairs mined from the captions: the data has no partner metadata)")
    from vidseek.eval.bootstrap import metric_intervals
    from vidseek.eval.report import REPORT_NAME, format_intervals

    intervals = metric_intervals(per_query["outcomes"])
    typer.echo(format_intervals(intervals) + "  (bootstrap over queries)")
    metrics.update({f"{name}_ci": [iv.low, iv.high] for name, iv in intervals.items()})
    settings = {"preset": p.name, "checkpoint": payload["path"], "step": payload["step"], "split": split,
                "frames": p.frames, "fps": None, "words": p.words, "batch": p.train.batch_size, "precision": "fp32",
                "sampling": "uniform", "post_processing": "DSL row separate" if dsl else "none",
                "selected_on": payload.get("best", {}).get("metric", "val"),
                "hard_negative_pairs": per_query["hardneg_source"]}
    # A run folder keeps its report, so `vidseek compare runA runB` can pair them query by query.
    json_out = json_out or (checkpoint / REPORT_NAME.format(split=split) if checkpoint.is_dir() else None)
    if json_out:
        write_report(json_out, metrics, settings, per_query=per_query["outcomes"].to_json())
        typer.echo(f"wrote {json_out}")


@cli.command()
def compare(
    reports: list[Path] = typer.Argument(..., help="A B: two eval reports (JSON) or run folders; "
                                                 "several seeds per side as `A1 A2 vs B1 B2`."),
    split: str = typer.Option("test", "--split", help="Which eval-<split>.json to read from run folders."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    resamples: int = typer.Option(2000, "--resamples", help="Bootstrap resamples."),
) -> None:
    """Paired-bootstrap difference A − B (95% CI) of every metric, on the same queries."""
    from vidseek.eval.bootstrap import compare_runs
    from vidseek.eval.report import format_comparison, read_outcomes

    names = [str(r) for r in reports]
    if "vs" in names:
        cut = names.index("vs")
        side_a, side_b = reports[:cut], reports[cut + 1:]
    elif len(reports) == 2:
        side_a, side_b = reports[:1], reports[1:]
    else:
        raise VidseekError(f"got {len(reports)} reports: pass exactly two (A B) or separate the sides with `vs`")
    if not side_a or not side_b:
        raise VidseekError("one side of `vs` is empty: pass at least one report on each side")
    deltas = compare_runs([read_outcomes(r, split) for r in side_a], [read_outcomes(r, split) for r in side_b],
                          resamples=resamples, seed=seed)
    typer.echo(format_comparison(deltas, ", ".join(map(str, side_a)), ", ".join(map(str, side_b))))


@cli.command()
def plot(
    run: Path = typer.Argument(..., help="Run folder with log.jsonl."),
    out: Path = typer.Option(Path("training_curve.png"), "--out"),
) -> None:
    """Draw a run's training curve (loss, validation R@1) to PNG; GRDR runs get their
    diagnostics (loss per phase, code drift, view collapse, codebook usage)."""
    from vidseek.eval.plots import plot_training_curve
    from vidseek.train.checkpoint import read_checkpoint

    if (run / "last.pt").exists() and read_checkpoint(run / "last.pt")["preset"].get("model") == "grdr":
        from vidseek.eval.grdr_eval import plot_grdr_diagnostics

        plot_grdr_diagnostics(run, out)
        typer.echo(f"wrote {out}")
        return
    log = run / "log.jsonl"
    if not log.exists():
        raise VidseekError(f"{log} not found: pass a run folder written by `vidseek train`")
    plot_training_curve(log, out)
    typer.echo(f"wrote {out}")


@cli.command()
def verify(
    index: Path = typer.Argument(..., help="Index folder from `vidseek index`."),
    write_manifest: bool = typer.Option(False, "--write-manifest",
                                        help="Give an index built by an older vidseek its manifest (when intact)."),
) -> None:
    """Check every file of an index (checksums, SQLite, JSON, counts, checkpoints): OK, or one line per damaged file."""
    from vidseek.errors import SearchIndexError
    from vidseek.search.integrity import verify_index

    problems, summary = verify_index(index, write_manifest=write_manifest)
    for problem in problems:
        typer.echo(f"damaged: {problem}")
    if problems:
        raise SearchIndexError(f"{len(problems)} damaged file(s) in {index}; re-index (`vidseek index`) into a new "
                               f"--out folder, or restore the files from a backup")
    typer.echo(f"OK: {index}: {summary['files']} files match their checksums; {summary['entries']} entries, "
               f"{summary['recall_vectors']} recall vectors")


def _usage_error_types() -> tuple[type[Exception], ...]:
    """Click's usage errors, and those of the click copy that newer Typer versions vendor."""
    import click

    found: list[type[Exception]] = [click.exceptions.ClickException]
    try:
        from typer._click.exceptions import ClickException as TyperClickException
    except ImportError:
        return tuple(found)
    return (*found, TyperClickException)


def _register_search_commands() -> None:
    try:
        from vidseek.serve import commands
    except ModuleNotFoundError as err:
        if err.name == "vidseek.serve.commands":
            return
        raise
    commands.register(cli)


_register_search_commands()


def app() -> None:
    """Console entry point: run the CLI, turning user errors into one line and exit status 2."""
    try:
        cli(standalone_mode=False)
    except VidseekError as err:
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as err:
        raise err
    except Exception as err:  # click usage errors come through here in standalone_mode=False
        import click

        if isinstance(err, _usage_error_types()):
            # One line with the fix, not a usage block (or, for Typer's copy of click, a traceback).
            context = getattr(err, "ctx", None)
            command = context.command_path if context is not None else "vidseek"
            message = " ".join(err.format_message().split())
            typer.echo(f"error: {message}; see `{command} --help`", err=True)
            sys.exit(err.exit_code)
        if isinstance(err, click.exceptions.Abort) or type(err).__name__ == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    app()
