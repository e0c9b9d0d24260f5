"""A synthetic cache of a given size, written with the project's own writer (for benchmarks).

Captions are noisy views of their video's frames, so stage-1 scores have the structure of a
real cache (the right video tends to score high) while costing no video decoding.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from diffret.cache.manifest import Manifest
from diffret.cache.store import CacheWriter


def write_synthetic_cache(
    root: Path, n_videos: int, captions_per_video: int = 1, split: str = "test", width: int = 512,
    n_frames: int = 12, n_words: int = 32, seed: int = 0, shard_rows: int = 4096, chunk: int = 2048,
    noise_bank: int = 0,
) -> Path:
    """Write `n_videos` videos and `n_videos * captions_per_video` captions into `root`.

    noise_bank: 0 (default) draws fresh Gaussian noise for every word of every caption (the figures
    in BENCHMARKS.md used this). P > 0 draws the word noise from a bank of P [L, D] blocks, one block
    a caption, plus a fresh per-caption offset [D], computed in float16: drawing 180,000 x 32 x 512
    normals is about 80 s of the 2-core machine, the bank makes it a few seconds (train_speed.py).
    """
    rng = np.random.default_rng(seed)
    bank = None
    if noise_bank:
        import torch  # only for fast float16 arithmetic (numpy's float16 is emulated)

        bank = (2 * rng.standard_normal((noise_bank, n_words, width), dtype=np.float32)).astype(np.float16)
    manifest = Manifest(
        width=width, n_words=n_words, n_frames=n_frames, dataset="synthetic",
        model={"name": "synthetic", "pretrained": "none", "fingerprint": f"synthetic-{seed}"},
        extract_config={"seed": seed, "n_videos": n_videos, "captions_per_video": captions_per_video},
    )
    writer = CacheWriter(root, manifest, shard_rows=shard_rows)
    for s in range(0, n_videos, chunk):
        m = min(chunk, n_videos - s)
        ids = [f"v{i}" for i in range(s, s + m)]
        frames = rng.standard_normal((m, n_frames, width), dtype=np.float32)
        fmask = np.arange(n_frames)[None, :] < (n_frames - rng.integers(0, 3, m))[:, None]  # 10-12 real frames
        writer.add_video(split, ids, [f"/synthetic/{v}.mp4" for v in ids], frames.astype(np.float16), fmask,
                         rng.standard_normal((m, n_frames), dtype=np.float32).astype(np.float16))
        for c in range(captions_per_video):
            if bank is None:
                words = np.repeat(frames.mean(1, keepdims=True), n_words, 1) + 2 * rng.standard_normal(
                    (m, n_words, width), dtype=np.float32)
            else:  # a bank block (numpy gather: a copy) + the video's mean frame + a per-caption offset
                words = bank[rng.integers(0, noise_bank, m)]
                shift = frames.mean(1) + 0.5 * rng.standard_normal((m, width), dtype=np.float32)
                torch.from_numpy(words).add_(torch.from_numpy(shift.astype(np.float16))[:, None])
            wmask = np.arange(n_words)[None, :] < rng.integers(6, n_words, m)[:, None]
            writer.add_text(split, [f"{v}#{c}" for v in ids], ids, [f"caption {c} of {v}" for v in ids],
                            words[:, -1].astype(np.float16), words.astype(np.float16, copy=False), wmask,
                            rng.standard_normal((m, n_words), dtype=np.float32).astype(np.float16))
    writer.close()
    return Path(root)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--videos", type=int, default=1000)
    ap.add_argument("--captions-per-video", type=int, default=1)
    ap.add_argument("--split", default="test")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--noise-bank", type=int, default=0, help="0: fresh word noise; P: from a bank of P blocks (fast)")
    args = ap.parse_args()
    write_synthetic_cache(args.out, args.videos, args.captions_per_video, args.split, args.width,
                          noise_bank=args.noise_bank)
    print(args.out)
