"""Generative re-ranking: sample x0 over each query's top-K candidates and add it to S.

    S'[q, c] = S[q, c] + alpha * softmax(temp * x0_hat[q])[c]   for the K best c of each query

`top_k=None` generates over the whole gallery (K = every candidate, in gallery order).

This module only schedules the work; every formula is the denoiser's (generator/denoiser.py:
`items`, `context`, `sampling`) and the step rule the sampler's (`run`, `step`):

* the gallery's own tables (`items`) are built once, over the distinct candidates;
* queries are drawn x_T in chunks (`chunk`, which fixes the random numbers);
* each chunk runs in blocks of about PREP_ROWS query-candidate rows (their `context`), and each
  block in sub-chunks small enough that a step's working set ([sub, K, 2D] decoder contribution,
  pooled candidates, a scratch buffer; STEP_BUDGET) stays in the CPU's caches through all steps;
* on the CPU the blocks are spread over single-threaded worker threads (`cache/blocks.run_blocks`),
  so no op waits at an OpenMP barrier. A sampler that draws noise at every step
  (`sampler.draws_noise`) runs a chunk as one block on one thread, so the draws keep their order.

Results never depend on the blocking. tests/test_rerank.py checks them against the original's
plain loop (generator/reference.py).
"""
from __future__ import annotations

import torch

from diffret.cache.blocks import run_blocks

from .fused import compiled, use_compiled

STEP_BUDGET = 12 << 20  # bytes: a sub-chunk's per-step working set. Measured on a 4 MiB-L2 Xeon (2 cores,
#                        K = 32, D = 512): 9 queries (3 MiB) 1.30 s, 32-64 (12-24 MiB) 1.15 s, 128 1.30 s:
#                        past L2 size, fewer ops (each ~2-5 us of dispatch) win until L3 misses grow
MIN_SUB_ROWS = 256  # ... and at least this many query x candidate rows, or per-op overhead dominates
PREP_ROWS = 512  # query x candidate rows whose context is built at once (the gathers stay under glibc's
#                  32 MiB mmap threshold, so freed blocks are recycled instead of faulted in afresh)


