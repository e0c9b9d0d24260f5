"""Extraction speed: `diffret extract` end to end against raw decord decoding of the same frames.

Renders a demo video set, then with the same number of decoding workers:
- raw: a DataLoader whose workers only open each video with decord and decode the sampled
  frames (`get_batch`), nothing else: on a CPU machine, the limit;
- extract: `diffret extract --epochs 0` (zero-shot dump: decode, resize, encode every video and
  caption, write the cache), timed as a whole command on all the videos and on a quarter of
  them; the difference removes the fixed start-up cost (imports, model build, worker start),
  giving the steady-state rate.
Reports videos per second for both and the ratio (target on CPU: >= 80% of raw).
Usage: python benchmarks/extract_speed.py [--videos 400] [--workers 2] [--model tiny] --json FILE
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from diffret.extract.video import sample_frame_indices
from diffret.pipeline.demo import make_demo_dataset


class RawDecord(Dataset):
    """Item i: the sampled frames of video i as decord decodes them (uint8 [k, H, W, 3])."""

    def __init__(self, paths, n_frames):
        self.paths, self.n_frames = paths, n_frames

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import decord

        vr = decord.VideoReader(str(self.paths[i]), num_threads=1)
        idx = sample_frame_indices(len(vr), vr.get_avg_fps(), self.n_frames, None)
        out = torch.from_numpy(vr.get_batch(idx).asnumpy())
        del vr
        return out


def raw_decode_s(paths, n_frames, workers) -> float:
    loader = DataLoader(RawDecord(paths, n_frames), batch_size=16, num_workers=workers,
                        collate_fn=lambda b: len(b))
    t0 = time.perf_counter()
    n = sum(loader)
    assert n == len(paths)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=400, help="test videos (one caption each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_demo_dataset(data, n_train=0, n_test=args.videos, workers=args.workers)
        paths = sorted((data / "videos").glob("*.mp4"))
        raw_decode_s(paths[:32], args.frames, args.workers)  # warm the page cache and the workers
        raw_s = raw_decode_s(paths, args.frames, args.workers)
        small = Path(tmp) / "small"
        make_demo_dataset(small, n_train=0, n_test=args.videos // 4, workers=args.workers)
        times = {}
        for name, root in (("small", small), ("full", data)):
            cmd = [sys.executable, "-m", "diffret.pipeline.cli", "extract", "--data-root", str(root),
                   "--out", str(Path(tmp) / f"cache-{name}"), "--model", args.model, "--pretrained", "none",
                   "--epochs", "0", "--fps", "uniform", "--frames", str(args.frames),
                   "--workers", str(args.workers), "--device", args.device]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times[name] = time.perf_counter() - t0
    marginal = len(paths) - args.videos // 4
    extract_rate = marginal / (times["full"] - times["small"])
    raw_rate = len(paths) / raw_s
    row = {
        "videos": len(paths), "workers": args.workers, "frames": args.frames, "model": args.model,
        "device": args.device, "raw_decord_s": round(raw_s, 2), "raw_videos_per_s": round(raw_rate, 1),
        "extract_s": round(times["full"], 2), "extract_small_s": round(times["small"], 2),
        "extract_videos_per_s": round(extract_rate, 1), "extract_vs_raw": round(extract_rate / raw_rate, 3),
        "machine": f"{platform.machine()}",
    }
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps([row], indent=2) + "\n")


if __name__ == "__main__":
    main()
