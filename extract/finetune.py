"""Stage 1: contrastive fine-tuning of the extractor on (caption, video) pairs.

Symmetric InfoNCE over the WTI score matrix of each batch, scaled by CLIP's logit scale
(clamped at 100). Two parameter groups: the new modules at `lr`, CLIP at lr * clip_lr_scale;
AdamW (betas 0.9, 0.98), linear warm-up then cosine decay, gradient clipping.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ExtractConfig
from .data import video_loader
from .model import Stage1Model, info_nce
from .video import FrameSpec, normalize


def param_groups(model: Stage1Model, cfg: ExtractConfig) -> list[dict]:
    """AdamW groups: new modules vs CLIP, each split into decayed weights and undecayed 1-d params."""
    new_ids = {id(p) for m in model.new_modules() for p in m.parameters()}
    groups = []
    for is_new in (True, False):
        lr = cfg.lr if is_new else cfg.lr * cfg.clip_lr_scale
        params = [p for p in model.parameters() if p.requires_grad and (id(p) in new_ids) == is_new]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups += [
            {"params": decay, "lr": lr, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "lr": lr, "weight_decay": 0.0},
        ]
    return [g for g in groups if g["params"]]


def warmup_cosine(total_steps: int, warmup: float):
    """LR multiplier: linear 0 -> 1 over the warm-up steps, then cosine 1 -> 0."""
    w = max(1, int(total_steps * warmup))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total_steps - w)))

    return f


def finetune(
    model: Stage1Model, tokens: torch.Tensor, paths: list, spec: FrameSpec, cfg: ExtractConfig,
    device: torch.device, progress=None, failures: dict | None = None,
) -> list[float]:
    """Train `model` in place on pairs (tokens[i], paths[i]); returns the mean loss per epoch.

    Videos that fail to decode are dropped from their batch and recorded in `failures`
    (path -> reason).
    """
    if cfg.epochs <= 0 or len(paths) < 2:
        return []
    batch = min(cfg.batch_size, len(paths))
    steps_per_epoch = len(paths) // batch
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.epochs * steps_per_epoch, cfg.warmup))
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    mean = torch.tensor(spec.mean, device=device)
    std = torch.tensor(spec.std, device=device)
    history = []
    model.train()
    for epoch in range(cfg.epochs):
        loader = video_loader(paths, spec, batch, cfg.workers, shuffle=True, seed=cfg.seed + epoch, drop_last=True)
        task = progress.add_task(f"fine-tune epoch {epoch + 1}/{cfg.epochs}", total=len(loader)) if progress else None
        total, count = 0.0, 0
        for frames, mask, idx, reasons in loader:
            ok = mask.any(dim=1)
            if failures is not None:
                for i in torch.nonzero(~ok).flatten().tolist():
                    failures[str(paths[idx[i]])] = reasons[i]
            if ok.sum() >= 2:
                frames = normalize(frames[ok].to(device, non_blocking=True), mean, std)
                mask, text = mask[ok].to(device), tokens[idx[ok]].to(device)
                with torch.autocast(device.type, enabled=use_amp):
                    sim = model.similarity(model.encode_text(text), model.encode_video(frames, mask))
                    loss = info_nce(sim.float(), model.logit_scale)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                total, count = total + loss.item(), count + 1
            sched.step()
            if progress:
                progress.update(task, advance=1, description=f"fine-tune epoch {epoch + 1}/{cfg.epochs} loss {total / max(count, 1):.3f}")
        if progress:
            progress.remove_task(task)
        history.append(total / max(count, 1))
    model.eval()
    return history
