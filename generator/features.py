"""Cached stage-1 features of one split as tensors, with caption -> video links.

This is the generator's whole view of the data: it never sees pixels, CLIP or decord.

dtypes: `words` [N, L, D] stays in the cache's dtype (float16 as written by the extractor): it is
by far the largest tensor (MSRVTT-9k: 180,000 x 32 x 512 = 5.9 GB in float16, 11.8 GB in float32),
and every user converts the rows it takes with `.float()` (cache/wti.py `wti_similarity` and
`wti_similarity_chunked`, generator/candidates.py `paired_wti`, generator/trainer.py). Everything
else is small and converted to float32 here (`sentence`, `frames` and the logits feed the
denoisers directly); masks are bool; `caption_video` is int64. `wti_padding` is the cache's WTI
rule for padded pairs (its manifest's `wti_padding`): every scorer of these features passes it on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffret.cache.manifest import CacheError
from diffret.cache.store import CacheReader
from diffret.cache.wti import check_padding


@dataclass
class SplitFeatures:
    caption_id: list[str]
    caption_video: torch.Tensor  # [N] int64 row of each caption's video in the video tensors
    sentence: torch.Tensor  # [N, D] float32
    words: torch.Tensor  # [N, L, D] the cache's dtype (float16): convert the rows you take with .float()
    word_mask: torch.Tensor  # [N, L] bool
    word_logits: torch.Tensor  # [N, L] float32
    video_id: list[str]
    frames: torch.Tensor  # [M, F, D] float32
    frame_mask: torch.Tensor  # [M, F] bool
    frame_logits: torch.Tensor  # [M, F] float32
    wti_padding: str = "zero"  # zero | exclude (cache/wti.py WTI_PADDINGS): score these tokens by this rule

    @property
    def width(self) -> int:
        return int(self.sentence.shape[-1])

    def to(self, device) -> "SplitFeatures":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return SplitFeatures(**moved)


FEATURE_TENSORS = ("sentence", "words", "word_logits", "frames", "frame_logits")  # checked finite on load


def check_finite(feats: SplitFeatures, where: str, split: str, chunk: int = 4096) -> SplitFeatures:
    """CacheError (one line naming the cache, split, tensor and row id) if a feature tensor holds
    NaN or inf: scores from it would rank nothing right. In row blocks (words is large)."""
    for name in FEATURE_TENSORS:
        x = getattr(feats, name)
        for s in range(0, len(x), chunk):
            bad = ~torch.isfinite(x[s:s + chunk]).reshape(len(x[s:s + chunk]), -1).all(1)
            if bad.any():
                row = s + int(bad.nonzero()[0, 0])
                ids, key = (feats.caption_id, "caption") if name in ("sentence", "words", "word_logits") else (
                    feats.video_id, "video")
                raise CacheError(f"{where}: {name} of the {split} split holds NaN or inf ({key} {ids[row]!r}); "
                                 f"the cache is damaged: re-extract it")
    return feats


def load_split(cache: CacheReader | Path, split: str) -> SplitFeatures:
    """The features of `split`, refused (CacheError) when any of them is not finite."""
    reader = cache if isinstance(cache, CacheReader) else CacheReader(cache)
    text, video = reader.text(split), reader.video(split)
    f = lambda a: torch.from_numpy(a).float()  # noqa: E731
    return check_finite(SplitFeatures(
        caption_id=text.caption_id, caption_video=torch.from_numpy(video.index_of(text.video_id)),
        sentence=f(text.sentence), words=torch.from_numpy(text.words), word_mask=torch.from_numpy(text.word_mask),
        word_logits=f(text.word_logits), video_id=video.video_id, frames=f(video.frames),
        frame_mask=torch.from_numpy(video.frame_mask), frame_logits=f(video.frame_logits),
        wti_padding=check_padding(reader.manifest.wti_padding),
    ), str(reader.root), split)
