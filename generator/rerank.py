"""Generative re-ranking: sample x0 over each query's top-K candidates and add it to S.

    S'[q, c] = S[q, c] + alpha * softmax(temp * x0_hat[q])[c]   for the K best c of each query

`top_k=None` generates over the whole gallery (K = every candidate, in gallery order).

`generate` is the engine, on candidate lists (it needs only each query's K candidates, never S):
queries are drawn x_T in chunks (`chunk`, which fixes the random numbers), and each chunk runs
in sub-chunks small enough that their working set ([sub, K, 2D] decoder contribution, pooled
candidates, a scratch buffer; STEP_BUDGET) stays in the CPU's caches through ALL the sampling steps. Per
sub-chunk everything that does not depend on x_t is computed once:

* the denoiser's `prepare` (pooled candidates, decoder contribution of the candidates);
* the attention logits' step-dependent part for every step at once (the time embedding enters
  linearly: one [sub*K, D] x [D, steps] product), and the time embedding's share of the decoder
  input (a [steps, 2D] table shared by all queries);

so a step costs a softmax over [sub, K], the pooled head input (w @ (candidates M^T), M^T
precomputed per block, when K <= 2 x steps; else (w @ candidates) M^T) and the decoder's
[sub, K, 2D] add-ReLU-dot, with no allocation of that size. On the CPU the blocks
(PREP_ROWS query-candidate rows: gather, `prepare`, then its sub-chunks) are spread over
single-threaded worker threads (`diffret.cache.blocks.run_blocks`), so no op waits at an OpenMP
barrier. DDPM (and DDIM with eta > 0) draws noise at every step: there a chunk runs as one block,
on one thread, so the draws come in the sampler's order. Results never depend on the blocking.

The step loop relies on the denoiser's algebra (`T2VDenoiser.denoise`, `V2TDenoiser.denoise`):
tests/test_rerank.py checks it against the plain formula (`reference_forward`).
"""
from __future__ import annotations

import math
import threading

import torch

from diffret.cache.blocks import run_blocks

from .denoiser import T2VDenoiser, V2TDenoiser
from .sampler import DDIMSampler

STEP_BUDGET = 12 << 20  # bytes: a sub-chunk's per-step working set. Measured on a 4 MiB-L2 Xeon (2 cores,
#                        K = 32, D = 512): 9 queries (3 MiB) 1.30 s, 32-64 (12-24 MiB) 1.15 s, 128 1.30 s:
#                        past L2 size, fewer ops (each ~2-5 us of dispatch) win until L3 misses grow
MIN_SUB_ROWS = 256  # ... and at least this many query x candidate rows, or per-op overhead dominates
PREP_ROWS = 1024  # query x candidate rows prepared at once (t2v gathers [rows, F, D] frames: < 32 MiB,
#                   so glibc recycles the block instead of mapping and faulting in fresh pages each time)


