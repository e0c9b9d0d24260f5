"""Cached stage-1 features of one split as float32 tensors, with caption -> video links.

This is the generator's whole view of the data: it never sees pixels, CLIP or decord.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffret.cache.store import CacheReader


@dataclass
class SplitFeatures:
    caption_id: list[str]
    caption_video: torch.Tensor  # [N] row of each caption's video in the video tensors
    sentence: torch.Tensor  # [N, D]
    words: torch.Tensor  # [N, L, D]
    word_mask: torch.Tensor  # [N, L] bool
    word_logits: torch.Tensor  # [N, L]
    video_id: list[str]
    frames: torch.Tensor  # [M, F, D]
    frame_mask: torch.Tensor  # [M, F] bool
    frame_logits: torch.Tensor  # [M, F]

    @property
    def width(self) -> int:
        return int(self.sentence.shape[-1])

    def to(self, device) -> "SplitFeatures":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return SplitFeatures(**moved)


def load_split(cache: CacheReader | Path, split: str) -> SplitFeatures:
    reader = cache if isinstance(cache, CacheReader) else CacheReader(cache)
    text, video = reader.text(split), reader.video(split)
    f = lambda a: torch.from_numpy(a).float()  # noqa: E731
    return SplitFeatures(
        caption_id=text.caption_id, caption_video=torch.from_numpy(video.index_of(text.video_id)),
        sentence=f(text.sentence), words=f(text.words), word_mask=torch.from_numpy(text.word_mask),
        word_logits=f(text.word_logits), video_id=video.video_id, frames=f(video.frames),
        frame_mask=torch.from_numpy(video.frame_mask), frame_logits=f(video.frame_logits),
    )
