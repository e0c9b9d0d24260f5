"""Stage 2: train the t2v and v2t denoisers on cached features (the flat training loop).

Per batch of B (caption, video) pairs: the candidates of each query are the positive first, then
hard negatives in stage-1 (WTI) order, K in all: the hardest in-batch items of other videos (the
original), or negatives mined once from the whole training split (`negatives="cache"`). x0 is
one-hot on the positive (or +1/-1), a random step t noises it, each denoiser predicts x0 back from
x_t and the features, and the generation loss (cross-entropy of 100 * x0_hat by default) trains
both. An EMA of the weights is what gets saved and evaluated.

`recipe="original"` (default) optimises as the original's generation stage (`prep_optimizer` in its
main_retrieval.py): BertAdam, lr `lr` with 10% linear warm-up then its cosine over all the steps of
all epochs, betas (0.9, 0.98), eps 1e-6, weight decay 0.2 on every weight whose name contains no
"bias", per-tensor gradient clipping at 1 after the global clipping; the denoisers' layers start
N(0, 0.02) with zero biases. `recipe="modern"`: AdamW at a constant lr, PyTorch's default init.

After every epoch the run folder gets `generator.pt`/`generator.json` (the EMA weights, what
`evaluate` reads) and `train_state.pt` (what `--resume` continues from), the three one atomic
commit (checkpoint.py: a kill at any instant leaves the previous epoch's or this one's, never a mix).
A non-finite loss or gradient stops training with an error; the last epoch's files stay intact.

One concept despite its length (a little over 300 lines): the flat training loop and the
per-batch pieces it calls (candidates, the paired denoising, the loss, the optimiser), kept
together so the loop reads top to bottom as nanoGPT's does.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from diffret.cache.layout import foreign_files, has_cache_marker, is_empty_folder, refusal
from diffret.cache.lock import OutputLock
from diffret.cache.paths import check_output_path
from diffret.cache.store import CacheReader
from diffret.cache.wti import wti_similarity

from .bert_adam import BertAdam, decay_groups
from .candidates import mine_cache_negatives, positive_first, same_video_mask, usable_candidates
from .checkpoint import best_modules, finish_commit, load_train_state, read_meta, save_checkpoint, save_generator
from .checkpoint import COMMIT_NAME, COMMITTED_NAMES, pending_name
from .config import RESUMABLE, GeneratorConfig, flag
from .denoiser import T2VDenoiser, V2TDenoiser, count_parameters, original_init_
from .device import resolve_device
from .features import SplitFeatures, load_split
from .losses import generation_loss, one_hot_x0
from .schedule import NoiseSchedule


class TrainingError(RuntimeError):
    """Training cannot go on (one-line message)."""


def batch_candidates(f: SplitFeatures, rows: torch.Tensor, k: int, pools=None):
    """Candidates of the pairs `rows` [B]: (video rows [B, K] per text query, caption rows [B, K] per
    video query), the positive first; in-batch by stage-1 WTI, or from `pools` (mine_cache_negatives)."""
    vid = f.caption_video[rows]
    if pools is not None:
        video_pool, caption_pool = pools
        k = min(k, video_pool.shape[1] + 1)
        return (torch.cat([vid[:, None], video_pool[rows, :k - 1]], 1),
                torch.cat([rows[:, None], caption_pool[vid, :k - 1]], 1))
    with torch.no_grad():  # words are kept in the cache's float16 (features.py): convert the batch's rows
        sim = wti_similarity(f.words[rows].float(), f.word_mask[rows], f.word_logits[rows],
                             f.frames[vid], f.frame_mask[vid], f.frame_logits[vid], padding=f.wti_padding)
    same = same_video_mask(vid)
    return vid[positive_first(sim, same, k)], rows[positive_first(sim.t(), same, k)]


def denoise_pairs(t2v: nn.Module, v2t: nn.Module, f: SplitFeatures, rows: torch.Tensor, cand_v: torch.Tensor,
                  cand_t: torch.Tensor, x_t2v: torch.Tensor, x_v2t: torch.Tensor, t: torch.Tensor,
                  shared: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 predictions of both denoisers [B, K] for the pairs `rows` with candidates cand_v (video rows)
    / cand_t (caption rows): the denoisers' fast path (`pairs`, `denoise`; the plain formula is
    generator/reference.py `reference_denoise_pairs`). shared: how t2v attends (denoiser.py
    `T2VDenoiser.context`'s `dense`): over every distinct candidate then picked (True), per pair
    (False), None: the denoiser decides."""
    vid = f.caption_video[rows]
    ctx_t2v = t2v.pairs(f.sentence[rows], None, f.frames, f.frame_mask, cand_v, dense=shared)
    ctx_v2t = v2t.pairs(f.frames[vid], f.frame_mask[vid], f.sentence, None, cand_t, dense=shared)
    return t2v.denoise(x_t2v, t, ctx_t2v), v2t.denoise(x_v2t, t, ctx_v2t)


