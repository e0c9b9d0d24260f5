"""The two DiffusionRet denoisers: text->video (T2V) and video->text (V2T).

Each maps a noisy candidate distribution x_t [B, K] and a timestep t [B] to an x0
prediction [B, K] over K candidates of one query. Parameter and buffer names follow
the released code, so its state dict loads as is (including the shared positional
table, stored as both ``sequence_pos_encoder.pe`` and
``embed_timestep.sequence_pos_encoder.pe``).

For speed the computation is split in two:

* ``prepare(...) -> Context``: everything independent of (t, x_t), done once.
* ``denoise(x_t, t, ctx)``: the per-step part, O(B K D) plus O(B D^2).

Linearity is used throughout (``k_proj(v + c) = k_proj(v) + k_proj(c)``, and
``q . k_proj(v) = k_proj^T(q) . v``), and terms that are constant over the K
candidates are dropped from the softmax logits (softmax is shift-invariant), so the
context only holds the pooled candidates and the decoder's first-layer contribution.
``reference_forward`` is the formula written out plainly; tests check they agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "PositionalEncoding",
    "TimestepEmbedder",
    "T2VDenoiser",
    "V2TDenoiser",
    "T2VContext",
    "V2TContext",
    "count_parameters",
    "original_init_",
]


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (buffers excluded, shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def original_init_(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Re-initialise as the original's `init_weights` (modeling.py, applied to the whole model before
    loading CLIP): Linear and Embedding weights N(0, std), Linear biases 0, LayerNorm weight 1 and
    bias 0. The positional table is a buffer and stays. In place; returns the module."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(mean=0.0, std=std)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.fill_(1.0)
            if m.bias is not None:
                m.bias.zero_()
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.zero_()
    return module


# Rows of the timestep table (the original's 5,000): a generator trains at most this many diffusion
# steps T (GeneratorConfig.validate refuses more); the table is part of every saved checkpoint.
MAX_TIMESTEPS = 5000


class PositionalEncoding(nn.Module):
    """Sinusoidal table ``pe`` [max_len, 1, D] (a buffer), indexed by timestep."""

    def __init__(self, width: int, max_len: int = MAX_TIMESTEPS):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, width, 2).float() * (-math.log(10000.0) / width))
        pe = torch.zeros(max_len, width)
        pe[:, 0::2] = torch.sin(position * div)
        pe[:, 1::2] = torch.cos(position * div)
        self.register_buffer("pe", pe.unsqueeze(1))


class TimestepEmbedder(nn.Module):
    """c = time_embed(pe[t]): LongTensor [B] -> [B, D]. Shares the positional table module."""

    def __init__(self, width: int, sequence_pos_encoder: PositionalEncoding):
        super().__init__()
        self.sequence_pos_encoder = sequence_pos_encoder
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.time_embed(self.sequence_pos_encoder.pe[t].squeeze(-2))


def _attend_frames(queries: Tensor, frames: Tensor, mask: Tensor, temp: float) -> Tensor:
    """Query-guided frame pooling, exactly as the original.

    queries [..., Q, D], frames [..., F, D], mask [..., F] -> [..., Q, D], with weights
    softmax_F(q . f / temp) * mask: the softmax runs over all F frames and is not renormalised.
    """
    a = torch.softmax(queries @ frames.transpose(-1, -2) / temp, dim=-1)
    a = a * mask.to(a.dtype).unsqueeze(-2)
    return a @ frames


def _timestep(t, device) -> Tensor:
    """Timesteps as LongTensor [B], or [1] when all rows share one t (an int, or a stride-0
    tensor such as ``torch.full((1,), t).expand(B)``, which the samplers pass): the time
    embedding then costs O(D^2) instead of O(B D^2) and broadcasts over the batch."""
    t = torch.as_tensor(t, dtype=torch.long, device=device).reshape(-1)
    if t.numel() > 1 and t.stride(0) == 0:
        t = t[:1]
    return t


class _Denoiser(nn.Module):
    """Shared layers. Names match the released checkpoint."""

    def __init__(self, width: int, temp: float = 1.0):
        super().__init__()
        self.width = width
        self.temp = float(temp)
        self.q_proj = nn.Linear(width, width, bias=False)
        self.k_proj = nn.Linear(width, width, bias=False)
        self.v_proj = nn.Linear(width, width, bias=False)
        self.proj = nn.Linear(width, width)
        self.sequence_pos_encoder = PositionalEncoding(width)
        self.embed_timestep = TimestepEmbedder(width, self.sequence_pos_encoder)
        self.decoder = nn.Sequential(nn.Linear(2 * width, 2 * width), nn.ReLU(), nn.Linear(2 * width, 1))

    def _decoder_candidate_part(self, cand: Tensor) -> Tensor:
        """First decoder layer's contribution of the candidate half of cat[e, cand] (+ bias): [B,K,D] -> [B,K,2D]."""
        lin = self.decoder[0]
        return nn.functional.linear(cand, lin.weight[:, self.width :], lin.bias)

    def _fused_head(self) -> tuple[Tensor, Tensor]:
        """decoder[0]'s e-half after proj after v_proj, as one affine map: (M [2D,D], b [2D]).

        e = proj(v_proj(x)) is linear in x, so W1e e = (W1e P V) x + W1e b_P: one [B,D]x[D,2D]
        product per step instead of three. Without gradients (sampling) it is kept until a weight
        changes (in place, or moved): two [2D,D]x[D,D] products are ~1 GFLOP at D = 512.
        """
        if torch.is_grad_enabled():
            return self._compute_fused_head()
        weights = (self.decoder[0].weight, self.proj.weight, self.proj.bias, self.v_proj.weight)
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        cached = self.__dict__.get("_head_cache")
        if cached is None or cached[0] != key:
            cached = self._head_cache = (key, self._compute_fused_head())
        return cached[1]

    def _compute_fused_head(self) -> tuple[Tensor, Tensor]:
        w1e = self.decoder[0].weight[:, : self.width]
        return w1e @ self.proj.weight @ self.v_proj.weight, w1e @ self.proj.bias

    def _decode(self, x: Tensor, ctx, dec_cand: Tensor, w: Tensor) -> Tensor:
        """decoder(cat[proj(v_proj(x)), cand]) + w from x [B,D] (pooled + c), the context's fused
        head, precomputed dec_cand [B,K,2D] and w [B,K] -> [B,K]."""
        m, b = ctx.head
        he = (x @ m.T + b).unsqueeze(1)
        if torch.is_grad_enabled():
            h = dec_cand + he
        else:  # sampling: one [B,K,2D] buffer for all steps; a fresh one each step costs as much as the math
            if ctx.scratch is None or ctx.scratch.shape != dec_cand.shape:
                ctx.scratch = torch.empty_like(dec_cand)
            h = torch.add(dec_cand, he, out=ctx.scratch)
        lin2 = self.decoder[2]
        return h.relu_() @ lin2.weight[0] + lin2.bias + w

    def _decode_plain(self, e: Tensor, cand: Tensor, w: Tensor) -> Tensor:
        emb = torch.cat([e.unsqueeze(1).expand(-1, cand.shape[1], -1), cand], dim=-1)
        return self.decoder(emb).squeeze(-1) + w


