"""Evaluation speed: diffret's generation against the original's way, same math, same scores.

Builds an MSRVTT-sized synthetic cache (default 1,000 captions x 1,000 videos, 12 frames, 32
words, width 512) with the project's writer, computes the stage-1 WTI scores, then samples
50 DDIM steps in both directions:

- diffret: all queries at once (chunked only to bound memory); the step-independent half of
  the denoiser (`prepare`) runs once, outside the step loop.
- baseline (the original's way): chunks of 32 queries, each query's top-32 candidates, one full
  denoiser call per step per chunk (the formula as written, everything recomputed every step).

Both start from the same x_T, so their final scores must agree; the JSON says by how much.
Usage: python benchmarks/eval_speed.py --device cpu --json out.json [--queries 1000] [--skip-all]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_synthetic_cache  # noqa: E402

from diffret.cache.wti import wti_similarity_chunked  # noqa: E402
from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser  # noqa: E402
from diffret.generator.features import load_split  # noqa: E402
from diffret.generator.rerank import rerank  # noqa: E402
from diffret.generator.sampler import make_sampler  # noqa: E402
from diffret.generator.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def initial_noise(nq: int, k: int, chunk: int, seed: int, device) -> torch.Tensor:
    """The x_T that `rerank` draws: one randn((n, k)) per chunk of queries, in order."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.cat([torch.randn((min(chunk, nq - s), k), generator=gen, device=device) for s in range(0, nq, chunk)])


@torch.inference_mode()
def baseline_rerank(S, denoiser, query, query_mask, gallery, gallery_mask, sampler, x_T, top_k=32, chunk=32,
                    alpha=1.0, temp=1.0, device="cpu"):
    """The original's inference loop: per chunk of 32 queries, the full formula at every step."""
    top = S.topk(top_k, dim=1).indices
    out = S.clone()
    t2v = isinstance(denoiser, T2VDenoiser)
    steps = sampler.timesteps.tolist()
    for s in range(0, len(S), chunk):
        idx = top[s:s + chunk]
        q = query[s:s + chunk].to(device)
        if t2v:
            args = (q, gallery[idx].to(device), gallery_mask[idx].to(device))
        else:
            args = (gallery[idx].to(device), q, query_mask[s:s + chunk].to(device))
        x_t = x_T[s:s + chunk]
        for i, t in enumerate(steps):
            tb = torch.full((len(idx),), t, dtype=torch.long, device=device)
            x0 = denoiser.reference_forward(x_t, tb, *args)
            if i == len(steps) - 1:
                x0 = x0.clamp(-1, 1)
            else:
                x_t = sampler.step(x0, t, x_t)
        rows = torch.arange(s, s + len(idx))[:, None]
        out[rows, idx] = S[rows, idx] + alpha * torch.softmax(x0.float() * temp, dim=1).cpu()
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--queries", type=int, default=1000, help="captions = videos")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=1000, help="diffret's query chunk")
    ap.add_argument("--skip-all", action="store_true", help="skip generation over the whole gallery")
    ap.add_argument("--cache", type=Path, help="reuse a synthetic cache folder")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        if not (cache / "manifest.json").exists():
            write_synthetic_cache(cache, args.queries, width=args.width)
        t0 = time.perf_counter()
        f = load_split(cache, "test")
        load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    S = wti_similarity_chunked(f.words, f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits,
                               device=device)
    sync(device)
    stage1_s = time.perf_counter() - t0

    D = f.width
    t2v, v2t = T2VDenoiser(D).to(device).eval(), V2TDenoiser(D).to(device).eval()
    sampler = make_sampler("ddim", NoiseSchedule(ScheduleConfig(steps=args.steps)), args.steps)
    dev_feats = f.to(device) if device.type == "cuda" else f
    directions = {
        "t2v": (S, t2v, dev_feats.sentence, None, dev_feats.frames, dev_feats.frame_mask),
        "v2t": (S.t().contiguous(), v2t, dev_feats.frames, dev_feats.frame_mask, dev_feats.sentence, None),
    }
    rows = []
    for top_k in [32] + ([] if args.skip_all else ["all"]):
        k = S.shape[1] if top_k == "all" else top_k
        row = {"top_k": top_k, "device": str(device), "queries": len(S), "videos": S.shape[1], "steps": args.steps,
               "width": D, "load_s": round(load_s, 3), "stage1_s": round(stage1_s, 3)}
        diffret_s, baseline_s, max_diff = 0.0, 0.0, 0.0
        for name, (scores, model, q, qm, g, gm) in directions.items():
            chunk = args.chunk if top_k == 32 else max(1, min(args.chunk, 64))
            sync(device)
            t0 = time.perf_counter()
            fast = rerank(scores, model, q, qm, g, gm, sampler, top_k=k, chunk=chunk, seed=0, device=device)
            sync(device)
            diffret_s += time.perf_counter() - t0
            if top_k == 32:
                x_T = initial_noise(len(scores), k, chunk, 0, device)
                t0 = time.perf_counter()
                slow = baseline_rerank(scores, model, q, qm, g, gm, sampler, x_T, top_k=k, device=device)
                sync(device)
                baseline_s += time.perf_counter() - t0
                max_diff = max(max_diff, (fast - slow).abs().max().item())
        row["diffret_s"] = round(diffret_s, 3)
        if top_k == 32:
            row.update(baseline_s=round(baseline_s, 3), speedup=round(baseline_s / diffret_s, 1),
                       max_abs_score_diff=max_diff, same_scores=bool(max_diff < 1e-4))
        row["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if device.type == "cuda":
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row["machine"] = f"{platform.machine()} {torch.get_num_threads()} threads" + (
            f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "")
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