def batch_loss(t2v: nn.Module, v2t: nn.Module, f: SplitFeatures, rows: torch.Tensor, schedule: NoiseSchedule,
               cfg: GeneratorConfig, gen: torch.Generator, pools=None) -> torch.Tensor | None:
    """Generation loss of both directions on the pairs `rows` [B]; None if no negatives exist."""
    vid = f.caption_video[rows]
    k = usable_candidates(vid, cfg.candidates) if pools is None else cfg.candidates
    if k < 2:
        return None
    cand_v, cand_t = batch_candidates(f, rows, k, pools)
    B, k, dev = len(rows), cand_v.shape[1], rows.device
    x0 = one_hot_x0(k, B, cfg.x0, device=dev)
    t = torch.randint(0, schedule.num_train_timesteps, (B,), generator=gen, device=dev)
    noise = torch.randn(2, B, k, generator=gen, device=dev)
    out_t2v, out_v2t = denoise_pairs(t2v, v2t, f, rows, cand_v, cand_t, schedule.add_noise(x0, noise[0], t),
                                     schedule.add_noise(x0, noise[1], t), t)
    return generation_loss(out_t2v, None, cfg.loss, x0) + generation_loss(out_v2t, None, cfg.loss, x0)


# The original recipe's BertAdam settings (main_retrieval.py prep_optimizer; lr and decay come from the config).
ORIGINAL_OPTIMIZER = dict(warmup=0.1, schedule="warmup_cosine", b1=0.9, b2=0.98, e=1e-6, max_grad_norm=1.0)


def make_optimizer(t2v: nn.Module, v2t: nn.Module, cfg: GeneratorConfig, total_steps: int | None = None):
    """The recipe's optimiser over both denoisers. total_steps: the schedule's length t_total (all
    steps of all epochs); None: no schedule (constant lr)."""
    named = [(f"t2v.{n}", p) for n, p in t2v.named_parameters()] + [(f"v2t.{n}", p) for n, p in v2t.named_parameters()]
    if cfg.recipe == "original":
        return BertAdam(decay_groups(named, cfg.decay()), lr=cfg.lr, t_total=-1 if total_steps is None else total_steps,
                        weight_decay=cfg.decay(), **ORIGINAL_OPTIMIZER)
    return torch.optim.AdamW([p for _, p in named], lr=cfg.lr, weight_decay=cfg.decay())


def build_models(width: int, cfg: GeneratorConfig, device, total_steps: int | None = None) -> tuple:
    """-> (t2v, v2t, params, optimizer, EMA copies) as train_generator trains them (seed first).

    total_steps: optimisation steps of the whole run (the original recipe's schedule length)."""
    t2v, v2t = T2VDenoiser(width, cfg.temp), V2TDenoiser(width, cfg.temp)
    if cfg.recipe == "original":
        original_init_(t2v)
        original_init_(v2t)
    t2v, v2t = t2v.to(device), v2t.to(device)
    params = list(t2v.parameters()) + list(v2t.parameters())
    opt = make_optimizer(t2v, v2t, cfg, total_steps)
    ema = [AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) for m in (t2v, v2t)] if cfg.ema > 0 else []
    return t2v, v2t, params, opt, ema


