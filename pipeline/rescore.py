"""Exact WTI of one query against its first-stage candidates (search's second stage).

The blocked gallery of cache/wti.py prepares each block of videos once and amortises it over many
captions (evaluation); a search query has one caption and a fresh candidate set, so preparing the
frames would dominate. This path makes one [n F, D] x [D, L] product and hands the cosines to the
formula's one copy (`wti_reduce`, with the masks and the cache's padding rule).
"""
from __future__ import annotations

import numpy as np
import torch

from diffret.cache.wti import masked_softmax, wti_reduce


@torch.no_grad()
def candidate_wti(words, word_mask, word_logits, frames, frame_mask, frame_logits, padding: str = "zero",
                  device="cpu") -> torch.Tensor:
    """Exact WTI of ONE query (words [L, D], word_mask [L], word_logits [L]) against n candidates
    (frames [n, F, D], frame_mask [n, F], frame_logits [n, F]) -> S [n] float32 (CPU).

    The fast path for a query's candidates: one [n F, D] x [D, L] product, no per-block preparation
    of the frames (the blocked gallery, cache/wti.py, amortises that over many captions), then the
    formula's one copy (`wti_reduce`, with the masks and the cache's padding rule). Equal to
    `wti_similarity` (tests/test_search.py) and to evaluate's scores up to float32 rounding."""
    dev = torch.device(device)
    wm = torch.as_tensor(np.asarray(word_mask, bool)).to(dev)
    fm = torch.as_tensor(np.asarray(frame_mask, bool)).to(dev)
    w = torch.nn.functional.normalize(torch.as_tensor(words).to(dev, torch.float32), dim=-1)  # [L, D]
    f = torch.nn.functional.normalize(torch.as_tensor(frames).to(dev, torch.float32), dim=-1)  # [n, F, D]
    n, nf, d = f.shape
    cos = (f.reshape(n * nf, d) @ w.t()).view(n, nf, -1).transpose(1, 2)  # [n, L, F]
    a = masked_softmax(torch.as_tensor(word_logits).to(dev), wm)  # [L]
    b = masked_softmax(torch.as_tensor(frame_logits).to(dev), fm)  # [n, F]
    S = wti_reduce(cos, a[None, :, None], b[:, None, :], wm[None, :, None], fm[:, None, :], padding)
    return S.float().cpu()
