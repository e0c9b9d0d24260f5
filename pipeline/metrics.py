"""Retrieval metrics from score matrices: ranks, R@K, MdR, MnR, Rsum.

The rank of a query is 1 + the number of candidates that score strictly higher than its best
ground-truth candidate (ties count in the query's favour). With one ground truth per query this
is the usual rank; with several (v2t on a multi-caption set, where a video is found at the best
rank of any of its captions) it is the rank of the first one found.
"""
from __future__ import annotations

import numpy as np
import torch


def ranks(scores: torch.Tensor, positive: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """scores [Nq, Nc], positive [Nq, Nc] bool (>= 1 True a row) -> 1-based ranks [Nq] int64."""
    scores = torch.as_tensor(scores).float()
    positive = torch.as_tensor(positive).bool()
    if positive.shape != scores.shape:
        raise ValueError(f"positive {tuple(positive.shape)} must match scores {tuple(scores.shape)}")
    if not positive.any(dim=1).all():
        raise ValueError("every query needs at least one ground-truth candidate")
    if torch.isnan(scores).any():  # a NaN never compares higher: it would pass for a perfect rank
        raise ValueError(f"scores contain {int(torch.isnan(scores).sum())} NaN values")
    out = []
    for s in range(0, len(scores), chunk):
        sc, pos = scores[s:s + chunk], positive[s:s + chunk]
        best = sc.masked_fill(~pos, float("-inf")).amax(dim=1, keepdim=True)
        out.append((sc > best).sum(dim=1) + 1)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def recall_metrics(r: torch.Tensor) -> dict[str, float]:
    """ranks [N] -> {"R@1", "R@5", "R@10" (percent), "MdR", "MnR"}."""
    r = np.asarray(torch.as_tensor(r).cpu(), dtype=np.float64)
    return {
        "R@1": float(100 * np.mean(r <= 1)),
        "R@5": float(100 * np.mean(r <= 5)),
        "R@10": float(100 * np.mean(r <= 10)),
        "MdR": float(np.median(r)),
        "MnR": float(np.mean(r)),
    }


def retrieval_metrics(t2v_scores: torch.Tensor, v2t_scores: torch.Tensor, caption_video: torch.Tensor) -> dict:
    """Both directions: t2v_scores [Nt, Nv], v2t_scores [Nv, Nt], caption_video [Nt] (video row of
    each caption). -> {"t2v": {...}, "v2t": {...}, "Rsum": R@1 + R@5 + R@10 of both directions}."""
    caption_video = torch.as_tensor(caption_video).long()
    nv = t2v_scores.shape[1]
    pos_t2v = caption_video[:, None] == torch.arange(nv)[None, :]  # [Nt, Nv]
    t2v = recall_metrics(ranks(t2v_scores, pos_t2v))
    v2t = recall_metrics(ranks(v2t_scores, pos_t2v.t()))
    rsum = sum(d[k] for d in (t2v, v2t) for k in ("R@1", "R@5", "R@10"))
    return {"t2v": t2v, "v2t": v2t, "Rsum": rsum}
