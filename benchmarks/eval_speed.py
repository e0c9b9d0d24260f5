"""Evaluation speed: diffret's generation against the original's way, same math, same scores.

Builds an MSRVTT-sized synthetic cache (default 1,000 captions x 1,000 videos, 12 frames, 32
words, width 512) with the project's writer, computes the stage-1 WTI scores, then samples
50 DDIM steps in both directions:

- diffret (`generator/rerank.py`): x_T drawn per chunk of queries, the work in cache-sized
  blocks that run all steps while their context stays in L2, step-independent parts (`prepare`,
  the time embedding's share of every logit and of the decoder input) computed once per block.
- baseline (the original's way, `generator/reference.py` `baseline_rerank`): chunks of 32
  queries, each query's top-32 candidates, one full denoiser call per step per chunk (the formula
  as written, everything recomputed every step).

`--fused compile` runs the sampling add-ReLU-dot through torch.compile (generator/fused.py; the
first call compiles, which the figure includes unless `--warm`). The JSON's `roofline` gives the
machine's matmul and copy peaks probed in the same run and the share of them each figure reaches
(`benchmarks/roofline.py`).

Both start from the same x_T, so their final scores must agree; the JSON says by how much.
Usage: python benchmarks/eval_speed.py --device cpu --json out.json [--queries 1000] [--skip-all]

`--growth 1000,10000,100000` instead measures evaluation's memory as the test set grows, each size
in a fresh process (peak RSS = ru_maxrss; on cuda also torch.cuda.max_memory_allocated), on
synthetic features built in memory (words float16 as `load_split` keeps them): the in-memory path
(S and a matrix per row) where it fits the default budget and is cheap enough to run (1,000), and
the streamed path (`pipeline/streaming.py`) at every size. Past 1,000 the streamed passes stop
after `--max-blocks` blocks of `--block` captions (a full WTI pass at 100k x 100k is ~4e15 FLOPs,
days on 2 cores): their memory, O(N K + block N) besides the features, is reached in the first
block; the JSON marks those rows "partial".

The JSON records the OpenMP wait policy, the thread count and the load averages: on a CPU shared
with other jobs, the default (spinning) OpenMP threads of the original's loop wait at every op for a
descheduled partner (diffret's hot loops run independent blocks on single-threaded workers instead,
see cache/blocks.py `run_blocks`); OMP_WAIT_POLICY=PASSIVE is fairer to the baseline under load.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_synthetic_cache  # noqa: E402

from diffret.cache.wti import wti_similarity_chunked  # noqa: E402
from diffret.generator.config import GeneratorConfig  # noqa: E402
from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser  # noqa: E402
from diffret.generator.device import resolve_device  # noqa: E402
from diffret.generator.features import load_split  # noqa: E402
from diffret.generator.generator import Generator  # noqa: E402
from diffret.generator import fused  # noqa: E402
from diffret.generator.reference import baseline_rerank, initial_noise  # noqa: E402
from diffret.generator.rerank import rerank  # noqa: E402
import roofline  # noqa: E402


def random_generator(width: int, steps: int, device) -> Generator:
    """Untrained denoisers (PyTorch's default init) on a cosine schedule of T = `steps`."""
    t2v, v2t = T2VDenoiser(width).to(device).eval(), V2TDenoiser(width).to(device).eval()
    return Generator(GeneratorConfig(train_steps=steps), t2v, v2t, {"width": width})


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Linux: restart the peak-RSS count (VmHWM) from the current RSS, so the peak of what follows
    can be read without the peak of building the inputs. False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def environment(device) -> dict:
    return {"machine": f"{platform.machine()} {os.cpu_count()} cpus, {torch.get_num_threads()} threads"
            + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else ""),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: spin)"), "load_avg": os.getloadavg()}


def synthetic_features(n: int, width: int = 512, frames: int = 12, words: int = 32, seed: int = 0):
    """SplitFeatures of n captions x n videos built in memory (words float16, as load_split keeps them)."""
    from diffret.generator.features import SplitFeatures

    g = torch.Generator().manual_seed(seed)
    fr = torch.empty(n, frames, width)
    wo = torch.empty(n, words, width, dtype=torch.float16)
    for s in range(0, n, 1024):
        e = min(n, s + 1024)
        fr[s:e] = torch.randn(e - s, frames, width, generator=g)
        wo[s:e] = (fr[s:e].mean(1, keepdim=True) + 2 * torch.randn(e - s, words, width, generator=g)).half()
    fmask = torch.arange(frames)[None] < (frames - torch.randint(0, 3, (n,), generator=g))[:, None]
    wmask = torch.arange(words)[None] < torch.randint(6, words, (n,), generator=g)[:, None]
    return SplitFeatures([f"c{i}" for i in range(n)], torch.arange(n), wo[:, -1].float(), wo, wmask,
                         torch.randn(n, words, generator=g), [f"v{i}" for i in range(n)], fr, fmask,
                         torch.randn(n, frames, generator=g))


