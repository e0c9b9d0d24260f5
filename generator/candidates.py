"""Candidate sets for training: the positive first, then hard negatives in stage-1 order.

In-batch (the original): for a batch of B (caption, video) pairs with stage-1 scores sim [B, B]
(caption i vs the video of pair j), query i's candidates are [i] followed by the other pairs ordered
by similarity, leaving out every pair that shares i's video id (not a negative at all).
Whole cache (`--negatives cache`): the negatives are mined once from the whole training split.
"""
from __future__ import annotations

import torch

from diffret.cache.wti import check_padding, masked_softmax, wti_reduce

NEGATIVES = ("batch", "cache")  # GeneratorConfig.negatives: positive_first in the batch | mine_cache_negatives


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



def paired_wti(words, word_mask, word_logits, frames, frame_mask, frame_logits, padding: str = "zero") -> torch.Tensor:
    """WTI of each row's caption(s) against its video(s): the cache's formula (cache/wti.py `wti_reduce`), paired.

    One side carries a candidate axis P: either words [B, L, D] (+ [B, L] mask/logits) against
    frames [B, P, F, D] (+ [B, P, F]), or words [B, P, L, D] against frames [B, F, D]. -> [B, P].
    padding: zero | exclude, how a padded pair counts inside the maxima (the cache's `wti_padding`).
    """
    check_padding(padding)
    w = torch.nn.functional.normalize(words.float(), dim=-1)  # words arrive in the cache's float16
    f = torch.nn.functional.normalize(frames.float(), dim=-1)
    if w.dim() == 3:
        cos = torch.einsum("bld,bpfd->bplf", w, f)
        wm, fm = word_mask[:, None], frame_mask
    else:
        cos = torch.einsum("bpld,bfd->bplf", w, f)
        wm, fm = word_mask, frame_mask[:, None]
    a = masked_softmax(word_logits, word_mask)
    b = masked_softmax(frame_logits, frame_mask)
    a, b = (a[:, None] if a.dim() == 2 else a), (b[:, None] if b.dim() == 2 else b)  # [B, P|1, L], [B, P|1, F]
    return wti_reduce(cos, a[..., None], b[:, :, None, :], wm[..., None].bool(), fm[:, :, None, :].bool(), padding)


def global_similarity(sentence: torch.Tensor, frames: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
    """Cheap pre-filter score: cos(sentence [N, D], mean of valid frames of [M, F, D]) -> [N, M]."""
    m = frame_mask.to(frames.dtype).unsqueeze(-1)
    pooled = (frames * m).sum(1) / m.sum(1).clamp(min=1)
    return torch.nn.functional.normalize(sentence, dim=-1) @ torch.nn.functional.normalize(pooled, dim=-1).t()


def _top_rescored(glob: torch.Tensor, own: torch.Tensor, k: int, pool: int, score) -> torch.Tensor:
    """glob [B, G] pre-filter scores, own [B, G] bool (not a negative) -> [B, k-1] indices into G: the
    `pool` best by glob, re-scored by `score(cand [B, pool]) -> [B, pool]`, best k-1 kept in order."""
    pool = max(k - 1, min(pool, glob.shape[1] - int(own.sum(1).max())))
    cand = glob.masked_fill(own, float("-inf")).topk(pool, dim=1).indices
    s = score(cand).masked_fill(own.gather(1, cand), float("-inf"))
    return cand.gather(1, s.topk(k - 1, dim=1).indices)


@torch.no_grad()
def mine_cache_negatives(f, k: int, pool_factor: int = 4, device="cpu", progress=None,
                         budget: int = 1 << 26) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard negatives from the whole training split (`--negatives cache`), mined once (stage 1 is frozen).

    For every caption, the k-1 videos of other ids with the highest stage-1 WTI score (by the
    cache's padding rule, f.wti_padding); for every video,
    the k-1 captions of other videos with the highest score. To stay linear in the split size, WTI
    re-scores only the `pool_factor * k` best items by `global_similarity`.
    f: SplitFeatures (train). -> (video_pool [N, k'-1] video rows, caption_pool [M, k'-1] caption rows)
    with k' = min(k, what the split allows).
    """
    N, M = len(f.caption_video), len(f.frames)
    per_video = torch.bincount(f.caption_video, minlength=M)
    k = int(min(k, M, N - per_video.max().item() + 1))
    if k < 2:
        raise ValueError("the training split is too small to mine negatives (it needs captions of two videos)")
    t = lambda x: x.to(device)  # noqa: E731
    words, wmask, wlog, cv = t(f.words), t(f.word_mask), t(f.word_logits), t(f.caption_video)
    frames, fmask, flog = t(f.frames), t(f.frame_mask), t(f.frame_logits)
    glob = global_similarity(t(f.sentence), frames, fmask)  # [N, M]
    pool = pool_factor * k
    L, F_, D = words.shape[1], frames.shape[1], words.shape[2]
    chunk = max(1, budget // (pool * max(L, F_) * D))
    task = progress.add_task("mining hard negatives", total=N + M) if progress else None
    video_pool, caption_pool = [], []
    for s in range(0, N, chunk):
        r = torch.arange(s, min(s + chunk, N), device=device)
        own = cv[r][:, None] == torch.arange(M, device=device)[None]
        video_pool.append(_top_rescored(glob[r], own, k, pool, lambda c: paired_wti(
            words[r], wmask[r], wlog[r], frames[c], fmask[c], flog[c], padding=f.wti_padding)).cpu())
        if progress:
            progress.update(task, advance=len(r))
    for s in range(0, M, chunk):
        v = torch.arange(s, min(s + chunk, M), device=device)
        own = cv[None, :] == v[:, None]  # [B, N]
        caption_pool.append(_top_rescored(glob[:, v].t(), own, k, pool, lambda c: paired_wti(
            words[c], wmask[c], wlog[c], frames[v], fmask[v], flog[v], padding=f.wti_padding)).cpu())
        if progress:
            progress.update(task, advance=len(v))
    if progress:
        progress.remove_task(task)
    return torch.cat(video_pool), torch.cat(caption_pool)
