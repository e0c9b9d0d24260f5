"""Generative re-ranking: sample x0 over each query's top-K candidates and add it to S.

    S'[q, c] = S[q, c] + alpha * softmax(temp * x0_hat[q])[c]   for the K best c of each query

`top_k=None` generates over the whole gallery (K = every candidate, in gallery order). Queries go
through in chunks sized so that the context ([chunk, K, 2D] floats) stays within a memory budget;
the step-independent part of the denoiser (`prepare`) runs once per chunk, outside the step loop.
"""
from __future__ import annotations

import torch

from .denoiser import T2VDenoiser, V2TDenoiser


def chunk_size(k: int, width: int, frames: int = 1, budget: int = 1 << 26, cap: int = 256) -> int:
    """Queries per chunk so that the per-chunk context ([chunk, K, 2D + F] floats) fits `budget`."""
    return max(1, min(cap, budget // max(1, k * (2 * width + frames))))


@torch.inference_mode()
def rerank(
    scores: torch.Tensor,  # [Nq, Nc] stage-1 scores (rows: queries)
    denoiser: T2VDenoiser | V2TDenoiser,
    query: torch.Tensor,  # t2v: sentence [Nq, D]; v2t: frames [Nq, F, D]
    query_mask: torch.Tensor | None,  # v2t: frame mask [Nq, F]; t2v: None
    gallery: torch.Tensor,  # t2v: frames [Nc, F, D]; v2t: sentence [Nc, D]
    gallery_mask: torch.Tensor | None,  # t2v: frame mask [Nc, F]; v2t: None
    sampler,
    top_k: int | None = 32,
    alpha: float = 1.0,
    temp: float = 1.0,
    chunk: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress=None,
) -> torch.Tensor:
    """Re-scored matrix [Nq, Nc] (CPU); entries outside each query's top-K keep S.

    top_k: candidates per query (None or >= Nc: the whole gallery); chunk: queries per chunk
    (None: from the memory budget).
    """
    device = torch.device(device)
    nq, nc = scores.shape
    everything = top_k is None or top_k >= nc
    k = nc if everything else top_k
    t2v = isinstance(denoiser, T2VDenoiser)
    frames = gallery.shape[1] if t2v else query.shape[1]
    chunk = chunk or chunk_size(k, denoiser.width, frames)
    out = scores.clone()
    gen = torch.Generator(device=device).manual_seed(seed)
    shared = None
    if everything:  # one gallery for every query: move it once, no gather
        shared = (gallery.to(device), gallery_mask.to(device) if gallery_mask is not None else None)
    else:
        top = scores.topk(k, dim=1).indices  # [Nq, K]
    task = progress.add_task(f"{'t2v' if t2v else 'v2t'} generation", total=nq) if progress else None
    for s in range(0, nq, chunk):
        n = min(chunk, nq - s)
        q = query[s:s + n].to(device)
        if everything:
            g, gm = shared
            ctx = denoiser.prepare_shared(q, g, gm) if t2v else denoiser.prepare_shared(g, q, query_mask[s:s + n].to(device))
        else:
            cand = top[s:s + n].to(gallery.device)
            if t2v:
                ctx = denoiser.prepare(q, gallery[cand].to(device), gallery_mask[cand].to(device))
            else:
                ctx = denoiser.prepare(gallery[cand].to(device), q, query_mask[s:s + n].to(device))
        x0 = sampler.sample(lambda x, t: denoiser.denoise(x, t, ctx), (n, k), generator=gen, device=device)
        bonus = alpha * torch.softmax(x0.float() * temp, dim=1).cpu()
        if everything:
            out[s:s + n] += bonus
        else:
            rows = torch.arange(s, s + n)[:, None]
            idx = top[s:s + n]
            out[rows, idx] = scores[rows, idx] + bonus
        if progress:
            progress.update(task, advance=n)
    if progress:
        progress.remove_task(task)
    return out