def train_step(t2v: nn.Module, v2t: nn.Module, f: SplitFeatures, rows: torch.Tensor, schedule: NoiseSchedule,
               cfg: GeneratorConfig, gen: torch.Generator, opt: torch.optim.Optimizer, params: list, ema: list,
               pools=None) -> float | None:
    """One optimisation step on the pairs `rows`: loss, backward, gradient clipping, optimiser, EMA.

    -> the loss (None: the batch has no negatives, nothing done). A non-finite loss or gradient norm
    is returned as is, with the weights left untouched (the caller stops).
    """
    loss = batch_loss(t2v, v2t, f, rows, schedule, cfg, gen, pools)
    if loss is None:
        return None
    value = loss.item()
    if not math.isfinite(value):
        return value
    opt.zero_grad(set_to_none=True)
    loss.backward()
    norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
    if not math.isfinite(norm):
        return norm
    opt.step()
    for e, m in zip(ema, (t2v, v2t)):
        e.update_parameters(m)
    return value


@contextlib.contextmanager
def flush_denormals(device: torch.device):
    """On the CPU, flush float32 denormals to zero while training. The cross-entropy of 100 x0_hat
    drives most softmax probabilities below 1e-38, and x86 arithmetic on such denormal gradients is
    about 10x slower (a 128 x 128 step: 16 s -> 5 s on 2 cores); values that small change nothing.
    Afterwards PyTorch's default (off) is restored. GPUs need no such switch."""
    flush = torch.device(device).type == "cpu" and torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flush:
            torch.set_flush_denormal(False)


def resume_config(out: Path, overrides: dict) -> GeneratorConfig:
    """The saved run's config with `overrides` applied; only RESUMABLE settings may change."""
    saved = GeneratorConfig.from_dict(load_train_state(out)["config"])
    for name, value in overrides.items():
        if name not in RESUMABLE and getattr(saved, name) != value:
            raise TrainingError(f"--resume cannot change {flag(name)} ({getattr(saved, name)!r} -> "
                                f"{value!r}); only {', '.join(RESUMABLE)} may change")
    return GeneratorConfig.from_dict({**saved.to_dict(), **{k: overrides[k] for k in overrides if k in RESUMABLE}})


def _meta(cfg, width, t2v, v2t, reader, cache_dir, n, history, epochs_done, seconds, device,
          candidates: int | None = None) -> dict:
    return {
        "config": cfg.to_dict(), "width": width,
        "effective_candidates": candidates,  # K used in training (config.candidates is what was asked)
        "parameters": {"t2v": count_parameters(t2v), "v2t": count_parameters(v2t)},
        "cache": {"path": str(Path(cache_dir).resolve()), "fingerprint": reader.manifest.fingerprint,
                  "schema_version": reader.manifest.schema_version, "train_captions": n},
        "epochs_done": epochs_done, "history": history, "seconds": round(seconds, 1), "device": str(device),
    }


# ------------------------------------------------------------------ the run folder (--out)


def run_files() -> tuple[str, ...]:
    """Every file name train-generator writes into its --out (checkpoint.py's names, their pending copies)."""
    names = (*COMMITTED_NAMES, COMMIT_NAME)
    return (*names, *(pending_name(n) for n in names))


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Decide, writing nothing, whether `out` may be written -> the generator files `overwrite` replaces.

    A new or empty folder is fine. A generator already there (finished or not) is refused unless
    `resume` (train it longer) or `overwrite` (start over). A folder holding anything diffret did not
    write is refused, naming it: a generator may share its cache's folder (cache/layout.py lists the
    cache's files), nothing else."""
    out = Path(out)
    if resume and overwrite:
        raise TrainingError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if not out.is_dir() or is_empty_folder(out):
        return []
    mine = [out / n for n in run_files() if (out / n).exists()]
    ours = bool(mine) or has_cache_marker(out)  # a generator may share its cache's folder
    why = refusal(out, foreign_files(out, extra=run_files()), ours, overwrite, "generator")
    if why:
        raise TrainingError(why)
    # pending copies without a commit record are a write killed before its first commit: no generator
    # (commit_files clears them before it writes); a commit record or a committed file is one
    committed = [f for f in mine if f.name in (*COMMITTED_NAMES, COMMIT_NAME)]
    if committed and not (resume or overwrite):
        try:
            meta = json.loads((out / COMMITTED_NAMES[1]).read_text(encoding="utf-8"))
            done = f" ({meta['epochs_done']} of {meta['config']['epochs']} epochs done)"
        except (OSError, ValueError, KeyError, TypeError):
            done = ""
        raise TrainingError(f"--out {out} already holds a generator{done}; pass --resume to train it longer or "
                            f"--overwrite to replace it")
    return mine if overwrite else []


