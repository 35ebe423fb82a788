"""The training loop: one plain function you can read top to bottom (nanoGPT-style).

    build model/optimiser/schedule → (resume) → for each step: batch → represent → loss →
    backward (gradient caching if micro-batched) → average grads across ranks → clip → step →
    log → validate + checkpoint every `eval_every` steps → best.pt chosen on VALIDATION only.

A run folder holds: last.pt (resume point), best.pt (best validation metric), log.jsonl
(one JSON object per logged step / evaluation), preset.json, and the frame cache.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from vidseek.errors import ConfigError, DatasetError
from vidseek.models.base import FrameFeatures, LossOutput, RetrievalModel, tree_cat, tree_leaves, tree_map, tree_slice
from vidseek.models.losses import partner_infonce
from vidseek.models.registry import Preset, check_preset_fields, create_model
from vidseek.train.checkpoint import read_checkpoint, save_checkpoint, set_rng_state
from vidseek.train.data import EpochBatches, RawFrames
from vidseek.train.distributed import DistInfo, all_gather_tree, average_gradients, barrier, broadcast_object, init_distributed
from vidseek.train.optim import build_optimizer, build_scheduler
from vidseek.train.runs import TrainResult, kind_trainer, load_split, video_source
from vidseek.utils import atomic_write_json, default_device, seed_everything


# --- one optimisation step -------------------------------------------------------------------

def represent(model: RetrievalModel, tokens: torch.Tensor, video_in: RawFrames | FrameFeatures):
    """(text, video) representations; raw frames go through the image tower first."""
    feats = model.encode_frames(video_in.pixels, video_in.mask) if isinstance(video_in, RawFrames) else video_in
    return model.encode_text(tokens), model.encode_video_features(feats)


def batch_loss(model: RetrievalModel, text: Any, video: Any, partner_pairs: int = 0,
               partner_weight: float = 0.0) -> LossOutput:
    """The model's loss on the (gathered) batch, plus `partner_weight` × `partner_infonce` over
    the batch's first `partner_pairs` partner pairs (twin-heavy batches)."""
    out = model.loss(text, video)
    if partner_weight:
        if out.logits is None:
            raise ConfigError(f"{type(model).__name__} training here has no contrastive logits (e.g. PIG stage 1): "
                              f"set partner_loss_weight (--partner-loss-weight) to 0")
        partner = partner_infonce(out.logits, partner_pairs)
        out.loss = out.loss + partner_weight * partner
        out.terms["partner"] = float(partner.detach())
    return out


