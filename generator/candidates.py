"""Candidate sets for training: the positive first, then the hardest in-batch negatives.

For a batch of B (caption, video) pairs with stage-1 scores sim [B, B] (caption i vs the
video of pair j), query i's candidates are [i] followed by the other pairs ordered by
similarity, leaving out every pair that shares i's video (not a negative at all).
"""
from __future__ import annotations

import torch


def same_video_mask(video_index: torch.Tensor) -> torch.Tensor:
    """[B] video rows -> [B, B] bool, True where two pairs show the same video."""
    return video_index[:, None] == video_index[None, :]


def usable_candidates(video_index: torch.Tensor, k: int) -> int:
    """Largest K <= k such that every query has K - 1 pairs of other videos in the batch."""
    others = (~same_video_mask(video_index)).sum(1).min().item()
    return int(min(k, others + 1))


def positive_first(sim: torch.Tensor, same: torch.Tensor, k: int) -> torch.Tensor:
    """sim [B, B], same [B, B] bool -> candidate indices [B, k]: i, then top k-1 other videos."""
    masked = sim.masked_fill(same, float("-inf"))
    neg = masked.topk(k - 1, dim=1).indices
    own = torch.arange(len(sim), device=sim.device)[:, None]
    return torch.cat([own, neg], dim=1)
