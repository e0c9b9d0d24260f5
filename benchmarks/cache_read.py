"""Cache read speed: loading a split for stage two against a plain sequential read of its bytes.

Builds a synthetic cache with the project's writer, then, with the files in the page cache
(each measurement repeated; the best of the repeats is kept):
- raw: reading every shard file of the split start to end into fresh memory (`f.read()`);
- CacheReader: `reader.text(split)` + `reader.video(split)` (float16 arrays, as stored);
- load_split: what `train-generator` and `evaluate` call (words stay float16; the other tensors become float32).
Reports MB/s for each and the ratio to raw (target: CacheReader >= 50% of raw).
Usage: python benchmarks/cache_read.py [--videos 9000 --captions-per-video 20] --json FILE
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import write_synthetic_cache  # noqa: E402

from diffret.cache.store import CacheReader  # noqa: E402
from diffret.generator.features import load_split  # noqa: E402


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=1000)
    ap.add_argument("--captions-per-video", type=int, default=20)
    ap.add_argument("--split", default="train")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_cache(Path(tmp) / "cache", args.videos, args.captions_per_video, split=args.split)
        reader = CacheReader(root)
        files = [root / s.file for s in reader.manifest.shards if s.split == args.split]
        nbytes = sum(f.stat().st_size for f in files)

        def raw():
            return [open(f, "rb", buffering=0).read() for f in files]

        def cache_reader():
            reader.text(args.split), reader.video(args.split)

        raw()  # warm the page cache
        raw_s = best_of(raw, args.repeats)
        reader_s = best_of(cache_reader, args.repeats)
        split_s = best_of(lambda: load_split(root, args.split), args.repeats)
    mb = nbytes / 2**20
    row = {
        "videos": args.videos, "captions": args.videos * args.captions_per_video, "shard_mb": round(mb, 1),
        "raw_s": round(raw_s, 3), "raw_mb_s": round(mb / raw_s, 1),
        "cache_reader_s": round(reader_s, 3), "cache_reader_mb_s": round(mb / reader_s, 1),
        "cache_reader_vs_raw": round(raw_s / reader_s, 3),
        "load_split_s": round(split_s, 3), "load_split_vs_raw": round(raw_s / split_s, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "machine": platform.machine(),
    }
    print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps([row], indent=2) + "\n")


if __name__ == "__main__":
    main()
