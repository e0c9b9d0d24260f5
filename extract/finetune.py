"""Stage 1: contrastive fine-tuning of the extractor on (caption, video) pairs.

The loss: the WTI score matrix of each global batch (negatives gathered from every process),
scaled by CLIP's logit scale (clamped at 100), under symmetric InfoNCE (or the dual softmax loss,
`--loss dsl`). The new modules train at `lr`, CLIP at lr * clip_lr_scale; the optimiser, its decay
groups, what is frozen and CLIP's precision are the recipe's (recipe.py: `original`, BertAdam with
float16 CLIP and a frozen conv1, or `modern`, AdamW); global gradient clipping at 1.0, AMP on GPUs.
One epoch passes over every training caption once, paired with its video. Training frames are
sampled the same way in every epoch, so when they fit `keep_frames` GiB each video is decoded once
and kept in memory (data.KeptClips: the same batches, several times faster on a CPU); else each
epoch decodes its batches in worker processes.

With `select_on="val"` a selector handed in by pipeline/ (recipe.Hooks.selector) validates the raw
and the EMA weights every `eval_every` steps and at each epoch end and keeps the best; it is saved
in the training state after every epoch, and its best weights are the stage-1 model in the end.

Under torchrun each process encodes batch_size / world pairs and computes the loss of the whole
global batch; the result (losses, gradients, weights) is that of one process with the whole
batch, up to floating-point summation order.
"""
from __future__ import annotations

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
from .data import kept_clips, threads_beside_workers, video_loader
from .distributed import DistInfo, all_gather_objects, barrier, gather_with_local_grad, shard_sampler
from .model import Stage1Model, contrastive_loss, fingerprint
from .recipe import Float16Weights, Hooks, RecipeError, freeze, half_parameters, make_optimizer
from .recipe import modern_groups as param_groups, modern_schedule as warmup_cosine  # noqa: F401  (their old names)
from .video import FrameSpec, normalize


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


def train_step(net, model, optimizer, scaler, batch, cfg: ExtractConfig, info: DistInfo, amp: bool,
               half: Float16Weights | None = None) -> float:
    """One optimisation step on (tokens, frames, mask, valid); returns the batch loss. `half`: CLIP's
    float16 weights of the original recipe (rounded around the update on a CPU)."""
    loss = batch_loss(net, model, *batch, cfg=cfg, info=info, amp=amp)
    model.zero_grad(set_to_none=True)  # the model's, also where the optimiser holds float16 copies (recipe.py)
    optimizer.zero_grad(set_to_none=True)
    # DDP averages gradients over processes; each holds the gradient through its own rows, so
    # the sum (world x the average) is the single-process gradient.
    scaler.scale(loss * info.world).backward()
    scaler.unscale_(optimizer)
    nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
    if half is not None:
        half.before_step()
    scaler.step(optimizer)
    scaler.update()
    if half is not None:
        half.after_step(optimizer)
    return float(loss.detach())


