"""A small random feature cache written straight through the cache writer (no videos, no CLIP):
fast fixtures for stage-2 and evaluation tests. Captions and frames of a video share a latent
vector, so retrieval is better than chance but not perfect."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffret.cache.manifest import Manifest
from diffret.cache.store import CacheWriter


def synthetic_cache(root, n_train=16, train_caps=2, n_test=6, test_caps=1, width=16, words=6, frames=4, seed=0,
                    fingerprint="synthetic0000000", noise=1.5, uncaptioned_test=0) -> Path:
    """Write a cache to `root`: train/test splits, `*_caps` captions per video, the last
    `uncaptioned_test` test videos without any caption. -> root."""
    rng = np.random.default_rng(seed)
    man = Manifest(width=width, n_words=words, n_frames=frames, dataset="synthetic", extract_config={},
                   model={"name": "synthetic", "pretrained": "none", "fingerprint": fingerprint})
    w = CacheWriter(Path(root), man, shard_rows=64)
    for split, nv, nc in (("train", n_train, train_caps), ("test", n_test, test_caps)):
        z = rng.normal(size=(nv, width))
        vids = [f"{split}{i}" for i in range(nv)]
        fmask = np.ones((nv, frames), bool)
        fmask[::2, -1] = False
        w.add_video(split, vids, [f"/{v}.mp4" for v in vids], z[:, None] + noise * rng.normal(size=(nv, frames, width)),
                    fmask, rng.normal(size=(nv, frames)))
        captioned = nv - (uncaptioned_test if split == "test" else 0)
        cv = np.repeat(np.arange(captioned), nc)
        wmask = np.ones((len(cv), words), bool)
        wmask[:, -2:] = False
        w.add_text(split, [f"{split}c{i}" for i in range(len(cv))], [vids[v] for v in cv],
                   [f"caption {i}" for i in range(len(cv))], z[cv] + noise * rng.normal(size=(len(cv), width)),
                   z[cv][:, None] + noise * rng.normal(size=(len(cv), words, width)), wmask,
                   rng.normal(size=(len(cv), words)))
    w.close()
    return Path(root)
