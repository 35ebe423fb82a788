"""`vidseek train` for GRDR presets: generative recall trained on a dense model's video vectors.

GRDR (seed `003_*`; METHODS.md "GRDR generative recall") tokenizes ONE pooled feature per video.
In vidseek that feature is a dense model's index vector (two-tower or PIG `index_video`), so a
GRDR run always starts from a dense run (`--init RUN_OF_A_DENSE_MODEL`)::

    dense run (--init) ─► frames (the dense run's frame cache) ─► index_video ─► x [N, D]
    captions per video ─────────────────────────────────────────────────────┐
    train_grdr (progressive loops × {pretrain, main, fit}, phase-level resume in grdr_state/) ─►
    best.pt / last.pt (vidseek checkpoints: preset, GRDR state dict, grdr_config, dense_checkpoint)

No model selection happens: the progressive schedule ends with the fit phase and that model is
the result (best.pt == last.pt). Validation only MEASURES it — candidate hit rate of generative
recall over the val videos (`val.grdr.hit_rate`) — and never touches test.
The semantic-ID trie is not part of the run: it is built at eval / index time from the codes of
whatever gallery is searched (`vidseek eval`, `vidseek index --recall grdr:RUN`).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import Tensor

from vidseek.errors import CheckpointError, ConfigError, DatasetError
from vidseek.models.grdr import GRDR, GRDRConfig, GRDRRecall, candidate_hit_rate, candidate_size_stats, split_model_config

if TYPE_CHECKING:
    from vidseek.models.registry import Preset
    from vidseek.search.indexer import LoadedModel
    from vidseek.train.runs import TrainResult

#: Sub-folder of a GRDR run holding train_grdr's phase-level resume state.
STATE_DIR = "grdr_state"
#: Per-step loss log of train_grdr (loop, phase, step within the phase, loss terms).
STEP_LOG = "grdr_log.jsonl"
MISSING_INIT = "GRDR trains on a dense model's video vectors: pass --init RUN_OF_A_DENSE_MODEL"


# --- the dense side --------------------------------------------------------------------------------

def load_dense(checkpoint: str | Path, device: str, expected_sha256: str | None = None,
               trained_for: str | None = None) -> "LoadedModel":
    """Load the dense model whose `index_video` GRDR tokenizes (refuses rerank-only models).

    With `expected_sha256` (a GRDR run's record), a missing or changed file is a one-line error
    naming the GRDR run `trained_for`."""
    from vidseek.search.indexer import file_sha256, load_checkpoint_model

    path = Path(checkpoint).expanduser()
    if expected_sha256 is not None:
        owner = f"GRDR run {trained_for}" if trained_for else "this GRDR run"
        if not path.is_file():
            raise CheckpointError(f"{owner} was trained on dense checkpoint {path}, which no longer exists; "
                                  "restore it or retrain GRDR with --init")
        if file_sha256(path) != expected_sha256:
            raise CheckpointError(f"dense checkpoint {path} changed since {owner} was trained (sha256 differs); "
                                  "restore the original file or retrain GRDR with --init")
    loaded = load_checkpoint_model(path, device, expected_sha256=expected_sha256)
    if not loaded.model.supports_dense_recall:
        raise ConfigError(f"{loaded.checkpoint} holds a {loaded.model.name} model, a reranker without one vector per "
                          "video; pass --init RUN_OF_A_DENSE_MODEL (a two-tower or PIG run)")
    return loaded


def model_source(loaded: "LoadedModel", dataset: Any, progress: bool) -> Any:
    """The split's videos as `loaded` reads them, with ITS preset's frame count and mode (frames:
    the frame cache; features: the feature store, extracted on first use), cached in that model's
    run folder — so a dense run's own train/val caches are reused, as `vidseek eval` does."""
    from vidseek.train.runs import video_source

    return video_source(dense_preset(loaded), dataset, Path(loaded.checkpoint).parent, None, loaded.model, progress)


def dense_preset(loaded: "LoadedModel") -> "Preset":
    """The preset the dense run was trained with."""
    from vidseek.models.registry import Preset
    from vidseek.train.checkpoint import read_checkpoint

    return Preset.from_dict(read_checkpoint(loaded.checkpoint)["preset"])


def check_matches_dense(preset: "Preset", dense: "Preset") -> None:
    """GRDR reads videos and queries through the dense run (its CLIP, frames, mode and text
    length), so the GRDR preset's own values must agree with that run's: a one-line error names
    the first that differs."""
    for name, ours, theirs in (("clip", preset.clip, dense.clip), ("frames", preset.frames, dense.frames),
                               ("words", preset.words, dense.words), ("train.mode", preset.train.mode, dense.train.mode)):
        if ours != theirs:
            raise ConfigError(f"preset {preset.name} has {name}={ours!r} but the --init run ({dense.name}) was trained "
                              f"with {theirs!r}; GRDR reads videos and queries through that run: pass a dense run "
                              "that matches the preset")


@torch.no_grad()
def index_vectors(loaded: "LoadedModel", source: Any, indices: Sequence[int], batch_size: int = 32) -> Tensor:
    """Dense index vectors [N, D] (float32, CPU) of the source's videos `indices`:
    `index_video(encode_video_features(frames))`, the feature GRDR tokenizes."""
    from vidseek.eval.runner import encode_videos
    from vidseek.models.base import tree_slice, tree_to

    model = loaded.model.eval()
    video = encode_videos(model, source, list(indices), batch_size=batch_size)
    parts = [model.index_video(tree_to(tree_slice(video, i, i + 256), model.device)).float().cpu()
             for i in range(0, len(indices), 256)]
    if not parts:
        raise DatasetError("no decodable videos to encode; check the dataset's video files")
    return torch.cat(parts)


def captions_per_video(dataset: Any, indices: Sequence[int]) -> list[list[str]]:
    """Training captions of each video `indices[i]` (paragraph datasets: the joined paragraph)."""
    by_record: dict[int, list[str]] = {}
    for text, record in dataset.training_pairs():
        by_record.setdefault(record, []).append(text)
    return [by_record.get(i, []) for i in indices]


def split_queries(dataset: Any, usable: Sequence[int]) -> tuple[list[str], list[int]]:
    """Evaluation queries of the split whose video is usable: texts and the gallery position
    (index into `usable`) of each query's video."""
    position = {record: j for j, record in enumerate(usable)}
    pairs = [(text, position[v]) for text, v in dataset.queries() if v in position]
    return [t for t, _ in pairs], [g for _, g in pairs]


# --- generative recall over a gallery --------------------------------------------------------------

def recall_candidates(model: GRDR, gallery_vectors: Tensor, texts: Sequence[str], beams: int,
                      batch_size: int = 32) -> tuple[list[list[int]], Tensor, Any, float]:
    """Index a gallery and recall: codes of every gallery video → trie → trie-constrained beam
    search per query → candidates (gallery positions, beam order). Returns (candidates, codes
    [N, N_v, L], trie, seconds spent recalling — text encoding + decoding + expansion)."""
    from vidseek.index.trie import SemanticIdTrie

    codes = model.encode(gallery_vectors)
    trie = SemanticIdTrie(codes, model.config.codebook_size)
    recall = GRDRRecall(model, trie)
    candidates: list[list[int]] = []
    began = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        candidates += recall.recall(list(texts[start:start + batch_size]), beams)
    return candidates, codes, trie, time.perf_counter() - began


def recall_summary(candidates: Sequence[Sequence[int]], ground_truth: Sequence[int]) -> dict[str, float]:
    """Hit rate (%) and candidate-set size statistics of one recall run."""
    out = {"grdr.hit_rate": 100.0 * candidate_hit_rate(candidates, ground_truth)}
    out.update({f"grdr.candidates.{k}": v for k, v in candidate_size_stats(candidates).items()})
    return out


# --- checkpoints -------------------------------------------------------------------------------------

@dataclass
class GRDRRun:
    """A trained GRDR run loaded for evaluation or indexing, with the dense model it tokenizes."""

    model: GRDR
    preset: "Preset"
    dense: "LoadedModel"
    beams: int  # default beam width, test-only pool
    beams_full_corpus: int  # default beam width for a whole collection
    checkpoint: str  # resolved best.pt / last.pt
    payload: dict[str, Any]


def load_grdr_run(checkpoint: str | Path, device: str = "cpu") -> GRDRRun:
    """Load a GRDR run (folder or .pt written by `vidseek train` with a GRDR preset)."""
    from vidseek.models import grdr as grdr_module
    from vidseek.models.registry import Preset
    from vidseek.train.checkpoint import read_checkpoint

    payload = read_checkpoint(checkpoint)
    preset = Preset.from_dict(payload["preset"])
    if preset.model != "grdr" or "grdr_config" not in payload or "dense_checkpoint" not in payload:
        raise CheckpointError(f"{payload['path']} holds a {preset.model} model (preset {preset.name}), not a GRDR run; "
                              "pass a run trained with a *-grdr-* preset")
    dense_info = payload["dense_checkpoint"]
    dense = load_dense(dense_info["checkpoint"], device, expected_sha256=dense_info["sha256"],
                       trained_for=payload["path"])
    config = GRDRConfig.from_dict(payload["grdr_config"])
    backbone = copy.deepcopy(dense.model.clip) if config.text_encoder == "clip" else None
    model = GRDR.from_checkpoint(
        {"format": grdr_module.CHECKPOINT_FORMAT, "version": grdr_module.CHECKPOINT_VERSION,
         "config": payload["grdr_config"], "state_dict": payload["model"], "history": payload.get("history")},
        clip_backbone=backbone, source=payload["path"]).to(device).eval()
    _, settings = split_model_config(preset.model_config)
    beams = int(settings.get("beams", 100))
    return GRDRRun(model=model, preset=preset, dense=dense, beams=beams,
                   beams_full_corpus=int(settings.get("beams_full_corpus", beams)),
                   checkpoint=str(Path(payload["path"]).absolute()), payload=payload)


def _save_run_checkpoint(path: Path, model: GRDR, preset: "Preset", dense: "LoadedModel", step: int,
                         best: dict[str, Any], val: dict[str, float]) -> None:
    from vidseek.version import __version__
    from vidseek.train.checkpoint import CHECKPOINT_FORMAT
    from vidseek.utils import atomic_torch_save

    atomic_torch_save({
        "format": CHECKPOINT_FORMAT, "vidseek_version": __version__, "model_name": "grdr",
        "preset": preset.to_dict(), "model": model.state_dict(), "grdr_config": model.config.to_dict(),
        "dense_checkpoint": dense.describe(), "step": step, "epoch": 0, "best": best,
        "history": model.history, "val": val,
    }, path)


# --- the run -----------------------------------------------------------------------------------------

def steps_per_phase(preset: "Preset", levels: int, num_captions: int) -> int:
    """`train.max_steps` spread evenly over the 3·L phases, else `train.epochs` passes over the
    training captions per phase."""
    cfg = preset.train
    if cfg.max_steps is not None:
        return max(1, cfg.max_steps // (3 * levels))
    return max(1, cfg.epochs * math.ceil(num_captions / cfg.batch_size))


def grdr_config_for(preset: "Preset", embed_dim: int) -> GRDRConfig:
    """The preset's GRDRConfig with the optimiser settings of its TrainConfig and the feature
    width of the dense model (a preset that names another width is an error)."""
    config, _ = split_model_config(preset.model_config)
    if "embed_dim" in preset.model_config and config.embed_dim != embed_dim:
        raise ConfigError(f"preset {preset.name} expects {config.embed_dim}-d video vectors but the --init model gives "
                          f"{embed_dim}-d; pass a dense run of the matching backbone")
    cfg = preset.train
    return dataclasses.replace(config, embed_dim=embed_dim, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               grad_clip=float(cfg.grad_clip) if cfg.grad_clip else math.inf)


def train_grdr_run(preset: "Preset", data: str | Path, out: str | Path, *, init_from: str | None = None,
                   resume: bool = False, device: str | None = None, progress: bool = True,
                   weights: str | None = None, features: str | None = None,
                   stop_after_steps: int | None = None) -> "TrainResult":
    """Train GRDR (`preset.model == "grdr"`) on the video vectors of the dense run `init_from`.

    Writes `out/best.pt`, `out/last.pt` (identical: no selection), `out/preset.json`,
    `out/grdr_log.jsonl` (per-step losses) and `out/grdr_state/` (phase-level resume: a killed run
    continues after its last completed phase with `resume=True`). `weights`, `features` and
    `stop_after_steps` (options of the contrastive loop) are refused: the dense run supplies the
    CLIP and the video features, and GRDR resumes by phase.
    """
    from vidseek.train.runs import TrainResult, load_split
    from vidseek.utils import atomic_write_json, default_device

    for option, value in (("--clip/--weights", weights), ("--features", features), ("stop_after_steps", stop_after_steps)):
        if value is not None:
            raise ConfigError(f"GRDR training does not take {option}: it reads CLIP and video features through the "
                              "dense run given with --init")
    if not init_from:
        raise ConfigError(MISSING_INIT)
    device = device or default_device()
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = run_dir / "last.pt", run_dir / "best.pt"
    state_dir = run_dir / STATE_DIR
    if not resume and (last_path.exists() or state_dir.exists()):
        raise ConfigError(f"{run_dir} already holds a GRDR run: pass --resume to continue it, or choose another --out")
    if resume and last_path.exists():  # finished before: nothing left to do
        from vidseek.train.checkpoint import read_checkpoint

        done = read_checkpoint(last_path)
        if done["preset"]["name"] != preset.name:
            raise ConfigError(f"{last_path} is a run of preset {done['preset']['name']}, not {preset.name}")
        return TrainResult(run_dir=run_dir, step=int(done["step"]), best=done["best"], final_val=done.get("val", {}))

    dense = load_dense(init_from, device)
    check_matches_dense(preset, dense_preset(dense))
    train_ds = load_split(preset, data, "train")
    train_src = model_source(dense, train_ds, progress)
    usable = list(train_src.usable)
    vectors = index_vectors(dense, train_src, usable)
    captions = captions_per_video(train_ds, usable)
    config = grdr_config_for(preset, int(vectors.shape[1]))
    _, settings = split_model_config(preset.model_config)
    steps = steps_per_phase(preset, config.levels, sum(len(c) for c in captions))
    atomic_write_json(run_dir / "preset.json", preset.to_dict())

    from vidseek.train.grdr_train import train_grdr

    backbone = copy.deepcopy(dense.model.clip) if config.text_encoder == "clip" else None
    model = train_grdr(vectors, captions, config, steps, preset.train.batch_size, preset.train.seed,
                       log_path=run_dir / STEP_LOG, progress=progress, checkpoint_dir=state_dir,
                       clip_backbone=backbone, clip_lr_coef=preset.train.clip_lr_coef, device=device)

    val: dict[str, float] = {}
    val_ds = load_split(preset, data, "val")
    if val_ds.records:
        val_src = model_source(dense, val_ds, progress)
        val_usable = list(val_src.usable)
        texts, truth = split_queries(val_ds, val_usable)
        if texts:
            candidates, _, _, _ = recall_candidates(model, index_vectors(dense, val_src, val_usable), texts,
                                                    int(settings.get("beams", 100)))
            val = {f"val.{k}": v for k, v in recall_summary(candidates, truth).items()}
    total_steps = steps * 3 * config.levels
    metric = preset.train.select_metric
    best = {"metric": metric, "value": val.get(metric), "step": total_steps,
            "selection": "none: the final model of the progressive schedule (val only measured)"}
    with open(run_dir / "log.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": total_steps, **val}) + "\n")
    _save_run_checkpoint(best_path, model, preset, dense, total_steps, best, val)
    _save_run_checkpoint(last_path, model, preset, dense, total_steps, best, val)
    return TrainResult(run_dir=run_dir, step=total_steps, best=best, final_val=val)
