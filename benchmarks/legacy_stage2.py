"""Stage two's paired denoising as it was before issue 14 (the reference path of train_speed.py).

A frozen copy of the old `trainer.denoise_pairs` with the old `prepare_shared` / `denoise` algebra,
on the same modules (same parameter names): the decoder's first layer applied to the pooled video
of every (query, candidate) pair ([B, K, D] x [D, 2D]) and q_proj over every pooled v2t candidate.
Kept only to time today's implementation against the new one in the same run and to check that
both give the same losses; nothing in the package uses it.
"""
from __future__ import annotations

import torch
from torch import nn


def _take(x, index):
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _head(m):
    w1e = m.decoder[0].weight[:, : m.width]
    return w1e @ m.proj.weight @ m.v_proj.weight, w1e @ m.proj.bias


def _cand_part(m, cand):
    lin = m.decoder[0]
    return nn.functional.linear(cand, lin.weight[:, m.width:], lin.bias)


def _decode(m, x, head, dec, w):
    mm, b = head
    h = dec + (x @ mm.T + b).unsqueeze(1)
    lin2 = m.decoder[2]
    return h.relu_() @ lin2.weight[0] + lin2.bias + w


def _t(t, device):
    t = torch.as_tensor(t, dtype=torch.long, device=device).reshape(-1)
    return t[:1] if t.numel() > 1 and t.stride(0) == 0 else t


def t2v_step(m, x_t, t, text, frames, fmask, inv):
    a = torch.softmax(torch.einsum("bd,kfd->bkf", text, frames) / m.temp, dim=-1)
    videos = _take(torch.einsum("bkf,kfd->bkd", a * fmask.to(a.dtype), frames), inv)
    text_qk = m.q_proj(text) @ m.k_proj.weight
    dec = _cand_part(m, videos)
    c = m.embed_timestep(_t(t, x_t.device))
    qk = text_qk + m.q_proj(c) @ m.k_proj.weight
    w = torch.softmax((videos @ qk.unsqueeze(-1)).squeeze(-1) + x_t, dim=-1)
    pooled = (w.unsqueeze(1) @ videos).squeeze(1)
    return _decode(m, pooled + c, _head(m), dec, w)


def v2t_step(m, x_t, t, texts_u, frames, fmask, inv):
    B = frames.shape[0]
    a = torch.softmax(torch.einsum("kd,bfd->bkf", texts_u, frames) / m.temp, dim=-1)
    pooled = torch.einsum("bkf,bfd->bkd", a * fmask.to(a.dtype).unsqueeze(1), frames)
    base = (m.q_proj(pooled) * m.k_proj(texts_u)).sum(-1)
    dec = _cand_part(m, texts_u).expand(B, -1, -1)
    texts, pooled, base, dec = (_take(texts_u.expand(B, -1, -1), inv), _take(pooled, inv), _take(base, inv),
                                _take(dec, inv))
    c = m.embed_timestep(_t(t, x_t.device))
    qc, kc = m.q_proj(c), m.k_proj(c)
    logits = (base + (pooled @ (kc @ m.q_proj.weight).unsqueeze(-1)).squeeze(-1)
              + (texts @ (qc @ m.k_proj.weight).unsqueeze(-1)).squeeze(-1) + x_t)
    w = torch.softmax(logits, dim=-1)
    return _decode(m, (w.unsqueeze(1) @ texts).squeeze(1) + c, _head(m), dec, w)


def legacy_denoise_pairs(t2v, v2t, f, rows, cand_v, cand_t, x_t2v, x_v2t, t, shared=None):
    """The old trainer.denoise_pairs (its shared path: in-batch candidates are few distinct items)."""
    vid = f.caption_video[rows]
    uv, iv = torch.unique(cand_v, return_inverse=True)
    ut, it = torch.unique(cand_t, return_inverse=True)
    return (t2v_step(t2v, x_t2v, t, f.sentence[rows], f.frames[uv], f.frame_mask[uv], iv),
            v2t_step(v2t, x_v2t, t, f.sentence[ut], f.frames[vid], f.frame_mask[vid], it))