def train_step(model: RetrievalModel, tokens: torch.Tensor, frames: RawFrames | FrameFeatures, micro_batch: int | None,
               dist: DistInfo, partner_pairs: int = 0, partner_weight: float = 0.0) -> LossOutput:
    """Forward + backward for one (local) batch; gradients are left in `.grad`.

    With `micro_batch` smaller than the batch, gradient caching (Gao et al., 2021) keeps every
    negative: representations of all micro-batches are computed without a graph, the loss on
    the full batch gives their gradients, then each micro-batch is re-run with a graph (same
    RNG state, so dropout masks match) and back-propagated from those cached gradients.
    The first `partner_pairs` pairs of the batch get the partner loss (`batch_loss`).
    """
    n = tokens.shape[0]
    if micro_batch is None or micro_batch >= n:
        out = batch_loss(model, *all_gather_tree(represent(model, tokens, frames), dist), partner_pairs, partner_weight)
        out.loss.backward()
        return out

    chunks = [(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]
    rng_states, parts = [], []
    with torch.no_grad():
        for a, b in chunks:
            rng_states.append(torch.get_rng_state())
            parts.append(represent(model, tokens[a:b], tree_slice(frames, a, b)))
    cached = tree_map(lambda t: t.detach().requires_grad_(t.is_floating_point()), tree_cat(parts))
    out = batch_loss(model, *all_gather_tree(cached, dist), partner_pairs, partner_weight)
    out.loss.backward()
    after = torch.get_rng_state()
    cached_grads = tree_map(lambda t: t.grad if t.grad is not None else torch.zeros_like(t), cached)
    for (a, b), state in zip(chunks, rng_states):
        torch.set_rng_state(state)
        fresh = tree_leaves(represent(model, tokens[a:b], tree_slice(frames, a, b)))
        grads = tree_leaves(tree_slice(cached_grads, a, b))
        pairs = [(f, g) for f, g, c in zip(fresh, grads, tree_leaves(cached)) if c.requires_grad and f.requires_grad]
        torch.autograd.backward([f for f, _ in pairs], [g for _, g in pairs])
    torch.set_rng_state(after)
    return out


# --- the loop --------------------------------------------------------------------------------

def train(preset: Preset, data: str | Path, out: str | Path, *, weights: str | None = None, features: str | None = None,
          resume: bool = False, init_from: str | None = None, device: str | None = None, progress: bool = True,
          stop_after_steps: int | None = None) -> TrainResult:
    """Train `preset` on the dataset at `data`; write the run to `out`.

    `resume=True` continues exactly from `out/last.pt`. `init_from` starts a NEW run from another
    checkpoint's weights (e.g. PIG stage 1 → stage 2): parameters with matching names and shapes
    are copied, the rest keep their initialisation, and what was skipped is logged. `stop_after_steps` ends the process's
    work after that many steps of this invocation (a time-boxed job; a later `resume` goes on).
    """
    from vidseek.eval.runner import evaluate_model

    check_preset_fields(preset)
    own_training = kind_trainer(preset.model)
    if own_training is not None:  # e.g. GRDR: generative recall trains on a dense model's video vectors
        return own_training(preset, data, out, weights=weights, features=features, resume=resume, init_from=init_from,
                            device=device, progress=progress, stop_after_steps=stop_after_steps)
    device = device or default_device()
    dist = init_distributed(device)
    if dist.enabled and device.startswith("cuda"):
        device = f"cuda:{dist.local_rank}"
    cfg = preset.train
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path, log_path = run_dir / "last.pt", run_dir / "best.pt", run_dir / "log.jsonl"
    if last_path.exists() and not resume:
        raise ConfigError(f"{run_dir} already holds a run (last.pt): pass --resume to continue it, or choose another --out")
    if resume and not last_path.exists():
        raise ConfigError(f"--resume: {run_dir} holds no checkpoint (last.pt) to continue; drop --resume to start "
                          f"the run afresh there")
    if not resume and dist.is_main:
        log_path.unlink(missing_ok=True)  # lines of a run killed before its first checkpoint would be duplicated

    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
    model = create_model(preset, weights=weights).to(device)
    if init_from and not (resume and last_path.exists()):
        skipped = init_weights_from(model, init_from)
        if dist.is_main and skipped:
            print(f"init from {init_from}: kept fresh initialisation for {len(skipped)} tensors, e.g. {skipped[:3]}")
    train_ds, val_ds = load_split(preset, data, "train"), load_split(preset, data, "val")
    train_src = video_source(preset, train_ds, run_dir, features, model, progress and dist.is_main)
    val_src = video_source(preset, val_ds, run_dir, features, model, progress and dist.is_main)

    global_batch = cfg.batch_size
    if global_batch % dist.world_size:
        raise ConfigError(f"batch size {global_batch} is not divisible by {dist.world_size} processes")
    from vidseek.data.hard_negatives import partners_for

    partners = partners_for(train_ds.records, cfg.hard_negatives)
    if dist.is_main and partners is not None:
        with_partner = sum(bool(p) for p in partners)
        print(f"hard negatives ({cfg.hard_negatives}): {with_partner} of {len(partners)} training clips have a partner")
    batches = EpochBatches(train_src.usable, global_batch, cfg.seed, partners, cfg.twin_pairs, cfg.twin_kind)
    steps_per_epoch = len(batches.for_epoch(0))
    if steps_per_epoch == 0:
        raise DatasetError(f"{len(train_src.usable)} usable training videos in {data}: fewer than one batch of {global_batch}")
    total_steps = cfg.epochs * steps_per_epoch if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    eval_every = cfg.eval_every or steps_per_epoch

    optimizer = build_optimizer(model, cfg.lr, cfg.clip_lr_coef, cfg.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, cfg.warmup_fraction)
    step, epoch, batch_in_epoch, best = 0, 0, 0, {"metric": cfg.select_metric, "value": None, "step": None}
    if resume and last_path.exists():
        ckpt = read_checkpoint(last_path)
        if ckpt["preset"]["name"] != preset.name:
            raise ConfigError(f"{last_path} is a run of preset {ckpt['preset']['name']}, not {preset.name}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, epoch, batch_in_epoch, best = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best"]
        set_rng_state(ckpt["rng"])
        _truncate_log(log_path, step)
    if dist.is_main:
        atomic_write_json(run_dir / "preset.json", preset.to_dict())

    def log(record: dict[str, Any]) -> None:
        if dist.is_main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def validate_and_checkpoint() -> dict[str, float]:
        nonlocal best
        metrics = {}
        if dist.is_main:
            metrics = {f"val.{k}": v for k, v in evaluate_model(model, val_ds, val_src, preset.words).items()}
            model.train()
            log({"step": step, "epoch": epoch, **metrics})
            value = selection_value(metrics, cfg.select_metric)
            if value is not None and (best["value"] is None or value > best["value"]):
                best = {"metric": cfg.select_metric, "value": value, "step": step}
                save_checkpoint(best_path, model=model, preset=preset.to_dict(), step=step, epoch=epoch,
                                batch_in_epoch=batch_in_epoch, best=best)
            save_checkpoint(last_path, model=model, preset=preset.to_dict(), step=step, epoch=epoch,
                            batch_in_epoch=batch_in_epoch, optimizer=optimizer, scheduler=scheduler, best=best)
        best = broadcast_object(best, dist)
        barrier(dist)
        return metrics

    from rich.progress import Progress

    model.train()
    steps_this_run = 0
    val_metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    with Progress(disable=not (progress and dist.is_main), transient=True) as bar:
        task = bar.add_task(f"training {preset.name}", total=total_steps, completed=step)
        while step < total_steps and (stop_after_steps is None or steps_this_run < stop_after_steps):
            epoch_batches = batches.for_epoch(epoch)
            while batch_in_epoch < len(epoch_batches) and step < total_steps:
                if stop_after_steps is not None and steps_this_run >= stop_after_steps:
                    break
                ids = epoch_batches[batch_in_epoch]
                local = ids[dist.rank * len(ids) // dist.world_size:(dist.rank + 1) * len(ids) // dist.world_size]
                captions = [train_ds.records[i].captions[batches.caption_choice(epoch, i, len(train_ds.records[i].captions))]
                            for i in local]
                tokens = model.clip.tokenize(captions, context_length=preset.words).to(device)
                out = train_step(model, tokens, train_src.train_inputs(local, device), cfg.micro_batch_size, dist,
                                 cfg.twin_pairs, cfg.partner_loss_weight)
                average_gradients(model, dist)
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                step += 1
                steps_this_run += 1
                batch_in_epoch += 1
                bar.update(task, completed=step, description=f"training {preset.name} loss {float(out.loss.detach()):.3f}")
                if step % 10 == 0 or step == total_steps:
                    log({"step": step, "epoch": epoch, "loss": float(out.loss.detach()), "lr": scheduler.get_last_lr()[-1],
                         "steps_per_s": steps_this_run / (time.perf_counter() - t0), **out.terms})
                if step % eval_every == 0 or step == total_steps:
                    val_metrics = validate_and_checkpoint()
            if batch_in_epoch >= len(epoch_batches):
                epoch, batch_in_epoch = epoch + 1, 0
    return TrainResult(run_dir=run_dir, step=step, best=best, final_val=val_metrics)


#: Parts of a selection metric that validation reports only when its data has hard-negative
#: partner metadata (the synthetic benchmark); elsewhere they are left out of the sum.
OPTIONAL_SELECT_PREFIX = "val.hardneg."


def selection_value(metrics: dict[str, float], select_metric: str) -> float | None:
    """The model-selection value: one validation metric, or the sum of `+`-joined ones.

    A sum lets selection see order learning (`val.t2v.R@1+val.hardneg.order.acc`): R@1 alone can
    peak before order switches on (DESIGN.md, synthetic benchmark). Hard-negative parts absent
    from `metrics` (data without partners) are skipped; any other missing part is an error.
    None when `metrics` is empty (not the main process).
    """
    if not metrics:
        return None
    total = 0.0
    for part in select_metric.split("+"):
        part = part.strip()
        if part in metrics:
            total += metrics[part]
        elif not part.startswith(OPTIONAL_SELECT_PREFIX):
            raise ConfigError(f"selection metric part {part!r} is not reported by validation; "
                              f"choose from {sorted(k for k in metrics if k.startswith('val.'))}")
    return total


def init_weights_from(model: RetrievalModel, checkpoint: str | Path) -> list[str]:
    """Copy every same-named, same-shaped tensor from a checkpoint into `model`; return the rest."""
    source = read_checkpoint(checkpoint)["model"]
    own = model.state_dict()
    loadable = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not loadable:
        raise ConfigError(f"{checkpoint} shares no weights with this model: pass a checkpoint of the same backbone")
    model.load_state_dict(loadable, strict=False)
    return sorted(set(own) - set(loadable))


def _truncate_log(log_path: Path, step: int) -> None:
    """On resume, drop log lines written after the checkpoint's step (they will be redone)."""
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    from vidseek.utils import atomic_write_text

    atomic_write_text(log_path, "".join(line + "\n" for line in kept))
