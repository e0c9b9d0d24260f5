"""Plain references the fast paths are checked and timed against (tests, benchmarks): the
original's re-ranking loop and stage-two's paired denoising, both on the denoisers'
`reference_forward` (the formula written out, everything recomputed at every step)."""
from __future__ import annotations

import torch


def initial_noise(nq: int, k: int, chunk: int, seed: int, device) -> torch.Tensor:
    """The x_T that `rerank.generate` draws (DDIM, eta 0): one randn((n, k)) per chunk of queries, in order."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return torch.cat([torch.randn((min(chunk, nq - s), k), generator=gen, device=device) for s in range(0, nq, chunk)])


@torch.inference_mode()
def baseline_rerank(S, denoiser, query, query_mask, gallery, gallery_mask, sampler, x_T, top_k=32, chunk=32,
                    alpha=1.0, temp=1.0, device="cpu"):
    """The original's inference loop: per chunk of 32 queries, each query's top-K candidates, the
    full formula at every step from x_T [Nq, K] -> the re-scored matrix [Nq, Nc]."""
    top = S.topk(top_k, dim=1).indices
    out = S.clone()
    steps = sampler.timesteps.tolist()
    for s in range(0, len(S), chunk):
        idx = top[s:s + chunk]
        q = query[s:s + chunk].to(device)
        qm = query_mask[s:s + chunk].to(device) if query_mask is not None else None
        g, gm = gallery.to(device), (gallery_mask.to(device) if gallery_mask is not None else None)
        x_t = x_T[s:s + chunk]
        for i, t in enumerate(steps):
            tb = torch.full((len(idx),), t, dtype=torch.long, device=device)
            x0 = denoiser.reference_pairs(x_t, tb, q, qm, g, gm, idx.to(device))
            if i == len(steps) - 1:
                x0 = sampler.clamp(x0)
            else:
                x_t, _ = sampler.step(x0, t, x_t)
        rows = torch.arange(s, s + len(idx))[:, None]
        out[rows, idx] = S[rows, idx] + alpha * torch.softmax(x0.float() * temp, dim=1).cpu()
    return out


def reference_denoise_pairs(t2v, v2t, f, rows, cand_v, cand_t, x_t2v, x_v2t, t):
    """trainer.denoise_pairs by the plain formula: x0 predictions [B, K] of both denoisers."""
    vid = f.caption_video[rows]
    return (t2v.reference_pairs(x_t2v, t, f.sentence[rows], None, f.frames, f.frame_mask, cand_v),
            v2t.reference_pairs(x_v2t, t, f.frames[vid], f.frame_mask[vid], f.sentence, None, cand_t))