@dataclass
class T2VContext:
    """Step-independent state of :class:`T2VDenoiser`.

    text_qk: k_proj^T q_proj(text) [B, D]; videos: pooled candidates v_k [B, K, D];
    dec_videos: decoder first-layer contribution of v_k incl. bias [B, K, 2D].
    """

    text_qk: Tensor
    videos: Tensor
    dec_videos: Tensor
    head: tuple[Tensor, Tensor]  # fused proj . v_proj . decoder[0] (e half): M [2D, D], b [2D]
    scratch: Tensor | None = None  # reused [B, K, 2D] buffer while sampling


@dataclass
class V2TContext:
    """Step-independent state of :class:`V2TDenoiser`.

    texts: candidates text_k [B, K, D]; pooled: text-guided video u_k [B, K, D];
    base_logits: q_proj(u_k) . k_proj(text_k) [B, K];
    dec_texts: decoder first-layer contribution of text_k incl. bias [B, K, 2D].
    """

    texts: Tensor
    pooled: Tensor
    base_logits: Tensor
    dec_texts: Tensor
    head: tuple[Tensor, Tensor]  # fused proj . v_proj . decoder[0] (e half): M [2D, D], b [2D]
    scratch: Tensor | None = None  # reused [B, K, 2D] buffer while sampling


