"""GRDR progressive co-training (seed `003_*`; METHODS.md "GRDR … Progressive co-training").

The semantic ID grows one level per loop (L loops). Loop l (learning level l) runs three phases:

1. pretrain — contrastive 0.5 + earlier-code CE 0.5 (the new level is not used yet);
2. k-means initialisation of codebook l on the unnormalised level-l residuals, one per training
   caption under its routed view, centred per earlier-code prefix (release `encode_epoch`);
3. main — contrastive 0.2 / CE 0.5 / earlier 0.8 / reconstruction 0.1 / quantiser 0.3, with
   codebooks < l frozen and codebook l at 10× the learning rate;
4. fit — tokenizer frozen, CE 1 + earlier 1 (the decoder catches up with the final codes).

AdamW at a constant lr 1e-4, gradient clipping 1.0 (release); a pretrained CLIP text tower at
lr × the preset's clip_lr_coef. Teacher forcing uses the codes
stored at the end of the previous loop; CODE DRIFT = share of videos whose level-j codes (any
view) changed between the end of one loop and the end of the next, recorded per level in
`model.history["drift"]`. With `checkpoint_dir`, training state is saved after every phase and a
rerun resumes after the last completed phase.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from vidseek.errors import CheckpointError, ConfigError, DatasetError
from vidseek.models.grdr import GRDR, GRDRConfig, codebook_usage, route_captions, view_diversity
from vidseek.utils import atomic_torch_save, seed_everything

PHASES = ("pretrain", "main", "fit")
STATE_FILE = "grdr_train_state.pt"


def kmeans(points: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """Lloyd's k-means (squared L2) → centres [k, W]. Initial centres are k distinct random points
    (sampled with replacement, plus tiny noise, when there are fewer than k points); an empty
    cluster keeps its previous centre."""
    n = len(points)
    if n >= k:
        centres = points[torch.randperm(n, generator=generator)[:k]].clone()
    else:
        centres = points[torch.randint(n, (k,), generator=generator)].clone()
        centres += 1e-4 * torch.randn(centres.shape, generator=generator)
    for _ in range(iters):
        assign = torch.cdist(points, centres).argmin(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        updated = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        if torch.allclose(updated, centres):
            break
        centres = updated
    return centres


def _caption_embeddings(model: GRDR, captions: Sequence[Sequence[str]]) -> list[np.ndarray]:
    """Embeddings for query-guided routing when none are given: the CLIP sentence feature with
    the CLIP text encoder; TF-IDF bag of words with the tiny (random) encoder, whose features
    would carry no meaning."""
    if model.config.text_encoder == "clip":
        backbone = model.retriever.text_encoder.backbone
        out = []
        with torch.no_grad():
            for caps in captions:
                out.append(backbone.encode_text(backbone.tokenize(list(caps))).sentence.float().cpu().numpy()
                           if caps else np.zeros((0, 1)))
        return out
    from sklearn.feature_extraction.text import TfidfVectorizer

    flat = [c for caps in captions for c in caps]
    matrix = TfidfVectorizer().fit_transform(flat).toarray()
    out, start = [], 0
    for caps in captions:
        out.append(matrix[start:start + len(caps)])
        start += len(caps)
    return out


def _steps_for(steps_per_phase: int | Mapping[str, int], phase: str) -> int:
    if isinstance(steps_per_phase, Mapping):
        if phase not in steps_per_phase:
            raise ConfigError(f"steps_per_phase has no entry for phase '{phase}'; give {list(PHASES)}")
        return int(steps_per_phase[phase])
    return int(steps_per_phase)


def _set_trainable(model: GRDR, phase: str, level: int) -> None:
    """Release freezing: fit freezes the whole tokenizer; otherwise codebooks < level are frozen."""
    for p in model.parameters():
        p.requires_grad_(True)
    tok = model.tokenizer
    if phase == "fit":
        for p in tok.parameters():
            p.requires_grad_(False)
    else:
        for j in range(level):
            tok.codebooks[j].requires_grad_(False)


def _optimizer(model: GRDR, level: int, clip_lr_coef: float = 1.0) -> torch.optim.AdamW:
    """AdamW groups: the new codebook at lr × new_codebook_lr_scale (release), a pretrained CLIP
    text tower (text_encoder "clip") at lr × clip_lr_coef (the preset's CLIP coefficient, as every
    vidseek model fine-tunes pretrained CLIP weights), everything else at lr."""
    cfg = model.config
    new_table = model.tokenizer.codebooks[level]
    encoder = model.retriever.text_encoder
    pretrained = {id(p) for p in encoder.backbone.parameters()} if cfg.text_encoder == "clip" else set()
    trainable = [p for p in model.parameters() if p.requires_grad and p is not new_table]
    groups: list[dict[str, Any]] = [
        {"params": [p for p in trainable if id(p) not in pretrained], "lr": cfg.lr, "name": "new"},
        {"params": [p for p in trainable if id(p) in pretrained], "lr": cfg.lr * clip_lr_coef, "name": "clip"},
    ]
    if new_table.requires_grad:
        groups.append({"params": [new_table], "lr": cfg.lr * cfg.new_codebook_lr_scale, "name": "new_codebook"})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, weight_decay=cfg.weight_decay)


@torch.no_grad()
def _init_codebook(model: GRDR, video_feats: Tensor, level: int, generator: torch.Generator,
                   sample_video: Tensor, sample_view: Tensor, stored: np.ndarray) -> None:
    """k-means → codebook `level`, on the points the release clusters (`encode_epoch`): one per
    training caption — the level-`level` residual of its video under the view it is routed to,
    UNnormalised (the release clusters `residuals[level-1]`, not their L2 normalisation; the
    quantiser normalises only to assign) — each shifted by (mean of all points − mean of the
    points whose earlier codes `stored` equal its own) (release `norm_by_prefix`)."""
    tok = model.tokenizer
    residual = tok.latents(video_feats)
    for j in range(level):
        residual = residual - tok.codebooks[j][tok.quantize_level(residual, j).codes]
    points = residual[sample_video.to(residual.device), sample_view.to(residual.device)].float().cpu()
    if level > 0:
        prefixes = torch.from_numpy(stored[sample_video.numpy(), sample_view.numpy(), :level])
        group = torch.unique(prefixes, dim=0, return_inverse=True)[1]
        group_sums = torch.zeros(int(group.max()) + 1, points.shape[1]).index_add_(0, group, points)
        group_means = group_sums / torch.bincount(group).unsqueeze(1)
        points = points - group_means[group] + points.mean(dim=0)
    centres = kmeans(points, model.config.codebook_size, model.config.kmeans_iters, generator)
    tok.codebooks[level].data.copy_(centres.to(tok.codebooks[level].device))


def _drift(previous: np.ndarray, current: np.ndarray) -> list[float]:
    """Per level: share of videos whose code at that level changed under any view."""
    return ((previous != current).any(axis=1)).mean(axis=0).tolist()


def train_grdr(
    video_feats: Tensor,
    captions: list[list[str]],
    config: GRDRConfig,
    steps_per_phase: int | Mapping[str, int],
    batch_size: int,
    seed: int,
    log_path: str | Path | None = None,
    progress: bool = True,
    *,
    caption_embs: Sequence[Tensor | np.ndarray] | None = None,
    checkpoint_dir: str | Path | None = None,
    clip_backbone: torch.nn.Module | None = None,
    clip_lr_coef: float = 1.0,
    device: str | torch.device = "cpu",
) -> GRDR:
    """Train GRDR on pooled video features [N, D] and each video's captions.

    Returns the trained model (eval mode) with `model.history` = {"steps": per-phase mean loss
    terms, "drift": [{"loop", "per_level"}], "diversity", "usage": per loop}. `caption_embs`
    (one [n_i, E] array per video) drive the query-guided routing; see `_caption_embeddings` for
    the default. `log_path` receives one JSON line per step. `clip_lr_coef` scales the learning
    rate of `clip_backbone`'s (pretrained) text tower.
    """
    if video_feats.ndim != 2 or video_feats.shape[1] != config.embed_dim:
        raise DatasetError(f"video features must be [N, {config.embed_dim}], got {tuple(video_feats.shape)}; "
                           "set GRDRConfig.embed_dim to the feature width")
    if len(captions) != len(video_feats):
        raise DatasetError(f"{len(video_feats)} videos but {len(captions)} caption lists; give one list per video")
    num_samples = sum(len(c) for c in captions)
    if num_samples < 2:
        raise DatasetError("GRDR training needs at least 2 captions (in-batch contrastive loss)")
    if batch_size < 2:
        raise ConfigError(f"GRDR batch_size must be >= 2 for the in-batch contrastive loss, got {batch_size}")

    seed_everything(seed)
    device = torch.device(device)
    model = GRDR(config, clip_backbone=clip_backbone).to(device)
    feats = video_feats.detach().to(device=device, dtype=torch.float32)
    n, levels = len(feats), config.levels

    if caption_embs is None:
        caption_embs = _caption_embeddings(model, captions)
    routes = route_captions(caption_embs, config.num_views, seed, order=config.route_order)
    sample_video = torch.tensor([v for v, caps in enumerate(captions) for _ in caps], dtype=torch.long)
    sample_view = torch.tensor([r for rs in routes for r in rs], dtype=torch.long)
    sample_tokens = model.tokenize([c for caps in captions for c in caps])

    stored = np.full((n, config.num_views, levels), -1, dtype=np.int64)  # codes of finished loops
    history: dict[str, Any] = {"steps": [], "drift": [], "diversity": [], "usage": []}
    done = -1  # index of the last completed (loop, phase) in the flat schedule
    state_path = Path(checkpoint_dir) / STATE_FILE if checkpoint_dir is not None else None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("config") != config.to_dict() or int(state.get("num_videos", -1)) != n or state.get("seed") != seed:
            raise CheckpointError(f"{state_path} belongs to another GRDR run (config, data or seed differ); "
                                  "use a fresh checkpoint_dir or delete it")
        model.load_state_dict(state["model"]["state_dict"])
        stored = state["stored_codes"].numpy().astype(np.int64)
        history = json.loads(state["history_json"])
        done = int(state["done"])

    log_fh = open(log_path, "a", encoding="utf-8") if log_path is not None else None
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
    try:
        schedule = [(loop, phase) for loop in range(levels) for phase in PHASES]
        for index, (loop, phase) in enumerate(schedule):
            if index <= done:
                continue
            steps = _steps_for(steps_per_phase, phase)
            if phase == "main":  # k-means init of the new level, after pretrain (release order)
                gen = torch.Generator().manual_seed(seed * 1009 + loop)
                _init_codebook(model, feats, loop, gen, sample_video, sample_view, stored)
            _set_trainable(model, phase, loop)
            optim = _optimizer(model, loop, clip_lr_coef)
            weights = config.loss_weights[phase]
            model.train()
            # Per-phase generator: the sample order does not depend on whether we resumed.
            gen = torch.Generator().manual_seed(seed * 7919 + index)
            order = torch.randperm(num_samples, generator=gen)
            cursor, sums = 0, {}
            task = bar.add_task(f"GRDR loop {loop + 1}/{levels} {phase}", total=steps) if bar else None
            for step in range(steps):
                if cursor + min(batch_size, num_samples) > num_samples:
                    order, cursor = torch.randperm(num_samples, generator=gen), 0
                idx = order[cursor:cursor + batch_size]
                cursor += len(idx)
                vids = sample_video[idx]
                prev = torch.from_numpy(stored[vids.numpy(), sample_view[idx].numpy(), :loop]).to(device)
                out = model.compute_losses(feats[vids.to(device)], sample_tokens[idx].to(device),
                                           sample_view[idx].to(device), prev, weights)
                if not math.isfinite(float(out.loss.detach())):
                    raise ConfigError(f"GRDR loss became {float(out.loss)} at loop {loop + 1} {phase} step {step}; "
                                      "lower the learning rate")
                optim.zero_grad(set_to_none=True)
                out.loss.backward()
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], config.grad_clip)
                optim.step()
                for key, value in {"loss": float(out.loss.detach()), **out.terms}.items():
                    sums[key] = sums.get(key, 0.0) + value
                if log_fh is not None:
                    log_fh.write(json.dumps({"loop": loop, "phase": phase, "step": step,
                                             "loss": float(out.loss.detach()), **out.terms}) + "\n")
                if bar is not None:
                    bar.advance(task)
            if bar is not None:
                bar.remove_task(task)
            history["steps"].append({"loop": loop, "phase": phase, "steps": steps,
                                     **{k: v / max(steps, 1) for k, v in sums.items()}})
            if phase == "fit":
                model.eval()
                codes = model.encode(feats, levels=loop + 1).numpy()
                if loop > 0:
                    history["drift"].append({"loop": loop, "per_level": _drift(stored[:, :, :loop], codes[:, :, :loop])})
                stored[:, :, :loop + 1] = codes
                history["diversity"].append({"loop": loop, **view_diversity(codes)})
                history["usage"].append({"loop": loop, **codebook_usage(codes, config.codebook_size)})
            model.history = history
            if state_path is not None:
                atomic_torch_save({"model": model.checkpoint(), "stored_codes": torch.from_numpy(stored),
                                   "history_json": json.dumps(history), "done": index,
                                   "config": config.to_dict(), "num_videos": n, "seed": seed}, state_path)
            if log_fh is not None:
                log_fh.flush()
    finally:
        if bar is not None:
            bar.stop()
        if log_fh is not None:
            log_fh.close()
    for p in model.parameters():
        p.requires_grad_(True)
    model.history = history
    return model.eval()
