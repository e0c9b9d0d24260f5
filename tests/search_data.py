"""Small search fixtures without CLIP: caches written straight through the cache writer (with frame
times), and an encoder that answers a caption text with that caption's cached tokens."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffret.cache.manifest import Manifest
from diffret.cache.store import CacheReader, CacheWriter
from diffret.extract.query import EncodedQueries


def video_arrays(rng, n, frames, width):
    z = rng.normal(size=(n, width)).astype(np.float32)
    fr = (z[:, None] + 1.2 * rng.normal(size=(n, frames, width))).astype(np.float16)
    mask = np.ones((n, frames), bool)
    mask[::3, -1] = False  # some videos have a padded frame slot
    mask[1::5, -2:] = False
    times = np.where(mask, np.arange(frames)[None, :] * 0.5 + 0.25, -1.0).astype(np.float32)
    return z, fr, mask, rng.normal(size=(n, frames)).astype(np.float16), times


def write_cache(root, videos: list[tuple[str, int]], seed=0, width=16, frames=5, words=7, captions=True,
                fingerprint="searchfp00000000", split_captions=True) -> Path:
    """A cache of `videos`: (split, count) blocks, in order; ids `<split>-<seed>-<i>`. Every video gets one
    caption (a noisy view of its frames) when `captions`."""
    rng = np.random.default_rng(seed)
    man = Manifest(width=width, n_words=words, n_frames=frames, dataset="synthetic", extract_config={},
                   model={"name": "synthetic", "pretrained": "none", "fingerprint": fingerprint})
    w = CacheWriter(Path(root), man, shard_rows=8)  # several shards: rows cross shard borders
    for split, n in videos:
        z, fr, mask, logits, times = video_arrays(rng, n, frames, width)
        ids = [f"{split}-{seed}-{i}" for i in range(n)]
        w.add_video(split, ids, [f"/videos/{v}.mp4" for v in ids], fr, mask, logits, frame_times=times)
        if captions:
            wm = np.arange(words)[None, :] < rng.integers(3, words + 1, n)[:, None]
            wo = (z[:, None] + 1.5 * rng.normal(size=(n, words, width))).astype(np.float16)
            w.add_text(split, [f"{v}#0" for v in ids], ids, [f"caption of {v}" for v in ids], wo[:, -1], wo, wm,
                       rng.normal(size=(n, words)).astype(np.float16))
    w.close()
    return Path(root)


class CachedEncoder:
    """Encodes "caption of <video id>" as the cached caption of that video (of any of `caches`)."""

    def __init__(self, *caches):
        self.rows = {}
        for c in caches:
            r = CacheReader(c)
            for split in r.splits:
                if not r.manifest.splits[split]["captions"]:
                    continue
                t = r.text(split)
                for i, text in enumerate(t.caption):
                    self.rows[text] = (t.sentence[i], t.words[i], t.word_mask[i], t.word_logits[i])

    def count_tokens(self, text):
        return len(text.split())

    def encode(self, texts):
        try:
            parts = [self.rows[t] for t in texts]
        except KeyError as e:
            raise ValueError(f"no cached caption {e}") from None
        s, w, m, lg = (np.stack(x) for x in zip(*parts))
        return EncodedQueries(s, w, m, lg, [[f"w{i}" for i in range(int(mm.sum()))] for mm in m], [False] * len(texts))