class T2VDenoiser(_Denoiser):
    """Text query, K candidate videos: text [B,D], frames [B,K,F,D], frame_mask [B,K,F] (1 valid)."""

    def prepare(self, text: Tensor, frames: Tensor, frame_mask: Tensor) -> T2VContext:
        """-> T2VContext holding W_k^T q_proj(text), v_k = sum_f a_f frame_f, and the decoder part of v_k."""
        videos = _attend_frames(text[:, None, None, :], frames, frame_mask, self.temp).squeeze(-2)
        text_qk = self.q_proj(text) @ self.k_proj.weight
        return T2VContext(text_qk, videos, self._decoder_candidate_part(videos), self._fused_head())

    def prepare_shared(self, text: Tensor, frames: Tensor, frame_mask: Tensor) -> T2VContext:
        """The same context when all B queries share one gallery of K videos (re-ranking the whole
        gallery): text [B,D], frames [K,F,D], frame_mask [K,F]; never builds a [B,K,F,D] copy."""
        a = torch.softmax(torch.einsum("bd,kfd->bkf", text, frames) / self.temp, dim=-1)
        videos = torch.einsum("bkf,kfd->bkd", a * frame_mask.to(a.dtype), frames)
        text_qk = self.q_proj(text) @ self.k_proj.weight
        return T2VContext(text_qk, videos, self._decoder_candidate_part(videos), self._fused_head())

    def denoise(self, x_t: Tensor, t, ctx: T2VContext) -> Tensor:
        """x_t [B,K], t LongTensor [B] (or int) -> x0_hat [B,K]."""
        c = self.embed_timestep(_timestep(t, x_t.device))  # [B or 1, D]
        # q . k_proj(v_k + c) = (W_k^T q) . v_k + q . k_proj(c); the latter is constant over k.
        qk = ctx.text_qk + self.q_proj(c) @ self.k_proj.weight
        logits = (ctx.videos @ qk.unsqueeze(-1)).squeeze(-1) + x_t
        w = torch.softmax(logits, dim=-1)
        # sum_k w_k v_proj(v_k + c) = v_proj(sum_k w_k v_k + c) since sum_k w_k = 1.
        pooled = (w.unsqueeze(1) @ ctx.videos).squeeze(1)
        return self._decode(pooled + c, ctx, ctx.dec_videos, w)

    def forward(self, x_t: Tensor, t, text: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """x0_hat [B,K] = denoise(x_t, t, prepare(text, frames, frame_mask))."""
        return self.denoise(x_t, t, self.prepare(text, frames, frame_mask))

    def reference_forward(self, x_t: Tensor, t, text: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """The released formula written out plainly (slow path, for tests)."""
        c = self.embed_timestep(_timestep(t, x_t.device).expand(x_t.shape[0]))
        a = torch.softmax(torch.einsum("bd,bkfd->bkf", text, frames) / self.temp, dim=-1)
        a = a * frame_mask.to(a.dtype)
        v = torch.einsum("bkf,bkfd->bkd", a, frames)
        q = self.q_proj(text + c)
        k = self.k_proj(v + c.unsqueeze(1))
        val = self.v_proj(v + c.unsqueeze(1))
        w = torch.softmax(torch.einsum("bd,bkd->bk", q, k) + x_t, dim=-1)
        e = self.proj(torch.einsum("bk,bkd->bd", w, val))
        return self._decode_plain(e, v, w)


class V2TDenoiser(_Denoiser):
    """Video query, K candidate texts: texts [B,K,D], frames [B,F,D], frame_mask [B,F] (1 valid)."""

    def prepare(self, texts: Tensor, frames: Tensor, frame_mask: Tensor) -> V2TContext:
        """-> V2TContext holding u_k = sum_f a_kf frame_f, q_proj(u_k) . k_proj(text_k), decoder part of text_k."""
        pooled = _attend_frames(texts, frames, frame_mask, self.temp)
        base = (self.q_proj(pooled) * self.k_proj(texts)).sum(-1)
        return V2TContext(texts, pooled, base, self._decoder_candidate_part(texts), self._fused_head())

    def prepare_shared(self, texts: Tensor, frames: Tensor, frame_mask: Tensor) -> V2TContext:
        """The same context when all B query videos share one gallery of K texts (re-ranking the
        whole gallery): texts [K,D], frames [B,F,D], frame_mask [B,F]; text-only terms computed once."""
        B = frames.shape[0]
        a = torch.softmax(torch.einsum("kd,bfd->bkf", texts, frames) / self.temp, dim=-1)
        pooled = torch.einsum("bkf,bfd->bkd", a * frame_mask.to(a.dtype).unsqueeze(1), frames)
        base = (self.q_proj(pooled) * self.k_proj(texts)).sum(-1)
        dec = self._decoder_candidate_part(texts).expand(B, -1, -1)
        return V2TContext(texts.expand(B, -1, -1), pooled, base, dec, self._fused_head())

    def denoise(self, x_t: Tensor, t, ctx: V2TContext) -> Tensor:
        """x_t [B,K], t LongTensor [B] (or int) -> x0_hat [B,K]."""
        c = self.embed_timestep(_timestep(t, x_t.device))  # [B or 1, D]
        qc, kc = self.q_proj(c), self.k_proj(c)
        # (Wq u_k + qc) . (Wk s_k + kc) = base_k + u_k . Wq^T kc + s_k . Wk^T qc + const_k.
        g_u = kc @ self.q_proj.weight  # [B, D]
        g_s = qc @ self.k_proj.weight
        logits = (
            ctx.base_logits
            + (ctx.pooled @ g_u.unsqueeze(-1)).squeeze(-1)
            + (ctx.texts @ g_s.unsqueeze(-1)).squeeze(-1)
            + x_t
        )
        w = torch.softmax(logits, dim=-1)
        pooled_text = (w.unsqueeze(1) @ ctx.texts).squeeze(1)
        return self._decode(pooled_text + c, ctx, ctx.dec_texts, w)

    def forward(self, x_t: Tensor, t, texts: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """x0_hat [B,K] = denoise(x_t, t, prepare(texts, frames, frame_mask))."""
        return self.denoise(x_t, t, self.prepare(texts, frames, frame_mask))

    def reference_forward(self, x_t: Tensor, t, texts: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """The released formula written out plainly (slow path, for tests)."""
        c = self.embed_timestep(_timestep(t, x_t.device).expand(x_t.shape[0]))
        a = torch.softmax(torch.einsum("bkd,bfd->bkf", texts, frames) / self.temp, dim=-1)
        a = a * frame_mask.to(a.dtype).unsqueeze(1)
        u = torch.einsum("bkf,bfd->bkd", a, frames)
        q = self.q_proj(u + c.unsqueeze(1))
        k = self.k_proj(texts + c.unsqueeze(1))
        val = self.v_proj(texts + c.unsqueeze(1))
        w = torch.softmax(torch.einsum("bkd,bkd->bk", q, k) + x_t, dim=-1)
        e = self.proj(torch.einsum("bk,bkd->bd", w, val))
        return self._decode_plain(e, texts, w)