def growth_one(n: int, mode: str, device, block: int, max_blocks: int | None, steps: int) -> dict:
    """Peak memory of one evaluation (stage-1, diffusion top-32 and DSL rows) of n x n items."""
    from diffret.pipeline.evaluate import EvalOptions
    from diffret.pipeline.metrics import retrieval_metrics
    from diffret.pipeline.revisers import dual_softmax
    from diffret.pipeline.streaming import in_memory_bytes, streamed_metrics

    t0 = time.perf_counter()
    f = synthetic_features(n)
    features_mb = rss_mb()
    reset = reset_peak_rss()
    opts = EvalOptions(top_k=32, sample_steps=steps, dsl=True)
    gen = random_generator(f.width, steps, device)
    t2v, v2t, smp = gen.t2v, gen.v2t, gen.sampler("ddim", steps)
    row = {"items": n, "mode": mode, "features_rss_mb": round(features_mb, 1),
           "in_memory_bytes_formula_mb": round(in_memory_bytes(n, n, True, True, False) / 2**20, 1)}
    if mode == "in-memory":
        S = wti_similarity_chunked(f.words, f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits,
                                   device=device, padding=f.wti_padding)
        common = dict(sampler=smp, top_k=32, device=device)
        d = (rerank(S, t2v, f.sentence, None, f.frames, f.frame_mask, **common),
             rerank(S.t().contiguous(), v2t, f.frames, f.frame_mask, f.sentence, None, **common))
        rows = {"discriminative": (S, S.t()), "diffusion": d,
                "dsl": (dual_softmax(S, 1.0, 100.0), dual_softmax(S.t(), 1.0, 100.0))}
        results = {k: retrieval_metrics(a, b, f.caption_video) for k, (a, b) in rows.items()}
    else:
        results, info = streamed_metrics(f, opts, device, gen, smp, None, 100.0, block=block,
                                         max_blocks=max_blocks)
        row.update(block_captions=info["block_captions"], partial=max_blocks is not None,
                   blocks_per_pass=min(max_blocks or 10**9, -(-n // info["block_captions"])),
                   state_formula="features O(N (L + F) D) + state 12 B x K x (Nt + Nv) + block 16-56 B x block x Nv"
                                 " (+ 1 B x Nv x videos of several captions a row: none here)")
    row.update(peak_rss_mb=round(peak_rss_mb(), 1),  # the process's, building the features included
               eval_peak_rss_mb=round(hwm_mb(), 1) if reset else None,  # peak RSS during evaluation only
               eval_over_features_mb=round(hwm_mb() - features_mb, 1) if reset else None,
               seconds=round(time.perf_counter() - t0, 1), **environment(device))
    if device.type == "cuda":
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if not row.get("partial"):
        row["metrics"] = {k: {d: v[d]["R@1"] for d in ("t2v", "v2t")} for k, v in results.items()}
    return row


def growth(args) -> list[dict]:
    rows = []
    for n in args.growth:
        for mode in (["in-memory"] if n <= 1000 else []) + ["streamed"]:
            cmd = [sys.executable, __file__, "--growth-one", str(n), "--mode", mode, "--device", args.device,
                   "--block", str(args.block), "--steps", str(args.steps)]
            if n > 1000:
                cmd += ["--max-blocks", str(args.max_blocks)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


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
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--skip-baseline", action="store_true", help="time diffret alone (no baseline, no check)")
    ap.add_argument("--fused", choices=fused.FUSED, default="auto", help="sampling's add-ReLU-dot kernel (rerank's)")
    ap.add_argument("--warm", action="store_true", help="run diffret once untimed first (compile, caches)")
    ap.add_argument("--no-roofline", dest="roofline", action="store_false")
    ap.add_argument("--growth", type=lambda v: [int(x) for x in v.split(",")],
                    help="measure memory growth at these sizes instead (e.g. 1000,10000,100000)")
    ap.add_argument("--block", type=int, default=256, help="--growth: captions per streamed block")
    ap.add_argument("--max-blocks", type=int, default=1, help="--growth: blocks per streamed pass past 1,000 items")
    ap.add_argument("--growth-one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="streamed", help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.growth_one:
        print(json.dumps(growth_one(args.growth_one, args.mode, device, args.block,
                                    args.max_blocks if args.growth_one > 1000 else None, args.steps)))
        return
    if args.growth:
        rows = growth(args)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
        return
    env0 = environment(device)

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        if not (cache / "manifest.json").exists():
            write_synthetic_cache(cache, args.queries, width=args.width)
        t0 = time.perf_counter()
        f = load_split(cache, "test")
        load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    S = wti_similarity_chunked(f.words, f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits,
                               device=device, padding=f.wti_padding)
    sync(device)
    stage1_s = time.perf_counter() - t0

    D = f.width
    gen = random_generator(D, args.steps, device)
    t2v, v2t, sampler = gen.t2v, gen.v2t, gen.sampler("ddim", args.steps)
    dev_feats = f.to(device) if device.type == "cuda" else f
    directions = {
        "t2v": (S, t2v, dev_feats.sentence, None, dev_feats.frames, dev_feats.frame_mask),
        "v2t": (S.t().contiguous(), v2t, dev_feats.frames, dev_feats.frame_mask, dev_feats.sentence, None),
    }
    rows, peaks = [], None
    for top_k in [32] + ([] if args.skip_all else ["all"]):
        k = S.shape[1] if top_k == "all" else top_k
        row = {"top_k": top_k, "device": str(device), "queries": len(S), "videos": S.shape[1], "steps": args.steps,
               "width": D, "load_s": round(load_s, 3), "stage1_s": round(stage1_s, 3)}
        diffret_s, baseline_s, max_diff = 0.0, 0.0, 0.0
        for name, (scores, model, q, qm, g, gm) in directions.items():
            chunk = args.chunk if top_k == 32 else max(1, min(args.chunk, 64))
            if args.warm:
                rerank(scores[:64], model, q[:64], None if qm is None else qm[:64], g, gm, sampler,
                       top_k=k, chunk=chunk, seed=0, device=device, fused=args.fused)
            sync(device)
            t0 = time.perf_counter()
            fast = rerank(scores, model, q, qm, g, gm, sampler, top_k=k, chunk=chunk, seed=0, device=device,
                          fused=args.fused)
            sync(device)
            diffret_s += time.perf_counter() - t0
            if top_k == 32 and not args.skip_baseline:
                x_T = initial_noise(len(scores), k, chunk, 0, device)
                t0 = time.perf_counter()
                slow = baseline_rerank(scores, model, q, qm, g, gm, sampler, x_T, top_k=k, device=device)
                sync(device)
                baseline_s += time.perf_counter() - t0
                max_diff = max(max_diff, (fast - slow).abs().max().item())
        row["diffret_s"] = round(diffret_s, 3)
        row["fused"] = args.fused
        row["compiled"] = fused.use_compiled(args.fused, device, len(S) * k * args.steps * 2 * D)
        if args.roofline:
            peaks = peaks or roofline.probe(device)
            peak = peaks.get("gpu") or peaks[f"{torch.get_num_threads()}_thread"]
            nq, nc, F = len(S), S.shape[1], f.frames.shape[1]
            work = [roofline.generation_work(nq, k, nc, F, D, args.steps, d, row["compiled"]) for d in ("t2v", "v2t")]
            flops, nbytes = sum(w["flops"] for w in work), sum(w["bytes"] for w in work)
            row["roofline"] = {"peaks": peaks, "diffret": roofline.fraction(flops, nbytes, diffret_s, peak)}
            if baseline_s:
                # the plain formula's multiply-adds per step: per pair the frame attention and pooling, k_proj
                # and v_proj, the decoder's two layers; per query q_proj, proj and the time embedding
                base_flops = 2 * args.steps * 2 * (nq * k * (2 * F * D + 6 * D * D + 2 * D) + nq * 4 * D * D)
                row["roofline"]["baseline"] = roofline.fraction(base_flops, 0.0, baseline_s, peak)
        if top_k == 32 and not args.skip_baseline:
            row.update(baseline_s=round(baseline_s, 3), speedup=round(baseline_s / diffret_s, 1),
                       max_abs_score_diff=max_diff, same_scores=bool(max_diff < 1e-4))
        row["peak_rss_mb"] = round(peak_rss_mb(), 1)
        if device.type == "cuda":
            row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        row.update(environment(device), load_avg_start=env0["load_avg"])
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
