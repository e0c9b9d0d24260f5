"""Stage 1: contrastive fine-tuning of the extractor on (caption, video) pairs.

The original recipe: the WTI score matrix of each global batch (negatives gathered from every
process), scaled by CLIP's logit scale (clamped at 100), under symmetric InfoNCE (or the dual
softmax loss, `--loss dsl`). Two parameter groups: the new modules at `lr`, CLIP at
lr * clip_lr_scale; AdamW (betas 0.9, 0.98, eps 1e-6, weight decay 0.2 on matrices), linear
warm-up over the first 10% of steps then cosine decay, gradient clipping at 1.0, AMP on GPUs.
One epoch passes over every training caption once, paired with its video.

Under torchrun each process encodes batch_size / world pairs and computes the loss of the whole
global batch; the result (losses, gradients, weights) is that of one process with the whole
batch, up to floating-point summation order.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from diffret.cache.wti import wti_similarity

from .checkpoint import (
    STAGE1_NAME,
    TRAIN_STATE_NAME,
    CheckpointError,
    build_stage1,
    load_stage1,
    read_stage1,
    read_train_state,
    restore_train_state,
    save_stage1,
    save_train_state,
    seed_everything,
)
from .config import ExtractConfig, recipe_mismatch
from .data import video_loader
from .distributed import DistInfo, all_gather_objects, barrier, gather_with_local_grad, shard_sampler
from .model import Stage1Model, contrastive_loss, fingerprint
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


def global_batch(cfg: ExtractConfig, n_pairs: int, world: int) -> int:
    """The global batch actually used: cfg.batch_size, or fewer when there are fewer pairs,
    rounded down to a multiple of the process count; < 2 means there is nothing to train on."""
    if cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by the {world} processes")
    b = min(cfg.batch_size, n_pairs)
    return b - b % world


def _local_grad_share(x: torch.Tensor, world: int) -> torch.Tensor:
    """`x` with its gradient divided by `world` (same value).

    Every process computes the whole loss; a parameter used only after the gather (the logit
    scale) would otherwise get the full gradient on each process, and `world` times it after
    DDP's averaging of the world-scaled loss (see `train_step`).
    """
    return x if world == 1 else x / world + (x * (1 - 1 / world)).detach()


TEXT_KEYS = ("words", "word_mask", "word_logits")
VIDEO_KEYS = ("frames", "frame_mask", "frame_logits")


def batch_loss(net: nn.Module, model: Stage1Model, tokens: torch.Tensor, frames: torch.Tensor, mask: torch.Tensor,
               valid: torch.Tensor, cfg: ExtractConfig, info: DistInfo, amp: bool) -> torch.Tensor:
    """Loss of the global batch; this process holds rows `tokens` [b, L], `frames` [b, F, 3, H, W]
    (normalised), `mask` [b, F]; `valid` [world * b] marks the pairs whose video decoded."""
    with torch.autocast(frames.device.type, dtype=torch.float16, enabled=amp):
        text, video = net(tokens, frames, mask)
    t = {k: gather_with_local_grad(text[k], info) for k in TEXT_KEYS}
    v = {k: gather_with_local_grad(video[k], info) for k in VIDEO_KEYS}
    keep = torch.nonzero(valid.to(tokens.device)).flatten()
    sim = wti_similarity(*(t[k][keep] for k in TEXT_KEYS), *(v[k][keep] for k in VIDEO_KEYS),
                         padding=cfg.wti_padding)  # the rule the cache records (Manifest.wti_padding)
    scale = _local_grad_share(model.logit_scale, info.world)
    return contrastive_loss(sim.float(), scale, cfg.loss, cfg.dsl_temp)


def train_step(net, model, optimizer, scaler, batch, cfg: ExtractConfig, info: DistInfo, amp: bool) -> float:
    """One optimisation step on (tokens, frames, mask, valid); returns the batch loss."""
    loss = batch_loss(net, model, *batch, cfg=cfg, info=info, amp=amp)
    optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over processes; each holds the gradient through its own rows, so
    # the sum (world x the average) is the single-process gradient.
    scaler.scale(loss * info.world).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return float(loss.detach())


def make_optimizer(model: Stage1Model, cfg: ExtractConfig, total_steps: int):
    opt = torch.optim.AdamW(param_groups(model, cfg), betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total_steps, cfg.warmup))
    return opt, sched


def finetune(
    model: Stage1Model, tokens: torch.Tensor, paths: list, spec: FrameSpec, cfg: ExtractConfig,
    device: torch.device, progress=None, failures: dict | None = None, info: DistInfo = DistInfo(),
    state_path: Path | None = None, resume: bool = False, log=print,
) -> list[float]:
    """Train `model` in place on pairs (tokens[i], paths[i]); returns the mean loss per epoch.

    After each epoch the full training state goes to `state_path` (by rank 0); with `resume`
    an existing one there is continued. Videos that fail to decode are left out of their batch
    and recorded in `failures` (path -> reason, gathered from every process).
    """
    batch = global_batch(cfg, len(paths), info.world)
    if cfg.epochs <= 0 or batch < 2:
        return []
    steps = len(paths) // batch  # the same on every process and for any number of processes
    opt, sched = make_optimizer(model, cfg, cfg.epochs * steps)
    amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    start, history = 0, []
    if resume and state_path is not None and Path(state_path).is_file():
        start, history = restore_train_state(read_train_state(state_path), model, opt, sched, scaler)
        log(f"resuming fine-tuning after epoch {start} of {cfg.epochs}")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    net = model
    if info.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    mean, std = torch.tensor(spec.mean, device=device), torch.tensor(spec.std, device=device)
    sampler = shard_sampler(len(paths), info, cfg.seed)
    failed: dict[str, str] = {}
    model.train()
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        batches = [b for b, _ in zip(_chunks(list(sampler), batch // info.world), range(steps))]
        loader = video_loader(paths, spec, batch // info.world, cfg.workers, timeout=cfg.decode_timeout, batches=batches)
        title = f"fine-tune epoch {epoch + 1}/{cfg.epochs}"
        task = progress.add_task(title, total=len(batches)) if progress else None
        total, count = 0.0, 0
        for frames, mask, idx, reasons in loader:
            ok = mask.any(dim=1)
            for i in torch.nonzero(~ok).flatten().tolist():
                failed[str(paths[idx[i]])] = reasons[i]
            valid = gather_with_local_grad(ok.to(device), info)
            if valid.sum() >= 2:  # the same decision on every process
                frames = normalize(frames.to(device, non_blocking=True), mean, std)
                batch_in = (tokens[idx].to(device), frames, mask.to(device), valid)
                total, count = total + train_step(net, model, opt, scaler, batch_in, cfg, info, amp), count + 1
            sched.step()
            if progress:
                progress.update(task, advance=1, description=f"{title} loss {total / max(count, 1):.3f}")
        if progress:
            progress.remove_task(task)
        history.append(total / max(count, 1))
        if state_path is not None and info.is_main:
            save_train_state(state_path, model, opt, sched, scaler, epoch + 1, history, cfg)
        barrier(info)
    model.set_grad_checkpointing(False)
    model.eval()
    if failures is not None:
        for part in all_gather_objects(failed, info):
            failures.update(part)
    return history


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items) - size + 1, size)]


def stage1_model(
    cfg: ExtractConfig, out: Path, ann, tokenizer, device: torch.device, info: DistInfo = DistInfo(),
    resume: bool = False, progress=None, failures: dict | None = None, log=print,
) -> tuple[Stage1Model, FrameSpec, str, Path]:
    """The stage-1 model the dump uses -> (model in eval mode on `device`, frame spec, fingerprint, checkpoint).

    In order: cfg.stage1 (an existing checkpoint, no fine-tuning); else OUT/stage1.pt when a
    finished fine-tuning with the same recipe is there; else fine-tune now (continuing
    OUT/train-state.pt with `resume`) and write OUT/stage1.pt. `ann` holds the training pairs.
    """
    if cfg.stage1:
        model, spec, fp, saved = load_stage1(Path(cfg.stage1), cfg)
        log(f"stage 1: the {saved['model']} model in {cfg.stage1} (fingerprint {fp}), no fine-tuning")
        return model.to(device).eval(), spec, fp, Path(cfg.stage1)
    out = Path(out)
    ckpt, state_path = out / STAGE1_NAME, out / TRAIN_STATE_NAME
    if ckpt.is_file():
        why = recipe_mismatch(read_stage1(ckpt)["config"], cfg)
        if why:
            raise CheckpointError(f"{ckpt} was made with another recipe ({why}); pass --overwrite to start over")
        model, spec, fp, _ = load_stage1(ckpt, cfg)
        log(f"stage 1: reusing the finished fine-tuning in {ckpt} (fingerprint {fp})")
        return model.to(device).eval(), spec, fp, ckpt
    if state_path.is_file():
        saved = read_train_state(state_path)
        if not resume:
            raise CheckpointError(
                f"{out} holds an unfinished fine-tuning ({saved['epochs_done']} of {saved['config']['epochs']} epochs "
                f"done); pass --resume to continue it or --overwrite to start over")
        why = recipe_mismatch(saved["config"], cfg)
        if why:
            raise CheckpointError(f"cannot resume {state_path}: another recipe ({why}); pass --overwrite to start over")
        del saved
    seed_everything(cfg.seed)
    model, spec = build_stage1(cfg)
    model.to(device)
    out.mkdir(parents=True, exist_ok=True)
    history: list[float] = []
    train = ann.split("train")
    if cfg.epochs > 0 and train:
        tokens = tokenizer([c.text for c in train], context_length=cfg.words)
        paths = [ann.videos[c.video_id] for c in train]
        history = finetune(model, tokens, paths, spec, cfg, device, progress, failures, info, state_path, resume, log)
        log(f"fine-tuned {cfg.epochs} epochs on {len(train)} pairs: loss per epoch {[round(h, 3) for h in history]}")
    model.eval()
    fp = fingerprint(model)
    if info.is_main:
        save_stage1(ckpt, model, cfg, fp, history)
        state_path.unlink(missing_ok=True)
    barrier(info)
    return model, spec, fp, ckpt