def train_generator(cache_dir: Path, out: Path, cfg: GeneratorConfig, progress=None, log=print,
                    resume: bool = False, max_steps: int | None = None, overwrite: bool = False,
                    selection=None) -> dict:
    """Train both denoisers on the cache's train split; write the checkpoint and generator.json.

    resume: continue the run in `out` from its last finished epoch (`cfg` must match the saved run
    except for RESUMABLE settings; see resume_config). overwrite: replace a generator already in
    `out` (check_run_folder). max_steps: stop every epoch after that many steps
    (benchmarks/train_speed.py times a part of an epoch this way). -> the generator.json dict.
    `out` is locked for the whole run (cache/lock.py): a second job on it is refused.
    selection: with cfg.select_on "val", what pipeline/ hands in (pipeline/selection.py
    GeneratorSelection: `train_view(features)` without held-out videos, `selector`, `record`).
    """
    cfg.validate()
    if (cfg.select_on == "val") != (selection is not None):
        raise TrainingError("--select-on val needs the validation selection pipeline/ hands in (and only it)")
    check_output_path(out, "--out", folder=True)
    with OutputLock(out, log=log):
        replaced = check_run_folder(out, resume, overwrite)
        if replaced:
            CacheReader(cache_dir)  # a cache that cannot be read: refused before the old generator goes
            log(f"--overwrite: removing the generator in {out}")
            for p in replaced:
                p.unlink()
        return _train(cache_dir, out, cfg, progress, log, resume, max_steps, selection)