def chunk_size(k: int, width: int, frames: int = 1, budget: int = 1 << 26, cap: int = 256) -> int:
    """Queries per noise chunk: the per-chunk context ([chunk, K, 2D + F] floats) fits `budget`."""
    return max(1, min(cap, budget // max(1, k * (2 * width + frames))))


def sub_chunk_size(k: int, width: int, frames: int = 1, budget: int = STEP_BUDGET) -> int:
    """Queries per sub-chunk: candidates' pooled tokens, decoder part and scratch (K x 5D floats a
    query) within `budget` bytes, and at least MIN_SUB_ROWS query-candidate rows."""
    per_query = 4 * k * (5 * width + frames)
    return max(1, budget // per_query, -(-MIN_SUB_ROWS // k))


class _StepTables:
    """Everything about the sampling steps that no query changes, for one denoiser."""

    def __init__(self, denoiser, timesteps: list[int], device):
        t = torch.as_tensor(timesteps, dtype=torch.long, device=device)
        c = denoiser.embed_timestep(t)  # [S, D] time embeddings
        self.head = denoiser._fused_head()  # e-half of decoder[0] after proj after v_proj: [2D, D], [2D]
        m, b = self.head
        self.mt = m.t()
        self.hb = c @ self.mt + b  # [S, 2D]: the time embedding's share of the decoder input
        lin2 = denoiser.decoder[2]
        self.w2, self.b2 = lin2.weight[0], lin2.bias
        if isinstance(denoiser, T2VDenoiser):  # logits: v_k . (W_k^T q_proj(text) + W_k^T q_proj(c_t))
            self.g = (denoiser.q_proj(c) @ denoiser.k_proj.weight).t().contiguous()  # [D, S]
        else:  # logits: base_k + u_k . Wq^T k_proj(c_t) + s_k . Wk^T q_proj(c_t)
            self.gu = (denoiser.k_proj(c) @ denoiser.q_proj.weight).t().contiguous()  # [D, S]
            self.gs = (denoiser.q_proj(c) @ denoiser.k_proj.weight).t().contiguous()  # [D, S]


def _prepare(denoiser, q, qm, g, gm, shared: bool):
    """The denoiser's step-independent context -> (pooled candidates [b, K, D] (or [K, D] when
    shared), decoder contribution [b, K, 2D] (possibly a stride-0 view), ctx)."""
    if isinstance(denoiser, T2VDenoiser):  # q: text [b, D]; g: frames [b, K, F, D] or shared [K, F, D]
        ctx = denoiser.prepare_shared(q, g, gm) if shared else denoiser.prepare(q, g, gm)
        return ctx.videos, ctx.dec_videos, ctx
    # v2t: q: frames [b, F, D] with mask qm; g: texts [b, K, D] or shared [K, D]
    ctx = denoiser.prepare_shared(g, q, qm) if shared else denoiser.prepare(g, q, qm)
    return (g if shared else ctx.texts), ctx.dec_texts, ctx


def _logits(denoiser, tables: _StepTables, ctx, v, rows: slice) -> torch.Tensor:
    """Attention logits of every step before x_t, for the context's `rows`: [S, b, K]."""
    if isinstance(denoiser, T2VDenoiser):
        vr = v[rows]
        logits = vr @ ctx.text_qk[rows].unsqueeze(-1) + vr @ tables.g  # [b, K, S]
    else:
        texts = v if v.dim() == 2 else v[rows]
        logits = ctx.base_logits[rows].unsqueeze(-1) + ctx.pooled[rows] @ tables.gu + texts @ tables.gs
    return logits.permute(2, 0, 1).contiguous()


def _sample_block(tables: _StepTables, sampler, x_t, logits, v, dec, vm, generator):
    """All sampling steps for one block: x_T [b, K] -> final clamped x0 [b, K]. The update is the
    sampler's own `step`, so its epsilon rule (DDIM: from the clamped x0 by default) holds here too.

    vm: the candidates through the fused head, [b, K, 2D] (then the pooled head input of a step is
    w @ vm), or None (then it is (w @ v) @ M^T, one [b, D] x [D, 2D] product a step)."""
    steps = sampler.timesteps.tolist()
    scratch = torch.empty(dec.shape, dtype=dec.dtype, device=dec.device)
    x0 = x_t
    for i, t in enumerate(steps):
        w = torch.softmax(logits[i] + x_t, dim=-1)  # [b, K]
        if vm is not None:
            he = torch.baddbmm(tables.hb[i], w.unsqueeze(1), vm)  # [b, 1, 2D]
        else:
            pooled = w @ v if v.dim() == 2 else torch.bmm(w.unsqueeze(1), v).squeeze(1)  # [b, D]
            he = torch.addmm(tables.hb[i], pooled, tables.mt).unsqueeze(1)  # [b, 1, 2D]
        h = torch.add(dec, he, out=scratch).relu_()
        x0_pred = torch.matmul(h, tables.w2).add_(tables.b2).add_(w)  # [b, K]
        if i == len(steps) - 1:
            x0 = x0_pred.clamp(-1.0, 1.0) if sampler.clip_sample else x0_pred
        else:
            x_t = sampler.step(x0_pred, t, x_t, generator=generator)
    return x0


@torch.inference_mode()
def generate(
    denoiser: T2VDenoiser | V2TDenoiser,
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
) -> torch.Tensor:
    """The re-ranking bonus alpha * softmax(temp * x0_hat) [Nq, K] (CPU, float32), column j for
    candidate candidates[:, j] (or gallery row j). The random numbers depend on (seed, chunk)
    only; the blocking (`sub_chunk`, PREP_ROWS) changes the cost, not the result."""
    device = torch.device(device)
    t2v = isinstance(denoiser, T2VDenoiser)
    nq = len(query)
    k = len(gallery) if candidates is None else candidates.shape[1]
    width, frames = denoiser.width, (gallery.shape[1] if t2v else query.shape[1])
    chunk = chunk or chunk_size(k, width, frames)
    noisy_steps = not (isinstance(sampler, DDIMSampler) and sampler.eta == 0)
    if noisy_steps:  # noise drawn at every step for the whole chunk: run it as one block
        prep = sub = chunk
    else:
        sub = sub_chunk or sub_chunk_size(k, width, frames)
        prep = max(sub, PREP_ROWS // k // sub * sub)
    tables = _StepTables(denoiser, sampler.timesteps.tolist(), device)
    use_vm = k <= 2 * sampler.num_inference_steps  # fold the head into the candidates when cheaper
    out = torch.empty(nq, k, dtype=torch.float32)
    gen = torch.Generator(device=device).manual_seed(seed)
    shared = candidates is None
    if shared:  # one gallery for every query: move it once, no gather
        g_all = gallery.to(device, torch.float32)
        gm_all = gallery_mask.to(device) if gallery_mask is not None else None
    task = progress.add_task(f"{'t2v' if t2v else 'v2t'} generation", total=nq) if progress else None
    # x_T as the sampler draws it, a chunk at a time; with noise at every step, in the sampler's order
    # (x_T of a chunk, then its steps' noise), so the (single-threaded) blocks draw their own
    noise, blocks, buffers = [], [], {}
    for s in range(0, nq, chunk):
        n = min(chunk, nq - s)
        noise.append(None if noisy_steps else torch.randn((n, k), generator=gen, device=device))
        blocks += [(len(noise) - 1, s, p, min(p + prep, s + n)) for p in range(s, s + n, prep)]

    def run(block):
        c, s, p, pe = block
        x_T = noise[c] if noise[c] is not None else torch.randn((pe - p, k), generator=gen, device=device)
        q = query[p:pe].to(device, torch.float32)
        qm = query_mask[p:pe].to(device) if query_mask is not None else None
        if shared:
            g, gm = g_all, gm_all
        else:
            cand = candidates[p:pe].to(gallery.device)
            flat = cand.reshape(-1)
            shape = (len(flat), *gallery.shape[1:])
            buf = buffers.get(threading.get_ident())  # one gather buffer a thread: no fresh pages per block
            if buf is None or buf.numel() < math.prod(shape):
                buf = buffers[threading.get_ident()] = gallery.new_empty(math.prod(shape))
            g = torch.index_select(gallery, 0, flat, out=buf[:math.prod(shape)].view(shape))
            g = g.view(*cand.shape, *gallery.shape[1:]).to(device, torch.float32)
            gm = gallery_mask.index_select(0, flat).view(cand.shape + gallery_mask.shape[1:]).to(device) \
                if gallery_mask is not None else None
        v, dec, ctx = _prepare(denoiser, q, qm, g, gm, shared)
        del g, gm
        for r in range(p, pe, sub):
            e = min(r + sub, pe)
            rows = slice(r - p, e - p)
            vr = v if v.dim() == 2 else v[rows]
            vm = (vr if vr.dim() == 3 else vr.expand(e - r, -1, -1)) @ tables.mt if use_vm else None
            x0 = _sample_block(tables, sampler, x_T[r - s:e - s], _logits(denoiser, tables, ctx, v, rows),
                               vr, dec[rows], vm, gen)
            out[r:e] = alpha * torch.softmax(x0.float() * temp, dim=1).cpu()
            if progress:
                progress.update(task, advance=e - r)

    # steps that draw noise share the generator: one thread
    run_blocks(run, blocks, device, workers=1 if noisy_steps else None)
    if progress:
        progress.remove_task(task)
    return out


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

    top_k: candidates per query (None or >= Nc: the whole gallery); chunk: queries per noise chunk
    (None: from the memory budget).
    """
    nq, nc = scores.shape
    out = scores.clone()
    if top_k is None or top_k >= nc:
        out += generate(denoiser, query, query_mask, gallery, gallery_mask, sampler, None, alpha, temp, chunk, seed,
                        device, progress)
        return out
    top = scores.topk(top_k, dim=1)
    bonus = generate(denoiser, query, query_mask, gallery, gallery_mask, sampler, top.indices, alpha, temp, chunk,
                     seed, device, progress)
    return out.scatter_(1, top.indices, top.values + bonus)
