"""Stage-two training speed and memory at MSRVTT-9k size, against the original's way.

Builds a synthetic cache with the project's writer (default: 9,000 videos x 20 captions = 180,000
training captions, 12 frames, 32 words, width 512; timed separately), then runs the real training
loop, `diffret.generator.trainer.train_generator` (K = 128 candidates, batch 128, in-batch
negatives), for one epoch, timing every step. `--max-steps N` times only the first N steps and
extrapolates to the epoch (the JSON says `extrapolated: true`).

The reference is today's implementation before issue 14 (`benchmarks/legacy_stage2.py`: the first
decoder layer on every pair's pooled video), swapped into the same loop and timed in the same run
(`speedup_vs_reference`; `same_loss_as_reference` checks both trained alike). `roofline` probes this
machine's matmul and copy peaks in the run and gives the fraction of each that a step reaches
(`benchmarks/roofline.py`).

The baseline is the original's way: every step recomputes the frozen stage-1 features from pixels
(open_clip ViT-B-32, randomly initialised, nothing downloaded, with the temporal transformer and
the similarity head: 128 videos x 12 frames of 224 x 224 and 128 captions x 32 tokens, forward under
no_grad, AMP on CUDA), then takes the same denoiser step (`trainer.train_step`). On a CPU only
`--baseline-videos` videos and captions go through CLIP and that time is scaled linearly to the
batch (`baseline.extrapolated: true`); the denoiser step always runs at full size.

`--growth` measures, each in a fresh process on a cache built beforehand, the resident memory of
training at 1k, 10k and 100k captions (`--growth-sizes`): after loading the features, and its peak.

    python benchmarks/train_speed.py --device cuda --json train.json
    python benchmarks/train_speed.py --device cpu --max-steps 20 --json train.json
    python benchmarks/train_speed.py --device cpu --max-steps 10 --no-baseline --threads 1 --json train.json
    python benchmarks/train_speed.py --device cpu --growth --json growth.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import roofline  # noqa: E402
from legacy_stage2 import legacy_denoise_pairs  # noqa: E402
from synthetic import write_synthetic_cache  # noqa: E402

from diffret.generator import trainer  # noqa: E402
from diffret.generator.config import GeneratorConfig  # noqa: E402
from diffret.generator.device import resolve_device  # noqa: E402
from diffret.generator.features import SplitFeatures  # noqa: E402
from diffret.generator.schedule import NoiseSchedule  # noqa: E402

GIB = 2**30


def rss_gib() -> float | None:
    """Resident set size of this process now (Linux /proc), GiB."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def r(x, n=4):
    return None if x is None else round(float(x), n)


class StepClock:
    """A `progress` for train_generator that timestamps every step (and notes the RSS when the
    epoch starts, i.e. with the features loaded). Every step ends in loss.item(), a device sync."""

    def __init__(self):
        self.start = None
        self.stamps: list[float] = []
        self.rss_at_start = None

    def add_task(self, label, total=None):
        if label.startswith("generator epoch") and self.start is None:
            self.start, self.rss_at_start = time.perf_counter(), rss_gib()
        return label

    def update(self, task, advance=1, description=None):
        if str(task).startswith("generator epoch"):
            self.stamps.append(time.perf_counter())

    def remove_task(self, task):
        pass


def cache_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def build_cache(root: Path, args) -> dict:
    t0 = time.perf_counter()
    write_synthetic_cache(root, args.videos, args.captions_per_video, split="train", width=args.width,
                          n_frames=args.frames, n_words=args.words, noise_bank=args.noise_bank)
    return {"build_seconds": r(time.perf_counter() - t0, 2), "bytes": cache_bytes(root), "built": True}