def _train(cache_dir: Path, out: Path, cfg: GeneratorConfig, progress, log, resume: bool,
           max_steps: int | None, selection=None) -> dict:
    """train_generator once `out` is locked and checked."""
    t0 = time.time()
    cfg.validate()
    check_output_path(out, "--out", folder=True)
    reader = CacheReader(cache_dir)
    if "train" not in reader.manifest.splits:
        raise TrainingError(f"{cache_dir} has no train split to train the generator on")
    state = load_train_state(out) if resume else None
    if state is not None and state["cache"]["fingerprint"] != reader.manifest.fingerprint:
        raise TrainingError(f"{out} was trained on a cache of stage-1 model {state['cache']['fingerprint']}, "
                            f"but {cache_dir} holds {reader.manifest.fingerprint}; resume on the same cache")
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    feats = load_split(reader, "train").to(device)
    if selection is not None:  # held-out validation videos (when the cache has no val split) are not trained on
        feats = selection.train_view(feats)
    width, n = feats.width, len(feats.caption_id)
    videos = len(torch.unique(feats.caption_video))
    if videos < 2:
        raise TrainingError(f"the train split of {cache_dir} has captions of {videos} video(s): no negatives to "
                            f"train against (a generator needs captions of at least two videos)")
    batch = min(cfg.batch_size, n)
    steps_per_epoch = max(1, n // batch)
    total_steps = max(1, steps_per_epoch * cfg.epochs)  # the original recipe's schedule runs over all epochs
    t2v, v2t, params, opt, ema = build_models(width, cfg, device, total_steps)
    schedule = NoiseSchedule(cfg.schedule_config())
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    history, start, spent = [], 0, 0.0
    if state is not None:
        if state["cache"]["train_captions"] != n:
            raise TrainingError(f"{out} was trained on {state['cache']['train_captions']} captions, "
                                f"{cache_dir} has {n}; resume on the same cache")
        t2v.load_state_dict(state["t2v"])
        v2t.load_state_dict(state["v2t"])
        for e, s in zip(ema, state["ema"]):
            e.load_state_dict(s)
        opt.load_state_dict(state["optimizer"])
        for g in opt.param_groups:  # --lr and --epochs (the schedule's length) may change on resume
            g["lr"] = cfg.lr
            if "t_total" in g:
                g["t_total"] = total_steps
        gen.set_state(state["rng"])
        if selection is not None and state.get("selection") is not None:
            selection.selector.load_state_dict(state["selection"])
        history, start, spent = list(state["history"]), int(state["epochs_done"]), float(state["seconds"])
        log(f"resuming {out} after epoch {start} of {cfg.epochs}")
    pools = None
    if cfg.negatives == "cache":
        pools = mine_cache_negatives(feats, cfg.candidates, device=device, progress=progress)
        pools = tuple(p.to(device) for p in pools)
    # K per query, at most: the positive and K - 1 other videos of the batch (or of the mined pools)
    k_used = min(cfg.candidates, min(batch, videos) if pools is None else pools[0].shape[1] + 1)
    if k_used < cfg.candidates:
        held = f"a batch of {batch} pairs ({videos} training videos)" if pools is None else "the mined negatives"
        log(f"--candidates {cfg.candidates} is more than {held} can give: training uses K = {k_used} "
            f"(recorded as effective_candidates in generator.json)")
    steps = steps_per_epoch if max_steps is None else max(0, min(steps_per_epoch, max_steps))
    final = lambda: [e.module for e in ema] if ema else [t2v, v2t]  # noqa: E731  (evaluation uses the EMA)
    candidates = lambda: {"raw": {"t2v": t2v, "v2t": v2t},  # noqa: E731  (what --select-on val compares)
                          **({"ema": {"t2v": ema[0].module, "v2t": ema[1].module}} if ema else {})}
    meta = None
    Path(out).mkdir(parents=True, exist_ok=True)
    for epoch in range(start, cfg.epochs):
        order = torch.randperm(n, generator=gen, device=device)
        label = f"generator epoch {epoch + 1}/{cfg.epochs}"
        task = progress.add_task(label, total=steps) if progress else None
        total, count = 0.0, 0
        for s in range(steps):
            with flush_denormals(device):
                value = train_step(t2v, v2t, feats, order[s * batch:(s + 1) * batch], schedule, cfg, gen, opt,
                                   params, ema, pools)
            if value is not None:
                if not math.isfinite(value):
                    # --resume only when an epoch of this run was committed (this session's or the resumed one's)
                    advice = (f"the checkpoint of epoch {epoch} in {out} is kept; lower --lr and continue with "
                              f"--resume" if epoch > 0 else "no epoch finished, so there is nothing to resume; "
                              "lower --lr and run it again")
                    raise TrainingError(f"loss or gradient became {value} at epoch {epoch + 1} step {s + 1}; "
                                        f"stopped, {advice}")
                total, count = total + value, count + 1
            if selection is not None and s + 1 < steps:  # the epoch's last step: validated at its end
                selection.selector.step(epoch * steps + s + 1, epoch + 1, candidates)
            if progress:
                progress.update(task, advance=1, description=f"{label} loss {total / max(count, 1):.3f}")
        if progress:
            progress.remove_task(task)
        if steps and not count:  # every batch was one video's captions: nothing was learnt
            raise TrainingError(f"no batch of epoch {epoch + 1} had captions of two videos, so nothing was trained; "
                                f"raise --batch-size (nothing was written for this epoch)")
        history.append(round(total / max(count, 1), 4))
        seconds = spent + time.time() - t0
        meta = _meta(cfg, width, t2v, v2t, reader, cache_dir, n, history, epoch + 1, seconds, device, k_used)
        kept = final()
        if selection is not None:  # the best on validation so far is what generator.pt holds
            selection.selector.epoch_end((epoch + 1) * steps, epoch + 1, candidates)
            kept, meta["selection"] = best_modules(kept, selection.selector.best_state()), selection.selector.summary()
        save_checkpoint(out, *kept, meta, {  # one atomic commit of the epoch's three files
            "config": cfg.to_dict(), "t2v": t2v.state_dict(), "v2t": v2t.state_dict(),
            "ema": [e.state_dict() for e in ema], "optimizer": opt.state_dict(), "rng": gen.get_state(),
            "history": history, "epochs_done": epoch + 1, "seconds": seconds, "cache": meta["cache"],
            "selection": selection.selector.state_dict() if selection is not None else None,
        })
    if meta is None:  # nothing left to train (epochs 0, or a finished run resumed)
        if state is not None:
            log(f"{out} already has {start} epochs; pass a larger --epochs to train longer")
            finish_commit(out)  # a kill during the last commit's renames: complete them
            return read_meta(out)
        meta = _meta(cfg, width, t2v, v2t, reader, cache_dir, n, history, 0, time.time() - t0, device, k_used)
        save_generator(out, *final(), meta)
    return meta