def finetune(
    model: Stage1Model, tokens: torch.Tensor, paths: list, spec: FrameSpec, cfg: ExtractConfig,
    device: torch.device, progress=None, failures: dict | None = None, info: DistInfo = DistInfo(),
    state_path: Path | None = None, resume: bool = False, log=print, hooks: Hooks | None = None, selector=None,
) -> list[float]:
    """Train `model` in place on pairs (tokens[i], paths[i]); returns the mean loss per epoch.

    After each epoch the full training state goes to `state_path` (by rank 0); with `resume`
    an existing one there is continued. Videos that fail to decode are left out of their batch
    and recorded in `failures` (path -> reason, gathered from every process). `hooks`: what
    pipeline/ hands in (the original recipe's optimiser); `selector`: with select_on "val", the
    validator that keeps the best weights (pipeline/selection.py), loaded into `model` at the end.
    """
    batch = global_batch(cfg, len(paths), info.world)
    if cfg.epochs <= 0 or batch < 2:
        return []
    steps = len(paths) // batch  # the same on every process and for any number of processes
    freeze(model, cfg.recipe)  # the original: CLIP's conv1 is not trained
    half = Float16Weights(half_parameters(model.clip), device) if cfg.recipe == "original" else None
    opt, sched = make_optimizer(model, cfg, cfg.epochs * steps, hooks, half)
    amp = (cfg.amp and device.type == "cuda") or bool(half and half.native)  # float16 CLIP needs autocast
    # no loss scaling under float16 CLIP weights: it would change which of their gradients underflow
    scaler = torch.amp.GradScaler("cuda", enabled=amp and half is None)
    ema = None
    if selector is not None and cfg.ema > 0:  # the original validates an EMA copy beside the raw weights
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema))
    start, history = 0, []
    if resume and state_path is not None and Path(state_path).is_file():
        saved = read_train_state(state_path)
        start, history = restore_train_state(saved, model, opt, sched, scaler)
        if half is not None:
            half.sync()  # the float16 copies BertAdam updates on a CPU: from the restored weights
        if ema is not None and saved.get("ema") is not None:
            ema.load_state_dict(saved["ema"])
        if selector is not None and saved.get("selection") is not None:
            selector.load_state_dict(saved["selection"])
        del saved
        log(f"resuming fine-tuning after epoch {start} of {cfg.epochs}")
    candidates = lambda: {"raw": {"model": model}, **({"ema": {"model": ema.module}} if ema else {})}  # noqa: E731
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    net = model
    if info.enabled:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      broadcast_buffers=False)
    mean, std = torch.tensor(spec.mean, device=device), torch.tensor(spec.std, device=device)
    sampler = shard_sampler(len(paths), info, cfg.seed)
    failed: dict[str, str] = {}
    model.train()
    kept = None  # every training video decoded once, when their frames fit cfg.keep_frames (data.KeptClips)
    if start < cfg.epochs:
        kept = kept_clips(paths, spec, cfg.keep_frames, cfg.workers, cfg.decode_timeout, progress)
    # while decoding workers run beside the model, it gets the cores they leave (data.threads_beside_workers)
    with threads_beside_workers(0 if kept else cfg.workers, device):
        for epoch in range(start, cfg.epochs):
            sampler.set_epoch(epoch)
            batches = [b for b, _ in zip(_chunks(list(sampler), batch // info.world), range(steps))]
            loader = kept.batches(batches) if kept else video_loader(
                paths, spec, batch // info.world, cfg.workers, timeout=cfg.decode_timeout, batches=batches)
            title = f"fine-tune epoch {epoch + 1}/{cfg.epochs}"
            task = progress.add_task(title, total=len(batches)) if progress else None
            total, count = 0.0, 0
            for i, (frames, mask, idx, reasons) in enumerate(loader):
                ok = mask.any(dim=1)
                for j in torch.nonzero(~ok).flatten().tolist():
                    failed[str(paths[idx[j]])] = reasons[j]
                valid = gather_with_local_grad(ok.to(device), info)
                if valid.sum() >= 2:  # the same decision on every process
                    frames = normalize(frames.to(device, non_blocking=True), mean, std)
                    batch_in = (tokens[idx].to(device), frames, mask.to(device), valid)
                    loss = train_step(net, model, opt, scaler, batch_in, cfg, info, amp, half)
                    total, count = total + loss, count + 1
                    if ema is not None:
                        ema.update_parameters(model)
                if sched is not None:
                    sched.step()
                if selector is not None and i + 1 < len(batches):  # the epoch's last step: validated below
                    selector.step(epoch * steps + i + 1, epoch + 1, candidates)
                if progress:
                    progress.update(task, advance=1, description=f"{title} loss {total / max(count, 1):.3f}")
            if progress:
                progress.remove_task(task)
            history.append(total / max(count, 1))
            if selector is not None:
                selector.epoch_end((epoch + 1) * steps, epoch + 1, candidates)
            if state_path is not None and info.is_main:
                extra = {"ema": ema.state_dict() if ema else None,
                         "selection": selector.state_dict() if selector is not None else None}
                save_train_state(state_path, model, opt, sched, scaler, epoch + 1, history, cfg, extra)
            barrier(info)
    model.set_grad_checkpointing(False)
    if half is not None:
        half.to_float32()  # lossless: the checkpoint holds float32 tensors wherever it was trained
    if selector is not None and selector.best_state() is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v
                               for k, v in selector.best_state()["model"].items()})
    model.eval()
    if failures is not None:
        for part in all_gather_objects(failed, info):
            failures.update(part)
    return history


def _chunks(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items) - size + 1, size)]


