"""Time and memory of one stage-1 fine-tuning step (the real `train_step`: both towers, WTI,
InfoNCE, backward, clipping, AdamW), on random inputs of the real size.

    python benchmarks/stage1_step.py --device cuda                     # ViT-B-32, AMP, 128 x 12 x 224^2
    python benchmarks/stage1_step.py --device cuda --grad-checkpointing
    python benchmarks/stage1_step.py --device cpu --model tiny --batch 4 --frames 2 --steps 1

Weights are random (`--pretrained none`): the cost of a step does not depend on their values,
and nothing is downloaded. Prints one JSON object: the settings, the machine, the median and
mean seconds per step after `--warmup` untimed steps, pairs and frames per second, and the peak
memory (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak RSS).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import sys
import time

import torch

from diffret.extract.backbone import build_clip, image_size
from diffret.extract.config import ExtractConfig
from diffret.extract.distributed import DistInfo
from diffret.extract.finetune import make_optimizer, train_step
from diffret.extract.model import Stage1Model


def random_batch(batch: int, frames: int, words: int, size: int, device: torch.device, seed: int = 0):
    """tokens [B, L] ([SOS] + 5..L-2 random words + [EOT]), frames [B, F, 3, S, S], all-True mask, valid [B]."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(batch, words, dtype=torch.long)
    lengths = torch.randint(5, words - 1, (batch,), generator=g)
    for i, n in enumerate(lengths.tolist()):
        tokens[i, 0], tokens[i, 1:n + 1], tokens[i, n + 1] = 49406, torch.randint(1, 49000, (n,), generator=g), 49407
    video = torch.randn(batch, frames, 3, size, size, generator=g)
    mask = torch.ones(batch, frames, dtype=torch.bool)
    return tokens.to(device), video.to(device), mask.to(device), torch.ones(batch, dtype=torch.bool, device=device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model_name: str = "ViT-B-32", device: str = "cuda", batch: int = 128, frames: int = 12, words: int = 32,
            steps: int = 5, warmup: int = 2, amp: bool = True, grad_checkpointing: bool = False) -> dict:
    dev = torch.device(device)
    torch.manual_seed(0)
    model = Stage1Model(build_clip(model_name, "none"), max_frames=frames).to(dev).train()
    model.set_grad_checkpointing(grad_checkpointing)
    cfg = ExtractConfig(model=model_name, pretrained="none", batch_size=batch, frames=frames, words=words, amp=amp,
                        grad_checkpointing=grad_checkpointing, recipe="modern")  # the step's cost: AdamW, float32
    opt, _ = make_optimizer(model, cfg, total_steps=max(1, warmup + steps))
    use_amp = amp and dev.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    data = random_batch(batch, frames, words, image_size(model.clip), dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times, losses = [], []
    for i in range(warmup + steps):
        _sync(dev)
        t0 = time.perf_counter()
        losses.append(train_step(model, model, opt, scaler, data, cfg, DistInfo(), use_amp))
        _sync(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak, where = torch.cuda.max_memory_allocated(dev) / 2**30, f"GPU ({torch.cuda.get_device_name(dev)})"
    else:
        peak, where = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "CPU RSS"
    median = statistics.median(times)
    return {
        "model": model_name, "device": str(dev), "machine": where, "batch": batch, "frames": frames, "words": words,
        "image_size": image_size(model.clip), "amp": use_amp, "grad_checkpointing": grad_checkpointing,
        "steps": steps, "warmup": warmup, "seconds_per_step_median": round(median, 4),
        "seconds_per_step_mean": round(statistics.mean(times), 4), "pairs_per_second": round(batch / median, 1),
        "frames_per_second": round(batch * frames / median, 1), "peak_memory_gib": round(peak, 2),
        "last_loss": round(losses[-1], 4), "torch": torch.__version__, "python": platform.python_version(),
        "host": platform.node(), "cpu_threads": torch.get_num_threads(),
        "date": dt.date.today().isoformat(), "command": "python " + " ".join(sys.argv),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=128, help="pairs per step (one process)")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--words", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="float32 (AMP is GPU only anyway)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    args = ap.parse_args(argv)
    report = measure(args.model, args.device, args.batch, args.frames, args.words, args.steps, args.warmup, args.amp,
                     args.grad_checkpointing)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
