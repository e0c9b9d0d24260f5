"""A tiny from-scratch stage-1 model and a batch for it (tokens with SOT/EOT, random frames), shared by
the recipe tests."""
from __future__ import annotations

import torch

from diffret.extract.backbone import build_clip
from diffret.extract.model import Stage1Model


def tiny_model(frames: int = 4, seed: int = 0) -> Stage1Model:
    torch.manual_seed(seed)
    return Stage1Model(build_clip("tiny", "none"), max_frames=frames)


def tiny_batch(n: int = 4, frames: int = 4, words: int = 8, seed: int = 1, short_first: bool = True):
    """-> tokens (n, words), video (n, frames, 3, 32, 32), frame mask (n, frames); with short_first the
    first video has padded slots in its second half."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros(n, words, dtype=torch.long)
    for i in range(n):
        k = 3 + i % (words - 3)
        tokens[i, 0], tokens[i, 1:k - 1], tokens[i, k - 1] = 49406, torch.randint(1, 49000, (k - 2,), generator=g), 49407
    video = torch.randn(n, frames, 3, 32, 32, generator=g)
    mask = torch.ones(n, frames, dtype=torch.bool)
    if short_first:
        mask[0, frames // 2:] = False
    return tokens, video, mask