def stage1_model(
    cfg: ExtractConfig, out: Path, ann, tokenizer, device: torch.device, info: DistInfo = DistInfo(),
    resume: bool = False, progress=None, failures: dict | None = None, log=print, hooks: Hooks | None = None,
) -> tuple[Stage1Model, FrameSpec, str, Path]:
    """The stage-1 model the dump uses -> (model in eval mode on `device`, frame spec, fingerprint, checkpoint).

    In order: cfg.stage1 (an existing checkpoint, no fine-tuning); else OUT/stage1.pt when a
    finished fine-tuning with the same recipe is there; else fine-tune now (continuing
    OUT/train-state.pt with `resume`) and write OUT/stage1.pt. `ann` holds the training pairs (and,
    with select_on "val", the validation split: only these two are read while training). `hooks`:
    what pipeline/ hands in (recipe.Hooks: the original recipe's optimiser, the validation selector).
    """
    if cfg.stage1:
        model, spec, fp, saved = load_stage1(Path(cfg.stage1), cfg)
        log(f"stage 1: the {saved['model']} model in {cfg.stage1} (fingerprint {fp}), no fine-tuning")
        if info.is_main:  # the cache keeps the model its features came from: search encodes queries with it
            from .query import keep_stage1

            keep_stage1(Path(cfg.stage1), out)
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
    selector = None
    if cfg.epochs > 0 and train:
        if cfg.select_on == "val":
            selector = validation_selector(cfg, ann, tokenizer, spec, device, hooks, log)
        tokens = tokenizer([c.text for c in train], context_length=cfg.words)
        paths = [ann.videos[c.video_id] for c in train]
        history = finetune(model, tokens, paths, spec, cfg, device, progress, failures, info, state_path, resume, log,
                           hooks, selector)
        log(f"fine-tuned {cfg.epochs} epochs on {len(train)} pairs: loss per epoch {[round(h, 3) for h in history]}")
        if selector is not None and selector.best_state() is not None:
            log(f"kept the best on validation: {selector.summary()['best']}")
    model.eval()
    fp = fingerprint(model)
    if info.is_main:
        save_stage1(ckpt, model, cfg, fp, history, selection=selector.summary() if selector is not None else None)
        state_path.unlink(missing_ok=True)
    barrier(info)
    return model, spec, fp, ckpt


def validation_selector(cfg: ExtractConfig, ann, tokenizer, spec: FrameSpec, device, hooks: Hooks | None, log):
    """The selector of select_on "val" over `ann`'s val split (pipeline/selection.py, through `hooks`)."""
    val = ann.split("val")
    if not val:
        raise RecipeError("--select-on val: there is no validation split (and none was held out: --val-fraction 0?)")
    if hooks is None or hooks.selector is None:
        raise RecipeError("--select-on val needs the validator pipeline/ hands in: run it through `diffret extract`")
    vids = ann.video_ids("val")
    row = {v: i for i, v in enumerate(vids)}
    return hooks.selector(
        tokens=tokenizer([c.text for c in val], context_length=cfg.words),
        caption_video=torch.tensor([row[c.video_id] for c in val]), paths=[ann.videos[v] for v in vids],
        spec=spec, cfg=cfg, device=device, log=log)
