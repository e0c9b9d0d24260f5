"""The evaluation protocol: stage-1 scores from cached tokens, diffusion re-ranking, metrics.

Rows of the result: `discriminative` (stage-1 WTI scores alone) and `diffusion` (the same
scores re-ranked by the generator over each query's top-K candidates), both directions.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from diffret.cache.manifest import CacheError
from diffret.cache.store import CacheReader
from diffret.cache.wti import wti_similarity_chunked
from diffret.generator.checkpoint import load_generator
from diffret.generator.features import load_split
from diffret.generator.rerank import rerank
from diffret.generator.sampler import make_sampler
from diffret.generator.schedule import NoiseSchedule, ScheduleConfig

from .metrics import retrieval_metrics


def evaluate(
    cache_dir: Path, generator_dir: Path, steps: int | None = 50, top_k: int = 32, alpha: float = 1.0,
    temp: float = 1.0, sampler: str = "ddim", split: str = "test", device: str = "auto", seed: int = 0,
    log=print,
) -> dict:
    """-> {"n_queries", "n_candidates", "top_k", "steps", "results": {row: metrics}, "seconds"}.

    `steps` is the number of sampling steps (<= the generator's T; None = T).
    """
    t0 = time.time()
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    reader = CacheReader(cache_dir)
    cfg, t2v, v2t, meta = load_generator(generator_dir, dev)
    if meta["width"] != reader.manifest.width:
        raise CacheError(
            f"generator {generator_dir} has width {meta['width']} but cache {cache_dir} has width "
            f"{reader.manifest.width}; train a generator on this cache"
        )
    f = load_split(reader, split)
    S = wti_similarity_chunked(f.words, f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits, device=dev)
    results = {"discriminative": retrieval_metrics(S, S.t(), f.caption_video)}

    schedule = NoiseSchedule(ScheduleConfig(kind=cfg.schedule, steps=cfg.steps, beta_scale=cfg.beta_scale))
    if steps is not None and steps > cfg.steps:
        raise ValueError(f"--steps {steps} is more than the generator's {cfg.steps} diffusion steps")
    smp = make_sampler(sampler, schedule, steps)
    common = dict(sampler=smp, top_k=top_k, alpha=alpha, temp=temp, seed=seed, device=dev)
    s_t2v = rerank(S, t2v, f.sentence, None, f.frames, f.frame_mask, **common)
    s_v2t = rerank(S.t().contiguous(), v2t, f.frames, f.frame_mask, f.sentence, None, **common)
    results["diffusion"] = retrieval_metrics(s_t2v, s_v2t, f.caption_video)
    return {
        "cache": str(cache_dir), "generator": str(generator_dir), "split": split,
        "n_queries": len(f.caption_id), "n_candidates": len(f.video_id), "top_k": min(top_k, len(f.video_id)),
        "steps": smp.num_inference_steps, "sampler": sampler, "alpha": alpha, "temp": temp,
        "results": results, "seconds": round(time.time() - t0, 2), "device": str(dev),
    }
