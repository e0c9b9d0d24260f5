"""Extraction speed: `diffret extract` end to end against raw decord decoding of the same frames.

Renders a demo video set, then with the same number of decoding workers:
- raw: a DataLoader whose workers only open each video with decord and decode the sampled
  frames (`get_batch`), nothing else: on a CPU machine, the limit;
- extract: `diffret extract --epochs 0` (zero-shot dump: decode, resize, encode every video and
  caption, write the cache), timed as a whole command on all the videos and on a quarter of
  them; the difference removes the fixed start-up cost (imports, model build, worker start),
  giving the steady-state rate. The two commands alternate `--repeats` times and the fastest
  run of each is kept (the machine is shared: single runs swing by seconds). The rate is also
  computed from the time the command itself reports (`cache written ... in X s`, which leaves
  out the imports, the noisiest part); both are reported.
Also reported: CPU time per video (user + system, every process: the benchmark's raw workers;
the extraction process, its workers and their decoding helpers), whose ratio does not depend
on what else the machine runs. Both sides decode the same frames (`--fps uniform`, `--frames`) at the videos' own resolution
with the same number of worker processes. Also reported: the peak RSS of the extraction
process and of its largest child (a decoding worker), and the load averages before and after.
Reports videos per second for both and the ratio (target on CPU: >= 80% of raw).
Usage: python benchmarks/extract_speed.py [--videos 400] [--workers 2] [--model tiny] [--repeats 3] --json FILE
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
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


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of every child it has reaped."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _adopt_orphans() -> None:
    """Become the subreaper of our descendants (Linux), so the decoding helpers that outlive
    their DataLoader worker are reaped here and their CPU time is counted."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(36, 1)  # PR_SET_CHILD_SUBREAPER
    except Exception:  # noqa: BLE001  (elsewhere the helpers' CPU time is simply not counted)
        pass


def _reap_orphans(wait_s: float = 2.0) -> None:
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            time.sleep(0.02)


def raw_decode_s(paths, n_frames, workers, cpu: list | None = None) -> float:
    loader = DataLoader(RawDecord(paths, n_frames), batch_size=16, num_workers=workers,
                        collate_fn=lambda b: len(b))
    c0, t0 = _cpu_s(), time.perf_counter()
    it = iter(loader)
    n = sum(it)
    del it  # joins the workers, so their CPU time is counted
    wall = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(_cpu_s() - c0)
    assert n == len(paths)
    return wall


# Runs `diffret extract` and prints the peak RSS of the process and of its largest child (MiB).
_MEASURED = """
import json, resource, sys
from diffret.pipeline.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    mb = lambda who: round(resource.getrusage(who).ru_maxrss / 1024, 1)
    print("PEAK_RSS " + json.dumps({"self_mb": mb(resource.RUSAGE_SELF), "children_mb": mb(resource.RUSAGE_CHILDREN)}))
"""


def extract_run(root: Path, out: Path, args) -> dict:
    cmd = [sys.executable, "-c", _MEASURED, "extract", "--data-root", str(root), "--out", str(out),
           "--model", args.model, "--pretrained", "none", "--epochs", "0", "--fps", "uniform",
           "--frames", str(args.frames), "--workers", str(args.workers), "--device", args.device, "--overwrite"]
    c0, t0 = _cpu_s(), time.perf_counter()
    r = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "COLUMNS": "400"})
    wall = time.perf_counter() - t0
    _reap_orphans()
    cpu = _cpu_s() - c0
    inner = re.search(r"\bin\s+([0-9.]+)\s+s\s+on\s", r.stdout + r.stderr)  # rich logs to stderr
    peak = json.loads(r.stdout.split("PEAK_RSS ", 1)[1].splitlines()[0])
    return {"wall_s": wall, "cpu_s": cpu, "inner_s": float(inner.group(1)) if inner else float("nan"), **peak}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=400, help="test videos (one caption each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each extract command (fastest kept)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    load_before = os.getloadavg()
    _adopt_orphans()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_demo_dataset(data, n_train=0, n_test=args.videos, workers=args.workers)
        paths = sorted((data / "videos").glob("*.mp4"))
        small = Path(tmp) / "small"
        make_demo_dataset(small, n_train=0, n_test=args.videos // 4, workers=args.workers)
        raw_decode_s(paths[:32], args.frames, args.workers)  # warm the page cache and the workers
        runs = {"small": [], "full": []}
        raw_runs, raw_cpu = [], []
        for _ in range(args.repeats):  # interleaved, so a burst of load hits both sides alike
            raw_runs.append(raw_decode_s(paths, args.frames, args.workers, raw_cpu))
            for name, root in (("small", small), ("full", data)):
                runs[name].append(extract_run(root, Path(tmp) / f"cache-{name}", args))
    load_after = os.getloadavg()
    best = {k: min(v, key=lambda r: r["wall_s"]) for k, v in runs.items()}
    inner = {k: min(r["inner_s"] for r in v) for k, v in runs.items()}
    raw_s = min(raw_runs)
    marginal = len(paths) - args.videos // 4
    extract_rate = marginal / (best["full"]["wall_s"] - best["small"]["wall_s"])
    inner_rate = marginal / (inner["full"] - inner["small"])
    raw_rate = len(paths) / raw_s
    # CPU time per video (all processes): what the work costs, whatever else the machine runs
    cpu = {k: min(r["cpu_s"] for r in v) for k, v in runs.items()}
    raw_cpu_ms = 1000 * min(raw_cpu) / len(paths)
    extract_cpu_ms = 1000 * (cpu["full"] - cpu["small"]) / marginal
    row = {
        "videos": len(paths), "workers": args.workers, "frames": args.frames, "model": args.model,
        "device": args.device, "repeats": args.repeats,
        "raw_decord_s": round(raw_s, 2), "raw_videos_per_s": round(raw_rate, 1),
        "extract_s": round(best["full"]["wall_s"], 2), "extract_small_s": round(best["small"]["wall_s"], 2),
        "extract_videos_per_s": round(extract_rate, 1), "extract_vs_raw": round(extract_rate / raw_rate, 3),
        "extract_inner_s": inner["full"], "extract_small_inner_s": inner["small"],
        "extract_inner_videos_per_s": round(inner_rate, 1), "extract_inner_vs_raw": round(inner_rate / raw_rate, 3),
        "raw_cpu_ms_per_video": round(raw_cpu_ms, 2), "extract_cpu_ms_per_video": round(extract_cpu_ms, 2),
        "cpu_ratio_raw_over_extract": round(raw_cpu_ms / extract_cpu_ms, 3),
        "peak_rss_mb": {k: {"self": max(r["self_mb"] for r in v), "largest_child": max(r["children_mb"] for r in v)}
                        for k, v in runs.items()},
        "loadavg_before": [round(x, 2) for x in load_before], "loadavg_after": [round(x, 2) for x in load_after],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps([row], indent=2) + "\n")


if __name__ == "__main__":
    main()
