"""Generative re-ranking: sample x0 over each query's top-K candidates and add it to S.

    S'[q, c] = S[q, c] + alpha * softmax(temp * x0_hat[q])[c]   for the K best c of each query

All queries go through in chunks; the step-independent part of the denoiser (`prepare`) runs
once per chunk, outside the step loop.
"""
from __future__ import annotations

import torch

from .denoiser import T2VDenoiser, V2TDenoiser


@torch.inference_mode()
def rerank(
    scores: torch.Tensor,  # [Nq, Nc] stage-1 scores (rows: queries)
    denoiser: T2VDenoiser | V2TDenoiser,
    query: torch.Tensor,  # t2v: sentence [Nq, D]; v2t: frames [Nq, F, D]
    query_mask: torch.Tensor | None,  # v2t: frame mask [Nq, F]; t2v: None
    gallery: torch.Tensor,  # t2v: frames [Nc, F, D]; v2t: sentence [Nc, D]
    gallery_mask: torch.Tensor | None,  # t2v: frame mask [Nc, F]; v2t: None
    sampler,
    top_k: int = 32,
    alpha: float = 1.0,
    temp: float = 1.0,
    chunk: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Re-scored matrix [Nq, Nc] (CPU); entries outside each query's top-K keep S."""
    device = torch.device(device)
    k = min(top_k, scores.shape[1])
    top = scores.topk(k, dim=1).indices  # [Nq, K]
    out = scores.clone()
    gen = torch.Generator(device=device).manual_seed(seed)
    t2v = isinstance(denoiser, T2VDenoiser)
    for s in range(0, len(scores), chunk):
        idx = top[s:s + chunk]
        q = query[s:s + chunk].to(device)
        cand = idx.to(gallery.device)
        if t2v:
            ctx = denoiser.prepare(q, gallery[cand].to(device), gallery_mask[cand].to(device))
        else:
            ctx = denoiser.prepare(gallery[cand].to(device), q, query_mask[s:s + chunk].to(device))
        x0 = sampler.sample(lambda x, t: denoiser.denoise(x, t, ctx), (len(idx), k), generator=gen, device=device)
        bonus = alpha * torch.softmax(x0.float() * temp, dim=1).cpu()
        rows = torch.arange(s, s + len(idx))[:, None]
        out[rows, idx] = scores[rows, idx] + bonus
    return out