def chunk_size(k: int, width: int, frames: int = 1, budget: int = 1 << 26, cap: int = 256) -> int:
    """Queries per noise chunk: the per-chunk context ([chunk, K, 2D + F] floats) fits `budget`."""
    return max(1, min(cap, budget // max(1, k * (2 * width + frames))))


def sub_chunk_size(k: int, width: int, frames: int = 1, budget: int = STEP_BUDGET) -> int:
    """Queries per sub-chunk: candidates' pooled tokens, decoder part and scratch (K x 5D floats a
    query) within `budget` bytes, and at least MIN_SUB_ROWS query-candidate rows."""
    per_query = 4 * k * (5 * width + frames)
    return max(1, budget // per_query, -(-MIN_SUB_ROWS // k))


@torch.inference_mode()
def generate(
    denoiser,
    query: torch.Tensor,  # t2v: sentence [Nq, D]; v2t: frames [Nq, F, D]
    query_mask: torch.Tensor | None,  # v2t: frame mask [Nq, F]; t2v: None
    gallery: torch.Tensor,  # t2v: frames [Nc, F, D]; v2t: sentence [Nc, D]
    gallery_mask: torch.Tensor | None,  # t2v: frame mask [Nc, F]; v2t: None
    sampler,
    candidates: torch.Tensor | None,  # [Nq, K] gallery rows per query; None: the whole gallery
    alpha: float = 1.0,
    temp: float = 1.0,
    chunk: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress=None,
    sub_chunk: int | None = None,
    fused: str = "auto",
) -> torch.Tensor:
    """The re-ranking bonus alpha * softmax(temp * x0_hat) [Nq, K] (CPU, float32), column j for
    candidate candidates[:, j] (or gallery row j). The random numbers depend on (seed, chunk)
    only; the blocking (`sub_chunk`, PREP_ROWS) and the kernel (`fused`: generator/fused.py FUSED)
    change the cost, not the result."""
    device = torch.device(device)
    nq = len(query)
    k = len(gallery) if candidates is None else candidates.shape[1]
    width, frames = denoiser.width, (gallery if gallery.dim() == 3 else query).shape[1]
    chunk = chunk or chunk_size(k, width, frames)
    noisy = sampler.draws_noise
    if noisy:  # noise drawn at every step for the whole chunk: run it as one block
        prep = sub = chunk
    else:
        sub = sub_chunk or sub_chunk_size(k, width, frames)
        prep = max(sub, PREP_ROWS // k // sub * sub)
    steps = sampler.timesteps.tolist()
    out = torch.empty(nq, k, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed)
    index = None
    if candidates is None:  # one gallery for every query
        rows = gallery
        gm = gallery_mask
    else:  # the distinct candidates only (a search's few queries read a small part of the gallery)
        uniq, index = torch.unique(candidates.to(gallery.device), return_inverse=True)
        rows, gm = gallery[uniq], (gallery_mask[uniq] if gallery_mask is not None else None)
        index = index.to(device)
    items = denoiser.items(rows.to(device, torch.float32), gm.to(device) if gm is not None else None, nq * k,
                           None if candidates is None else k)
    task = progress.add_task(f"{denoiser.direction} generation", total=nq) if progress else None
    # x_T as the sampler draws it, a chunk at a time; with noise at every step, in the sampler's order
    # (x_T of a chunk, then its steps' noise), so the (single-threaded) blocks draw their own
    noise, blocks = [], []
    for s in range(0, nq, chunk):
        n = min(chunk, nq - s)
        noise.append(None if noisy else torch.randn((n, k), generator=gen, device=device))
        blocks += [(len(noise) - 1, s, p, min(p + prep, s + n)) for p in range(s, s + n, prep)]

    def run(block):
        c, s, p, pe = block
        x_T = noise[c] if noise[c] is not None else torch.randn((pe - p, k), generator=gen, device=device)
        q = query[p:pe].to(device, torch.float32)
        qm = query_mask[p:pe].to(device) if query_mask is not None else None
        ctx = denoiser.context(q, qm, items, None if index is None else index[p:pe])
        for r in range(p, pe, sub):
            e = min(r + sub, pe)
            predict = denoiser.sampling(ctx.rows(slice(r - p, e - p)), steps)
            x0 = sampler.run(lambda i, t, x: predict(i, x), x_T[r - s:e - s], gen)
            out[r:e] = alpha * torch.softmax(x0.float() * temp, dim=1).cpu()
            if progress:
                progress.update(task, advance=e - r)

    with compiled(use_compiled(fused, device, nq * k * len(steps) * 2 * width)):
        run_blocks(run, blocks, device, workers=1 if noisy else None)  # steps that draw noise share the generator
    if progress:
        progress.remove_task(task)
    return out


@torch.inference_mode()
def rerank(
    scores: torch.Tensor,  # [Nq, Nc] stage-1 scores (rows: queries)
    denoiser,
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
    fused: str = "auto",
) -> torch.Tensor:
    """Re-scored matrix [Nq, Nc] (CPU); entries outside each query's top-K keep S.

    top_k: candidates per query (None or >= Nc: the whole gallery); chunk: queries per noise chunk
    (None: from the memory budget).
    """
    nq, nc = scores.shape
    out = scores.clone()
    if top_k is None or top_k >= nc:
        out += generate(denoiser, query, query_mask, gallery, gallery_mask, sampler, None, alpha, temp, chunk, seed,
                        device, progress, fused=fused)
        return out
    top = scores.topk(top_k, dim=1)
    bonus = generate(denoiser, query, query_mask, gallery, gallery_mask, sampler, top.indices, alpha, temp, chunk,
                     seed, device, progress, fused=fused)
    return out.scatter_(1, top.indices, top.values + bonus)
