"""The evaluation protocol: stage-1 scores from cached tokens, diffusion re-ranking, revisers, metrics.

Rows of the result, each in both directions:

* `discriminative`: the stage-1 WTI scores S alone.
* `diffusion`: S re-ranked by the generator over each query's top-K candidates (or all of them).
* `dsl` (with `dsl=True`): Dual Softmax applied to the stage-1 scores (logit-scaled).
* `qbnorm` (with `qb_norm=True`): QB-Norm applied to the stage-1 scores, the query bank being the
  cache's training queries (t2v: training captions; v2t: training videos).

Multi-caption test sets (MSVD, MSRVTT full, ...), the field's protocol (metrics.py): t2v ranks each
caption's video among all videos; v2t scores each gallery video by the max over its captions of the
row's v2t matrix (for `diffusion`, the re-scored one) and ranks the query's own video among the
videos; videos without a test caption are distractors for t2v and are not v2t queries.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffret.cache.atomic import atomic_open
from diffret.cache.manifest import CacheError, check_compatible
from diffret.cache.numbers import check_numbers
from diffret.cache.paths import check_output_path
from diffret.cache.store import CacheReader
from diffret.cache.wti import wti_similarity_chunked
from diffret.generator.checkpoint import load_generator
from diffret.generator.device import resolve_device
from diffret.generator.features import SplitFeatures, load_split
from diffret.generator.generator import Generator
from diffret.generator.rerank import rerank
from diffret.generator.sampler import DDIM_EPS, SAMPLERS

from .metrics import retrieval_metrics
from .revisers import dual_softmax, qb_norm, query_bank
from .streaming import DEFAULT_MEMORY_BUDGET, check_streamable, in_memory_bytes, streamed_metrics


def _parse_top_k(text: str) -> int | None:
    """--top-k: a positive number, or 'all' (None)."""
    if text.lower() == "all":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"--top-k must be a positive number or 'all', got {text!r}")


def _gib_to_bytes(gib: float) -> int:
    """--memory-budget: GiB -> bytes."""
    if not (math.isfinite(gib) and gib > 0):
        raise ValueError(f"--memory-budget must be a positive number of GiB, got {gib}")
    return max(1, int(gib * 2**30))


@dataclass
class EvalOptions:
    """What `diffret evaluate` does besides reading the cache (defaults: the original's inference).
    Each field's metadata is its option (see pipeline/commands/options.py)."""

    sample_steps: int | None = field(default=None, metadata={  # sampling steps S, None = the generator's T
        "flag": ("--steps", "--sample-steps"), "show_default": "the generator's T",
        "help": "Sampling steps S (strided, <= the generator's T)."})
    sampler: str = field(default="ddim", metadata={"choices": SAMPLERS})
    clamp: bool = field(default=True, metadata={"help": "Clamp x0 to [-1, 1] at every step."})
    ddim_eps: str = field(default="clamped", metadata={
        "choices": DDIM_EPS, "help": "DDIM re-derives epsilon from the clamped x0 (the original's guided-diffusion) "
                                     "or the raw one (diffusers' default)."})
    top_k: int | None = field(default=32, metadata={  # None = the whole gallery
        "parse": _parse_top_k, "format": lambda k: "all" if k is None else str(k),
        "help": "Candidates re-ranked per query, or 'all'."})
    alpha: float = field(default=1.0, metadata={"help": "Weight of the generated distribution."})
    temp: float = field(default=1.0, metadata={"help": "Softmax temperature on x0."})
    dsl: bool = field(default=False, metadata={"help": "Add the row `dsl`: Dual Softmax on the stage-1 scores."})
    dsl_temp: float = field(default=1.0, metadata={"help": "Dual Softmax temperature (on logit-scaled scores)."})
    qb_norm: bool = field(default=False, metadata={
        "help": "Add the row `qbnorm`: QB-Norm on the stage-1 scores, bank = train split."})
    qb_beta: float = field(default=20.0, metadata={"help": "QB-Norm inverse temperature."})
    qb_k: int = field(default=1, metadata={"help": "QB-Norm activation set: top-k of each bank query."})
    split: str = "test"
    device: str = "auto"
    seed: int = 0
    allow_other_cache: bool = field(default=False, metadata={  # a cache from another stage-1 model (same width)
        "help": "Evaluate on a cache of another stage-1 model (the width must still match)."})
    memory_budget: int | None = field(default=None, metadata={  # bytes held in memory before streaming (None: 2 GiB)
        "type": float, "parse": _gib_to_bytes, "format": lambda b: (b or DEFAULT_MEMORY_BUDGET) / 2**30,
        "help": "GiB of score matrices held at once; a larger test set is evaluated in streamed blocks."})

    def __post_init__(self):
        check_numbers(self, EVAL_NUMBER_RULES)


# The range of each number of EvalOptions (cache/numbers.py: every number must also be finite; the
# factors that multiply scores are bounded by MAX_FACTOR, past which float32 scores overflow or lose
# the stage-1 order).
EVAL_NUMBER_RULES = {"sample_steps": ">=1", "top_k": ">=1", "alpha": "|factor|", "temp": "factor", "dsl_temp": ">0",
                     "qb_beta": "factor", "qb_k": ">=1", "seed": ">=0", "memory_budget": ">=1"}


@dataclass
class EvalData:
    """One split of one cache, ready to score: features and the stage-1 score matrix S [Nt, Nv]."""

    reader: CacheReader
    features: SplitFeatures
    scores: torch.Tensor


def load_eval_data(cache_dir: Path, split: str = "test", device="cpu") -> EvalData:
    reader = CacheReader(cache_dir)
    f = load_split(reader, split)
    if len(f.caption_id) == 0 or len(f.video_id) == 0:
        raise CacheError(f"{cache_dir} has no {split} captions or videos to evaluate")
    S = wti_similarity_chunked(f.words, f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits,
                               device=device, padding=f.wti_padding)
    return EvalData(reader, f, S)


def training_progress(gen: Generator) -> dict:
    """{"epochs_done", "epochs", "unfinished"} of a trained generator: unfinished when fewer epochs
    were done than its config asked for (a run that was stopped or killed and not resumed)."""
    done, asked = gen.meta.get("epochs_done"), gen.config.epochs
    if not isinstance(done, int):
        return {}
    return {"epochs_done": done, "epochs": asked, "unfinished": done < asked}


def unfinished_warning(report: dict, generator_dir) -> str | None:
    """The warning for a report of an unfinished generator (None: finished)."""
    if not report.get("unfinished"):
        return None
    return (f"warning: the generator in {generator_dir} is unfinished: {report['epochs_done']} of its "
            f"{report['epochs']} epochs were trained (finish it with train-generator --resume)")


def check_generator_cache(meta: dict, reader: CacheReader, cache_dir, generator_dir, allow_other_cache=False):
    """Refuse (CacheError) a cache the generator cannot read: another width always, another stage-1
    model (fingerprint) unless `allow_other_cache`."""
    consumer = f"the generator in {generator_dir}"
    src = meta.get("cache", {})
    check_compatible(reader.manifest, width=meta["width"], schema_version=src.get("schema_version"),
                     cache=cache_dir, consumer=consumer)
    if not allow_other_cache and src.get("fingerprint") is not None:
        try:
            check_compatible(reader.manifest, fingerprint=src["fingerprint"], cache=cache_dir, consumer=consumer)
        except CacheError as e:
            raise CacheError(f"{e} (or pass --allow-other-cache)") from None


def ground_truth(caption_video: torch.Tensor, n_videos: int) -> tuple[np.ndarray, np.ndarray]:
    """-> t2v_gt [Nt] (the right video column per caption row) and v2t_gt: [Nv] when every video has
    exactly one caption, else [Nv, C] (its caption columns, padded with -1). v2t_gt's rows are the
    groups of the v2t protocol: a query video scores gallery video g by the max of its v2t row over
    the columns v2t_gt[g], and its rank is that of its own video among the videos."""
    cv = caption_video.numpy()
    counts = np.bincount(cv, minlength=n_videos)
    if (counts == 1).all():
        gt = np.empty(n_videos, dtype=np.int64)
        gt[cv] = np.arange(len(cv))
        return cv.astype(np.int64), gt
    gt = np.full((n_videos, max(1, counts.max())), -1, dtype=np.int64)
    fill = np.zeros(n_videos, dtype=np.int64)
    for c, v in enumerate(cv):
        gt[v, fill[v]] = c
        fill[v] += 1
    return cv.astype(np.int64), gt


def save_sims(path: Path, matrices: dict[str, tuple[torch.Tensor, torch.Tensor]], f: SplitFeatures) -> None:
    """Write `<row>_t2v` [Nt, Nv], `<row>_v2t` [Nv, Nt], `t2v_gt`, `v2t_gt`, `caption_id`, `video_id` (.npz)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    t2v_gt, v2t_gt = ground_truth(f.caption_video, len(f.video_id))
    arrays = {"t2v_gt": t2v_gt, "v2t_gt": v2t_gt, "caption_id": np.array(f.caption_id, dtype=str),
              "video_id": np.array(f.video_id, dtype=str)}
    for row, (a, b) in matrices.items():
        arrays[f"{row}_t2v"], arrays[f"{row}_v2t"] = a.float().numpy(), b.float().numpy()
    with atomic_open(path) as fh:
        np.savez(fh, **arrays)


def _bank_blocks(reader: CacheReader, f: SplitFeatures, direction: str, device, chunk: int = 1024):
    """Score blocks [b, Nc] of the training queries (the bank) against the evaluated candidates."""
    if "train" not in reader.manifest.splits:
        raise CacheError(f"{reader.root} has no train split to serve as the QB-Norm query bank")
    if direction == "t2v":
        text = reader.text("train")
        for s in range(0, len(text), chunk):
            yield wti_similarity_chunked(text.words[s:s + chunk], text.word_mask[s:s + chunk],
                                         text.word_logits[s:s + chunk], f.frames, f.frame_mask, f.frame_logits,
                                         device=device, padding=f.wti_padding)
    else:
        video = reader.video("train")
        for s in range(0, len(video), chunk // 4):
            e = s + chunk // 4
            yield wti_similarity_chunked(f.words, f.word_mask, f.word_logits, video.frames[s:e],
                                         video.frame_mask[s:e], video.frame_logits[s:e], device=device,
                                         padding=f.wti_padding).t()


def query_banks(reader: CacheReader, f: SplitFeatures, opts: EvalOptions, device) -> dict:
    """QB-Norm's query banks {"t2v": QueryBank over videos, "v2t": QueryBank over captions}."""
    return {d: query_bank(_bank_blocks(reader, f, d, device), len(f.video_id) if d == "t2v" else len(f.caption_id),
                          opts.qb_beta, opts.qb_k) for d in ("t2v", "v2t")}


def reviser_info(opts: EvalOptions, logit_scale: float, banks: dict | None) -> dict:
    info = {}
    if opts.dsl:
        info["dsl"] = {"temp": opts.dsl_temp, "logit_scale": logit_scale, "on": "discriminative"}
    if banks is not None:
        info["qbnorm"] = {"beta": opts.qb_beta, "k": opts.qb_k, "on": "discriminative",
                          "bank": {"t2v": banks["t2v"].size, "v2t": banks["v2t"].size}}
    return info


def revised_rows(data: EvalData, opts: EvalOptions, device) -> tuple[dict, dict]:
    """The `dsl` and `qbnorm` rows (as asked for) on the stage-1 scores -> (matrices, settings)."""
    S, out = data.scores, {}
    scale = float(data.reader.manifest.logit_scale)
    if opts.dsl:
        out["dsl"] = (dual_softmax(S, opts.dsl_temp, scale), dual_softmax(S.t(), opts.dsl_temp, scale))
    banks = query_banks(data.reader, data.features, opts, device) if opts.qb_norm else None
    if banks is not None:
        out["qbnorm"] = (qb_norm(S, banks["t2v"]), qb_norm(S.t().contiguous(), banks["v2t"]))
    return out, reviser_info(opts, scale, banks)


def eval_sampler(gen: Generator, opts: EvalOptions):
    """The generator's sampler as `opts` asks for it (sampler, S steps, clamp, DDIM's epsilon)."""
    return gen.sampler(opts.sampler, opts.sample_steps, clamp=opts.clamp, ddim_eps=opts.ddim_eps)


def diffusion_row(data: EvalData, gen: Generator, smp, opts: EvalOptions, device, progress=None):
    """-> (t2v scores [Nt, Nv], v2t scores [Nv, Nt]) re-ranked by the generator with sampler `smp`."""
    f, S = data.features, data.scores
    common = dict(sampler=smp, top_k=opts.top_k, alpha=opts.alpha, temp=opts.temp, seed=opts.seed, device=device,
                  progress=progress)
    s_t2v = rerank(S, gen.t2v, f.sentence, None, f.frames, f.frame_mask, **common)
    s_v2t = rerank(S.t().contiguous(), gen.v2t, f.frames, f.frame_mask, f.sentence, None, **common)
    return s_t2v, s_v2t


def evaluate(cache_dir: Path, generator_dir: Path | None, opts: EvalOptions | None = None, progress=None,
             save_sims_to: Path | None = None, **overrides) -> dict:
    """-> {"n_queries", "n_candidates", "top_k", "steps", "results": {row: metrics}, ...}.

    `overrides` set EvalOptions fields (evaluate(cache, gen, sample_steps=10, top_k=5)). Without a
    generator only the stage-1 row and the revisers are reported.
    """
    t0 = time.time()
    opts = EvalOptions(**{**asdict(opts or EvalOptions()), **overrides})  # its __post_init__ checks the numbers
    if save_sims_to is not None:
        check_output_path(save_sims_to, "--save-sims", folder=False)
    dev = resolve_device(opts.device)
    reader = CacheReader(cache_dir)
    if not any(c.get("captions") for c in reader.manifest.splits.values()):  # a folder collection: no queries
        raise CacheError(f"{cache_dir} holds videos without captions (split {', '.join(reader.splits) or 'none'}), "
                         f"so there are no queries to evaluate; search it with `diffret search --cache {cache_dir}`")
    gen = smp = None
    if generator_dir is not None:
        gen = load_generator(generator_dir, dev)
        check_generator_cache(gen.meta, reader, cache_dir, generator_dir, opts.allow_other_cache)
        smp = eval_sampler(gen, opts)
    budget = opts.memory_budget or DEFAULT_MEMORY_BUDGET
    counts = reader.manifest.splits.get(opts.split) or {}
    nt, nv = int(counts.get("captions", 0)), int(counts.get("videos", 0))
    need = in_memory_bytes(nt, nv, gen is not None, opts.dsl, opts.qb_norm)
    if need > budget and save_sims_to is not None:
        raise ValueError(f"--save-sims needs the full {nt} x {nv} score matrices ({need / 2**30:.1f} GiB), over the "
                         f"{budget / 2**30:.1f} GiB memory budget; evaluate without --save-sims (the metrics stream)")
    if need > budget:
        check_streamable(opts, nt, nv, gen is not None)
        f = load_split(reader, opts.split)
        if len(f.caption_id) == 0 or len(f.video_id) == 0:
            raise CacheError(f"{cache_dir} has no {opts.split} captions or videos to evaluate")
        data = None
    else:
        data = load_eval_data(cache_dir, opts.split, dev)
        f, S = data.features, data.scores
    report = {"cache": str(cache_dir), "generator": str(generator_dir) if generator_dir else None,
              "split": opts.split, "n_queries": len(f.caption_id), "n_candidates": len(f.video_id)}
    matrices = {}
    if data is not None:
        matrices["discriminative"] = (S, S.t())
    if gen is not None:
        if data is not None:
            matrices["diffusion"] = diffusion_row(data, gen, smp, opts, dev, progress)
        cfg, trained_on = gen.config, gen.meta.get("cache", {})
        report.update({
            "top_k": "all" if opts.top_k is None or opts.top_k >= len(f.video_id) else opts.top_k,
            "steps": smp.num_inference_steps, "train_steps": cfg.train_steps, "schedule": cfg.schedule,
            "sampler": opts.sampler, "clamp": opts.clamp, "alpha": opts.alpha, "temp": opts.temp,
            **({"ddim_eps": opts.ddim_eps} if opts.sampler == "ddim" else {}),
            "generator_cache": trained_on.get("path"),
            "out_of_domain": trained_on.get("path") not in (None, str(Path(cache_dir).resolve())),
            **training_progress(gen),
        })
    if data is not None:
        revised, info = revised_rows(data, opts, dev)
        matrices.update(revised)
        report.update(info)
        report["results"] = {row: retrieval_metrics(a, b, f.caption_video) for row, (a, b) in matrices.items()}
    else:
        scale = float(reader.manifest.logit_scale)
        banks = query_banks(reader, f, opts, dev) if opts.qb_norm else None
        report.update(reviser_info(opts, scale, banks))
        results, info = streamed_metrics(f, opts, dev, gen, smp, banks, scale, budget, progress=progress)
        report["results"] = results
        report["memory"] = {"budget": budget, "in_memory_bytes": need, **info}
    if save_sims_to is not None:
        save_sims(save_sims_to, matrices, f)
        report["sims"] = str(save_sims_to)
    report.update({"seconds": round(time.time() - t0, 2), "device": str(dev), "seed": opts.seed})
    return report
