"""Weighted token-wise interaction (WTI): the stage-1 similarity that cached tokens define.

The cache stores word tokens, frame tokens and the similarity head's weight logits, so the
score of any caption against any video is a pure function of cached tensors. It lives beside
the cache (not in `extract/`) because the extractor's head, the generator's candidate ordering
and the evaluation all need exactly this function, and none of them may need CLIP to score.

    a = softmax over valid words of word_logits          b = softmax over valid frames of frame_logits
    t2v = sum_i a_i max_j cos(w_i, f_j)                  v2t = sum_j b_j max_i cos(w_i, f_j)
    S = (t2v + v2t) / 2
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1e4  # stands in for -inf where a masked entry must lose a max


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to `mask` (True = valid); [..., N] -> [..., N]."""
    logits = logits.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def wti_similarity(
    words: torch.Tensor,  # [Nt, L, D]
    word_mask: torch.Tensor,  # [Nt, L] bool
    word_logits: torch.Tensor,  # [Nt, L]
    frames: torch.Tensor,  # [Nv, F, D]
    frame_mask: torch.Tensor,  # [Nv, F] bool
    frame_logits: torch.Tensor,  # [Nv, F]
    normalized: bool = False,
) -> torch.Tensor:
    """Full WTI score matrix S [Nt, Nv]; differentiable. Memory is Nt * Nv * L * F floats."""
    if not normalized:
        words = F.normalize(words.float(), dim=-1)
        frames = F.normalize(frames.float(), dim=-1)
    a = masked_softmax(word_logits, word_mask)  # [Nt, L]
    b = masked_softmax(frame_logits, frame_mask)  # [Nv, F]
    cos = torch.einsum("tld,vfd->tvlf", words, frames)  # [Nt, Nv, L, F]
    fmask = frame_mask[None, :, None, :]
    wmask = word_mask[:, None, :, None]
    best_frame = cos.masked_fill(~fmask, NEG).amax(dim=3)  # [Nt, Nv, L]
    best_word = cos.masked_fill(~wmask, NEG).amax(dim=2)  # [Nt, Nv, F]
    t2v = (best_frame * a[:, None, :]).sum(-1)
    v2t = (best_word * b[None, :, :]).sum(-1)
    return (t2v + v2t) / 2


@torch.no_grad()
def wti_similarity_chunked(
    words, word_mask, word_logits, frames, frame_mask, frame_logits,
    chunk: int = 64, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The same matrix [Nt, Nv] computed in chunks of captions, for galleries too large at once.

    Inputs may be numpy arrays or tensors (as read from the cache); the result is on the CPU.
    """
    t = lambda x: torch.as_tensor(x).to(device)  # noqa: E731
    fr = F.normalize(t(frames).to(dtype), dim=-1)
    fm, fl = t(frame_mask).bool(), t(frame_logits)
    wo, wm, wl = torch.as_tensor(words), torch.as_tensor(word_mask), torch.as_tensor(word_logits)
    out = []
    for s in range(0, len(wo), chunk):
        w = F.normalize(t(wo[s:s + chunk]).to(dtype), dim=-1)
        out.append(
            wti_similarity(w, t(wm[s:s + chunk]).bool(), t(wl[s:s + chunk]), fr, fm, fl, normalized=True).float().cpu()
        )
    if not out:
        return torch.zeros(0, len(fr))
    return torch.cat(out)