def measure_training(cache: Path, args, device: torch.device, pairs=None) -> dict:
    """One (possibly partial) epoch of train_generator on `cache`; per-step times and memory.
    pairs: another `denoise_pairs` to train with (the reference path: legacy_stage2's)."""
    cfg = GeneratorConfig(epochs=1, batch_size=args.batch, candidates=args.candidates, negatives=args.negatives,
                          device=str(device), seed=args.seed)
    clock = StepClock()
    rss_before = rss_gib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    original = trainer.denoise_pairs
    with tempfile.TemporaryDirectory(prefix="train-speed-gen-") as out:
        t0 = time.perf_counter()
        try:
            trainer.denoise_pairs = pairs or original
            meta = trainer.train_generator(cache, Path(out), cfg, progress=clock, log=lambda *a, **k: None,
                                           max_steps=args.max_steps)
        finally:
            trainer.denoise_pairs = original
        total = time.perf_counter() - t0
    n = meta["cache"]["train_captions"]
    steps_per_epoch = max(1, n // min(args.batch, n))
    times = [b - a for a, b in zip([clock.start] + clock.stamps[:-1], clock.stamps)]
    warm = min(args.warmup, max(0, len(times) - 1))
    steady = times[warm:] or times
    mean = statistics.mean(steady)
    extrapolated = len(times) < steps_per_epoch
    epoch = sum(times[:warm]) + (steps_per_epoch - warm) * mean if extrapolated else clock.stamps[-1] - clock.start
    out = {
        "captions": n, "steps_per_epoch": steps_per_epoch, "steps_timed": len(times), "warmup_steps": warm,
        "setup_seconds": r(clock.start - t0, 2),
        "seconds_per_step": r(statistics.median(steady)), "seconds_per_step_mean": r(mean),
        "seconds_per_step_min": r(min(steady)), "first_step_seconds": r(times[0]),
        "epoch_seconds": r(epoch, 3), "extrapolated": extrapolated, "total_seconds_run": r(total, 1),
        "loss": meta["history"][-1] if meta["history"] else None,
        "rss_before_load_gib": r(rss_before, 3), "rss_after_load_gib": r(clock.rss_at_start, 3),
        "peak_rss_gib": r(peak_rss_gib(), 3),
    }
    if device.type == "cuda":
        out["cuda_max_memory_allocated_gib"] = r(torch.cuda.max_memory_allocated(device) / GIB, 3)
    return out


def measure_baseline(args, device: torch.device) -> dict:
    """The original's step: CLIP (+ temporal transformer + weight heads) over the batch's pixels and
    tokens under no_grad, then the same denoiser step (trainer.train_step) on those features."""
    from stage1_step import random_batch

    from diffret.extract.backbone import build_clip, image_size
    from diffret.extract.model import Stage1Model

    torch.manual_seed(args.seed)
    model = Stage1Model(build_clip(args.model, "none"), max_frames=args.frames).to(device).eval()
    B = args.batch
    n = min(B, args.baseline_videos or (B if device.type == "cuda" else 4))
    size = image_size(model.clip)
    tokens, video, mask, _ = random_batch(n, args.frames, args.words, size, device, seed=args.seed)
    width = model.width
    cfg = GeneratorConfig(batch_size=B, candidates=args.candidates, device=str(device), seed=args.seed)
    total = args.baseline_warmup + args.baseline_steps  # the original recipe's schedule over the timed run
    t2v, v2t, params, opt, ema = trainer.build_models(width, cfg, device, total_steps=total)
    schedule = NoiseSchedule(cfg.schedule_config())
    gen = torch.Generator(device=device).manual_seed(args.seed)
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    # the batch's other B - n pairs (CPU: CLIP runs on n only), random features of the same shapes
    fill = {"sentence": torch.randn(B - n, width, generator=g, device=device),
            "words": torch.randn(B - n, args.words, width, generator=g, device=device),
            "word_logits": torch.randn(B - n, args.words, generator=g, device=device),
            "frames": torch.randn(B - n, args.frames, width, generator=g, device=device),
            "frame_logits": torch.randn(B - n, args.frames, generator=g, device=device)}
    amp = device.type == "cuda"
    rows = torch.arange(B, device=device)
    extract_t, step_t = [], []
    for i in range(args.baseline_warmup + args.baseline_steps):
        sync(device)
        t0 = time.perf_counter()
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            text, vid = model.encode_text(tokens), model.encode_video(video, mask)
        sync(device)
        t1 = time.perf_counter()
        cat = lambda a, b: torch.cat([a.float(), b]) if b is not None else a  # noqa: E731
        f = SplitFeatures(
            caption_id=[str(j) for j in range(B)], caption_video=rows, video_id=[str(j) for j in range(B)],
            sentence=cat(text["sentence"], fill["sentence"]), words=cat(text["words"], fill["words"]),
            word_mask=torch.cat([text["word_mask"], torch.ones(B - n, args.words, dtype=torch.bool, device=device)]),
            word_logits=cat(text["word_logits"], fill["word_logits"]), frames=cat(vid["frames"], fill["frames"]),
            frame_mask=torch.cat([vid["frame_mask"], torch.ones(B - n, args.frames, dtype=torch.bool, device=device)]),
            frame_logits=cat(vid["frame_logits"], fill["frame_logits"]))
        with trainer.flush_denormals(device):
            trainer.train_step(t2v, v2t, f, rows, schedule, cfg, gen, opt, params, ema)
        sync(device)
        if i >= args.baseline_warmup:
            extract_t.append(t1 - t0)
            step_t.append(time.perf_counter() - t1)
    extract = statistics.median(extract_t) * B / n
    denoise = statistics.median(step_t)
    out = {
        "model": args.model, "pretrained": "none", "amp": amp, "image_size": size, "videos_through_clip": n,
        "frames": args.frames, "words": args.words, "steps_timed": len(step_t),
        "clip_seconds_per_step": r(extract), "denoiser_step_seconds": r(denoise),
        "seconds_per_step": r(extract + denoise), "extrapolated": n < B, "peak_rss_gib": r(peak_rss_gib(), 3),
    }
    if device.type == "cuda":
        out["cuda_max_memory_allocated_gib"] = r(torch.cuda.max_memory_allocated(device) / GIB, 3)
    return out


def roof(args, device: torch.device, tr: dict, ref: dict | None) -> dict:
    """This machine's peaks (probed now) and the fraction of them each step time reaches."""
    peaks = roofline.probe(device)
    peak = peaks.get("gpu") or peaks[f"{torch.get_num_threads()}_thread"]
    U = min(args.batch, args.videos)  # in-batch negatives: the batch's distinct videos
    out = {"peaks": peaks, "model": "benchmarks/roofline.py train_step_work"}
    for key, row, legacy in (("diffret", tr, False), ("reference", ref, True)):
        if row:
            w = roofline.train_step_work(args.batch, args.candidates, U, args.frames, args.words, args.width, legacy)
            out[key] = roofline.fraction(w["flops"], w["bytes"], row["seconds_per_step"], peak)
    return out


def machine(device: torch.device) -> dict:
    info = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def growth(args, device: torch.device) -> list[dict]:
    """Per size: build the cache here, train a few steps in a fresh process (its own ru_maxrss)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-speed-growth-", dir=args.workdir) as tmp:
        for size in args.growth_sizes:
            videos = max(2, size // args.captions_per_video)
            root = Path(tmp) / f"cache-{size}"
            t0 = time.perf_counter()
            write_synthetic_cache(root, videos, args.captions_per_video, split="train", width=args.width,
                                  n_frames=args.frames, n_words=args.words, noise_bank=args.noise_bank)
            build = time.perf_counter() - t0
            child = Path(tmp) / f"child-{size}.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--cache", str(root), "--device", str(device),
                   "--max-steps", str(args.growth_steps), "--no-baseline", "--json", str(child),
                   "--batch", str(args.batch), "--candidates", str(args.candidates), "--quiet"]
            subprocess.run(cmd, check=True)
            tr = json.loads(child.read_text())["training"]
            words = videos * args.captions_per_video * args.words * args.width * 2  # float16 as kept
            rows.append({"captions": videos * args.captions_per_video, "videos": videos,
                         "build_seconds": r(build, 2), "cache_bytes": cache_bytes(root),
                         "words_float16_gib": r(words / GIB, 3), **{k: tr.get(k) for k in (
                             "rss_before_load_gib", "rss_after_load_gib", "peak_rss_gib", "seconds_per_step",
                             "cuda_max_memory_allocated_gib") if k in tr}})
            shutil.rmtree(root, ignore_errors=True)
    return rows


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", type=Path, help="write the report here too")
    ap.add_argument("--videos", type=int, default=9000)
    ap.add_argument("--captions-per-video", type=int, default=20)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--words", type=int, default=32)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--candidates", type=int, default=128)
    ap.add_argument("--negatives", default="batch", choices=("batch", "cache"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-steps", type=int, default=None, help="time only this many steps; extrapolate the epoch")
    ap.add_argument("--warmup", type=int, default=2, help="first steps left out of the per-step figure")
    ap.add_argument("--noise-bank", type=int, default=1024, help="synthetic word noise from a bank (fast build)")
    ap.add_argument("--cache", type=Path, help="use this cache (train split) instead of building one")
    ap.add_argument("--keep-cache", type=Path, help="build the cache here and keep it")
    ap.add_argument("--workdir", type=Path, default=None, help="where temporary caches go")
    ap.add_argument("--no-baseline", dest="baseline", action="store_false")
    ap.add_argument("--no-reference", dest="reference", action="store_false",
                    help="skip the reference path (the denoising before issue 14, benchmarks/legacy_stage2.py)")
    ap.add_argument("--no-roofline", dest="roofline", action="store_false", help="skip the peak probe")
    ap.add_argument("--model", default="ViT-B-32", help="open_clip model of the baseline (random weights)")
    ap.add_argument("--baseline-videos", type=int, default=0,
                    help="videos and captions through CLIP per baseline step (0: the batch on CUDA, 4 on CPU)")
    ap.add_argument("--baseline-steps", type=int, default=3)
    ap.add_argument("--baseline-warmup", type=int, default=1)
    ap.add_argument("--growth", action="store_true", help="also peak RSS at --growth-sizes captions")
    ap.add_argument("--growth-only", action="store_true", help="only the growth measurement")
    ap.add_argument("--growth-sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--growth-steps", type=int, default=4)
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "benchmark": "stage-two training speed", "device": str(device), "machine": machine(device),
        "date": dt.date.today().isoformat(), "command": "python benchmarks/train_speed.py " + " ".join(
            sys.argv[1:] if argv is None else map(str, argv)),
        "settings": {"videos": args.videos, "captions_per_video": args.captions_per_video, "frames": args.frames,
                     "words": args.words, "width": args.width, "batch": args.batch, "candidates": args.candidates,
                     "negatives": args.negatives, "max_steps": args.max_steps, "noise_bank": args.noise_bank},
    }
    if not args.growth_only:
        tmp = None
        if args.cache:
            cache, report["cache"] = args.cache, {"built": False, "bytes": cache_bytes(args.cache)}
        else:
            if args.keep_cache:
                cache = args.keep_cache
            else:
                tmp = tempfile.mkdtemp(prefix="train-speed-cache-", dir=args.workdir)
                cache = Path(tmp) / "cache"
            report["cache"] = build_cache(cache, args)
        try:
            report["training"] = tr = measure_training(cache, args, device)
            if args.reference:  # today's implementation before issue 14, same loop, same run
                report["reference"] = ref = measure_training(cache, args, device, legacy_denoise_pairs)
                report["speedup_vs_reference"] = r(ref["seconds_per_step"] / tr["seconds_per_step"], 2)
                report["same_loss_as_reference"] = ref["loss"] is not None and tr["loss"] is not None and \
                    abs(ref["loss"] - tr["loss"]) <= 1e-3 * max(1.0, abs(ref["loss"]))
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        report["extrapolated"] = tr["extrapolated"]
        if args.roofline:
            report["roofline"] = roof(args, device, tr, report.get("reference"))
        if args.baseline:
            report["baseline"] = base = measure_baseline(args, device)
            report["ratio"] = r(base["seconds_per_step"] / tr["seconds_per_step"], 1)
    if args.growth or args.growth_only:
        report["growth"] = growth(args, device)
    report["peak_rss_gib"] = r(peak_rss_gib(), 3)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    if not args.quiet:
        print(text)
    return report


if __name__ == "__main__":
    main()
