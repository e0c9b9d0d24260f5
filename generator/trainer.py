"""Stage 2: train the t2v and v2t denoisers on cached features (the flat training loop).

Per batch of B (caption, video) pairs: stage-1 WTI scores [B, B] order the candidates (the
positive first, then the hardest in-batch items of other videos, K in all); x0 is one-hot on
the positive; a random step t noises it; each denoiser predicts x0 back from x_t and the
features; the generation loss (cross-entropy of 100 * x0_hat by default) trains both.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffret.cache.store import CacheReader
from diffret.cache.wti import wti_similarity

from .candidates import positive_first, same_video_mask, usable_candidates
from .checkpoint import save_generator
from .config import GeneratorConfig
from .denoiser import T2VDenoiser, V2TDenoiser, count_parameters
from .features import SplitFeatures, load_split
from .losses import generation_loss, one_hot_x0
from .schedule import NoiseSchedule, ScheduleConfig


class TrainingError(RuntimeError):
    """Training cannot go on (one-line message)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def batch_loss(t2v: nn.Module, v2t: nn.Module, f: SplitFeatures, rows: torch.Tensor, schedule: NoiseSchedule,
               cfg: GeneratorConfig, gen: torch.Generator) -> torch.Tensor | None:
    """Generation loss of both directions on the pairs `rows` [B]; None if no negatives exist."""
    vid = f.caption_video[rows]
    k = usable_candidates(vid, cfg.candidates)
    if k < 2:
        return None
    with torch.no_grad():
        sim = wti_similarity(f.words[rows], f.word_mask[rows], f.word_logits[rows],
                             f.frames[vid], f.frame_mask[vid], f.frame_logits[vid])
    same = same_video_mask(vid)
    cand_v = vid[positive_first(sim, same, k)]  # [B, K] video rows for each text query
    cand_t = rows[positive_first(sim.t(), same, k)]  # [B, K] caption rows for each video query
    B, dev = len(rows), rows.device
    x0 = one_hot_x0(k, B, cfg.x0, device=dev)
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=gen, device=dev)
    noise = torch.randn(2, B, k, generator=gen, device=dev)
    out_t2v = t2v(schedule.add_noise(x0, noise[0], t), t, f.sentence[rows], f.frames[cand_v], f.frame_mask[cand_v])
    out_v2t = v2t(schedule.add_noise(x0, noise[1], t), t, f.sentence[cand_t], f.frames[vid], f.frame_mask[vid])
    return generation_loss(out_t2v, None, cfg.loss, x0) + generation_loss(out_v2t, None, cfg.loss, x0)


def train_generator(cache_dir: Path, out: Path, cfg: GeneratorConfig, progress=None, log=print) -> dict:
    """Train both denoisers on the cache's train split; write the checkpoint and generator.json."""
    t0 = time.time()
    reader = CacheReader(cache_dir)
    if "train" not in reader.manifest.splits:
        raise TrainingError(f"{cache_dir} has no train split to train the generator on")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    feats = load_split(reader, "train").to(device)
    width = feats.width
    t2v, v2t = T2VDenoiser(width, cfg.temp).to(device), V2TDenoiser(width, cfg.temp).to(device)
    schedule = NoiseSchedule(ScheduleConfig(kind=cfg.schedule, steps=cfg.steps, beta_scale=cfg.beta_scale))
    params = list(t2v.parameters()) + list(v2t.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = [AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) for m in (t2v, v2t)] if cfg.ema > 0 else []
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    n = len(feats.caption_id)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    history = []
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=gen, device=device)
        task = progress.add_task(f"generator epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch) if progress else None
        total, count = 0.0, 0
        for s in range(steps_per_epoch):
            loss = batch_loss(t2v, v2t, feats, order[s * batch:(s + 1) * batch], schedule, cfg, gen)
            if loss is not None:
                if not math.isfinite(loss.item()):
                    raise TrainingError(f"loss became {loss.item()} at epoch {epoch + 1} step {s + 1}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                for e, m in zip(ema, (t2v, v2t)):
                    e.update_parameters(m)
                total, count = total + loss.item(), count + 1
            if progress:
                progress.update(task, advance=1, description=f"generator epoch {epoch + 1}/{cfg.epochs} loss {total / max(count, 1):.3f}")
        if progress:
            progress.remove_task(task)
        history.append(round(total / max(count, 1), 4))
    final = [e.module for e in ema] if ema else [t2v, v2t]  # evaluation uses the EMA weights
    meta = {
        "config": cfg.to_dict(), "width": width,
        "parameters": {"t2v": count_parameters(t2v), "v2t": count_parameters(v2t)},
        "cache": {"path": str(cache_dir), "fingerprint": reader.manifest.fingerprint,
                  "schema_version": reader.manifest.schema_version, "train_captions": n},
        "history": history, "seconds": round(time.time() - t0, 1), "device": str(device),
    }
    save_generator(out, final[0], final[1], meta)
    return meta
