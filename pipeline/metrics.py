"""Retrieval metrics from score matrices: ranks, R@K, MdR, MnR, Rsum.

The rank of a query is 1 + the number of OTHER candidates scoring at or above its right one: ties
are broken against the query, so a model that cannot tell items apart gains nothing from them (a
constant score matrix gives R@1 = 0 and MnR = the number of candidates).

Multi-caption sets (MSVD, MSRVTT full, ...) follow the field's protocol (CLIP4Clip's and the
original's `tensor_video_to_text_sim`): t2v ranks each caption's video among all videos; v2t scores
every gallery video by the max of the query video's scores over that video's captions, then ranks
the query's own video among the videos. With one caption a video both are the usual protocol. A
video without captions is a t2v distractor, no v2t query, and never found in v2t (its max over no
caption is -inf).
"""
from __future__ import annotations

import numpy as np
import torch

RECALL_AT = (1, 5, 10)  # R@K reported (percent); Rsum is their sum over both directions
METRICS = tuple(f"R@{k}" for k in RECALL_AT) + ("MdR", "MnR")  # one direction's metrics, in report order


def check_no_nan(scores: torch.Tensor) -> None:
    """ValueError (one line) if `scores` holds a NaN: it compares neither above nor below anything,
    so no rank would mean what it says."""
    if torch.isnan(scores).any():
        raise ValueError(f"scores contain {int(torch.isnan(scores).sum())} NaN values")


def ranks(scores: torch.Tensor, target: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """scores [Nq, Nc], target [Nq] int64 (the right candidate's column per query) -> 1-based ranks
    [Nq] int64: 1 + #{other candidates c : scores[q, c] >= scores[q, target[q]]}."""
    scores = torch.as_tensor(scores).float()
    target = torch.as_tensor(target).long()
    if scores.dim() != 2 or target.shape != scores.shape[:1]:
        raise ValueError(f"target {tuple(target.shape)} must give one column per row of scores {tuple(scores.shape)}")
    if len(target) and not ((target >= 0) & (target < scores.shape[1])).all():
        raise ValueError(f"target columns must lie in [0, {scores.shape[1]})")
    check_no_nan(scores)
    out = []
    for s in range(0, len(scores), chunk):
        sc = scores[s:s + chunk]
        right = sc.gather(1, target[s:s + chunk, None])
        out.append((sc >= right).sum(dim=1))  # the right one counts itself: the 1 of the rank
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def video_scores(scores: torch.Tensor, caption_video: torch.Tensor, n_videos: int) -> torch.Tensor:
    """v2t scores [Nq, Nt] of query videos against captions -> [Nq, Nv]: each video scored by the max
    over its captions (caption_video [Nt] its video row; -inf for a video without captions)."""
    scores = torch.as_tensor(scores).float()
    out = torch.full((scores.shape[0], n_videos), float("-inf"))
    return out.scatter_reduce_(1, caption_video.long().expand(scores.shape[0], -1), scores, "amax")


def v2t_ranks(scores: torch.Tensor, caption_video: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """scores [Nv, Nt] (videos x captions), caption_video [Nt] -> ranks [Nq] of the videos that have a
    caption (in video order), each video's own video ranked among the videos by `video_scores`."""
    scores = torch.as_tensor(scores).float()
    cv = torch.as_tensor(caption_video).long()
    nv = scores.shape[0]
    check_no_nan(scores)  # before the max over captions, which would hide a NaN
    queries = torch.nonzero(torch.bincount(cv, minlength=nv) > 0).flatten()
    out = [ranks(video_scores(scores[q], cv, nv), q) for q in queries.split(chunk)]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def recall_metrics(r: torch.Tensor) -> dict[str, float]:
    """ranks [N] -> {"R@1", "R@5", "R@10" (percent), "MdR", "MnR"} (the keys of METRICS, in order)."""
    r = np.asarray(torch.as_tensor(r).cpu(), dtype=np.float64)
    out = {f"R@{k}": float(100 * np.mean(r <= k)) for k in RECALL_AT}
    out.update(MdR=float(np.median(r)), MnR=float(np.mean(r)))
    return out


def both_directions(t2v_ranks: torch.Tensor, v2t_ranks: torch.Tensor) -> dict:
    """ranks of both directions -> {"t2v": {...}, "v2t": {...}, "Rsum": R@1 + R@5 + R@10 of both}."""
    t2v, v2t = recall_metrics(t2v_ranks), recall_metrics(v2t_ranks)
    return {"t2v": t2v, "v2t": v2t, "Rsum": sum(d[f"R@{k}"] for d in (t2v, v2t) for k in RECALL_AT)}


def retrieval_metrics(t2v_scores: torch.Tensor, v2t_scores: torch.Tensor, caption_video: torch.Tensor) -> dict:
    """Both directions by the multi-caption protocol: t2v_scores [Nt, Nv], v2t_scores [Nv, Nt],
    caption_video [Nt] (video row of each caption). -> {"t2v": {...}, "v2t": {...}, "Rsum"}."""
    caption_video = torch.as_tensor(caption_video).long()
    nt, nv = t2v_scores.shape
    if tuple(v2t_scores.shape) != (nv, nt) or caption_video.shape != (nt,):
        raise ValueError(f"need t2v [Nt, Nv], v2t [Nv, Nt] and caption_video [Nt]; got {tuple(t2v_scores.shape)}, "
                         f"{tuple(v2t_scores.shape)} and {tuple(caption_video.shape)}")
    return both_directions(ranks(t2v_scores, caption_video), v2t_ranks(v2t_scores, caption_video))
