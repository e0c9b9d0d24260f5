"""The two DiffusionRet denoisers, text->video (T2V) and video->text (V2T): all of their algebra.

Each maps a noisy candidate distribution x_t [B, K] and a timestep t [B] to an x0 prediction
[B, K] over K candidates of one query. Parameter and buffer names follow the released code, so
its state dict loads as is (including the shared positional table, stored as both
``sequence_pos_encoder.pe`` and ``embed_timestep.sequence_pos_encoder.pe``).

``reference_forward`` is the formula written out plainly. Everything else is ONE fast path, used
by training, top-K re-ranking, whole-gallery generation and the sampler alike (tests check it
equals the reference in values and gradients):

* ``items(gallery, mask)`` -> Items: what depends on the gallery only (T2V: frames and, when it
  pays, the frames through the decoder's first layer; V2T: the texts' first-layer and key terms);
* ``context(query, query_mask, items, index)`` -> Context: what depends on (query, candidate)
  but not on (t, x_t), for candidates ``index`` [B, K] into the items (None: all of them);
* ``denoise(x_t, t, ctx)`` (training) and ``sampling(ctx, timesteps)`` (all steps of a sampler,
  their step-only terms precomputed) run the same per-step formula, ``_predict``.

Algebra used (all exact): linearity (``k_proj(v + c) = k_proj(v) + k_proj(c)``,
``q . k_proj(v) = k_proj^T(q) . v``); terms constant over the K candidates dropped from the
softmax logits; proj . v_proj . decoder[0] (e half) folded into one affine map (the "head");
and the factored first layer: decoder[0] sees cat[e, v_k] with v_k = sum_f a_f frame_f, so its
candidate half is W1c v_k = sum_f a_f (W1c frame_f): each distinct video's frames are projected
once ([U, F, D] x [D, 2D]) and pooled as projections (F x 2D a pair) instead of a [D, 2D] product
for every (query, candidate) pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .fused import add_relu_dot

__all__ = ["PositionalEncoding", "TimestepEmbedder", "T2VDenoiser", "V2TDenoiser", "Items", "Context",
           "count_parameters", "original_init_", "MAX_TIMESTEPS"]

PROJ_BUDGET = 1 << 30  # bytes: the factored first layer keeps [U, F, 2D] projected frames at most this large


def count_parameters(module: nn.Module) -> int:
    """Number of parameter elements (buffers excluded, shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def original_init_(module: nn.Module, std: float = 0.02) -> nn.Module:
    """Re-initialise as the original's `init_weights`: Linear and Embedding weights N(0, std), Linear
    biases 0, LayerNorm weight 1 and bias 0. The positional table is a buffer and stays. In place."""
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


def _timestep(t, device) -> Tensor:
    """Timesteps as LongTensor [B], or [1] when all rows share one t (an int, or a stride-0 tensor
    such as ``torch.full((1,), t).expand(B)``): the time terms then cost O(D^2), not O(B D^2)."""
    t = torch.as_tensor(t, dtype=torch.long, device=device).reshape(-1)
    if t.numel() > 1 and t.stride(0) == 0:
        t = t[:1]
    return t


def _take(x: Tensor, index: Tensor) -> Tensor:
    """x [B, U, ...], index [B, K] into U -> [B, K, ...]."""
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, *x.shape[2:]))


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """x[index] for x [U, ...], index [B, K] -> [B, K, ...] (a row gather)."""
    return x[index]


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    """x [B|1, K, D] . y [B|1, D] over D -> [B|1, K]."""
    if y.shape[0] == 1:
        return x @ y[0]
    if x.shape[0] == 1:
        return y @ x[0].t()
    return torch.bmm(x, y.unsqueeze(-1)).squeeze(-1)


def _pool(w: Tensor, x: Tensor) -> Tensor:
    """sum_k w[b, k] x[b|0, k] : w [B, K], x [B|1, K, E] -> [B, E]."""
    return w @ x[0] if x.shape[0] == 1 else torch.bmm(w.unsqueeze(1), x).squeeze(1)


@dataclass
class Items:
    """Gallery-only tables of U items. T2V: tokens = frames [U, F, D], mask [U, F], proj = frames
    through decoder[0]'s candidate half [U, F, 2D] or None (then each pair's pooled video is
    projected). V2T: tokens = texts [U, D], proj = W1c text [U, 2D], keys = Wq^T Wk text [U, D];
    sampling only: headed = the texts through the head, M text [U, 2D] (the candidates it pools)."""

    tokens: Tensor
    mask: Tensor | None = None
    proj: Tensor | None = None
    keys: Tensor | None = None
    headed: Tensor | None = None


@dataclass
class Context:
    """Step-independent tables of B queries over U slots (both directions have this form). A leading
    axis of 1 means shared by every query (whole-gallery generation never copies it). Candidate k
    of query b is slot index[b, k] (None: slot k), so candidates the batch shares (training's
    in-batch items) are computed once a slot, never gathered per candidate.

    base [B|1, U]: logits without t; feats: tensors [B|1, U, D] whose dot with the step vectors
    (`_step_vectors`) are the t-dependent logits; cand [B|1, U, D]: pooled by the attention weights
    into the head input; dec [B|1, U, 2D]: decoder[0]'s candidate half W1c v (its bias is the
    head's); head: (M [2D, D], b [2D]), proj . v_proj . decoder[0]'s e half as one affine map
    (None in training, which unfolds it); headed [B|1, U, 2D] or None: the candidates through the
    head, cand M^T, when the items hold it."""

    base: Tensor
    feats: tuple
    cand: Tensor
    dec: Tensor
    head: tuple
    headed: Tensor | None = None
    index: Tensor | None = None

    def rows(self, sl: slice) -> "Context":
        """The queries `sl` of this context (shared tables stay shared)."""
        pick = lambda x: x if x is None or x.shape[0] == 1 else x[sl]  # noqa: E731
        return Context(pick(self.base), tuple(pick(f) for f in self.feats), pick(self.cand), pick(self.dec),
                       self.head, pick(self.headed), None if self.index is None else self.index[sl])


class _Denoiser(nn.Module):
    """Shared layers (names match the released checkpoint) and the per-step formula."""

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

    # ---------------------------------------------------------------- shared pieces of the algebra
    def _first_layer(self, x: Tensor) -> Tensor:
        """decoder[0]'s candidate half W1c x, without its bias (that is in the head's): [..., D] -> [..., 2D]."""
        return x @ self.decoder[0].weight[:, self.width:].t()

    def _head(self) -> tuple[Tensor, Tensor]:
        """decoder[0]'s e-half after proj after v_proj as one affine map, with decoder[0]'s bias:
        (M [2D, D], b [2D]), W1e proj(v_proj(x)) + b1 = (W1e P V) x + W1e b_P + b1. Without
        gradients it is kept until a weight changes."""
        if torch.is_grad_enabled():
            return self._compute_head()
        weights = (self.decoder[0].weight, self.decoder[0].bias, self.proj.weight, self.proj.bias, self.v_proj.weight)
        key = tuple((w.data_ptr(), w._version, w.dtype) for w in weights)
        cached = self.__dict__.get("_head_cache")
        if cached is None or cached[0] != key:
            cached = self._head_cache = (key, self._compute_head())
        return cached[1]

    def _compute_head(self) -> tuple[Tensor, Tensor]:
        w1e = self.decoder[0].weight[:, : self.width]
        return w1e @ self.proj.weight @ self.v_proj.weight, w1e @ self.proj.bias + self.decoder[0].bias

    def _time_terms(self, t: Tensor, head) -> tuple[tuple, Tensor]:
        """t LongTensor [S] -> (step vectors, each [S, D]; the time embedding's share of the head input [S, 2D])."""
        c = self.embed_timestep(t)
        m, b = head
        return self._step_vectors(c), c @ m.t() + b

    def _sampling_terms(self, timesteps: tuple, device, head) -> tuple[tuple, Tensor]:
        """`_time_terms` of a sampler's timesteps, kept (like the head) until a weight changes: every
        block of queries shares them (recomputing them per block cost ~1 ms each)."""
        key = (timesteps, str(device), tuple((p.data_ptr(), p._version) for p in self.parameters()))
        cached = self.__dict__.get("_terms_cache")
        if torch.is_grad_enabled() or cached is None or cached[0] != key:
            tt = torch.as_tensor(timesteps, dtype=torch.long, device=device)
            cached = (key, self._time_terms(tt, head))
            if not torch.is_grad_enabled():
                self._terms_cache = cached
        return cached[1]

    def _head_chain(self, x: Tensor) -> Tensor:
        """The head input unfolded, W1e proj(v_proj(x)) + b1: [B, D] -> [B, 2D]. Cheaper than
        folding the head (4 D^3 multiply-adds) when it runs on fewer than D rows once (training)."""
        return nn.functional.linear(self.proj(self.v_proj(x)), self.decoder[0].weight[:, :self.width],
                                    self.decoder[0].bias)

    def _predict(self, ctx: Context, x_t: Tensor, logits: Tensor, hb: Tensor | None = None, vm: Tensor | None = None,
                 out: Tensor | None = None, c: Tensor | None = None) -> Tensor:
        """The per-step formula: logits [B|1, U] (all but x_t) -> x0_hat [B, K].

        w = softmax(logits + x_t); head input he = W1e proj(v_proj(sum_k w_k cand_k + c)) + b1, as
        the folded head (M pooled + hb, hb [B|1, 2D] its time share; vm = cand M^T precomputed when
        cheaper) or, given c [B|1, D], as the chain; x0_hat = relu(dec + he) . w2 + b2 + w. With an
        index the weights are summed per slot and relu(dec + he) . w2 is computed once a slot."""
        lin2 = self.decoder[2]
        if ctx.index is None:
            w = torch.softmax(logits + x_t, dim=-1)
            slot_w = w
        else:
            w = torch.softmax(logits.expand(x_t.shape[0], -1).gather(1, ctx.index) + x_t, dim=-1)
            slot_w = torch.zeros(w.shape[0], ctx.dec.shape[1], dtype=w.dtype, device=w.device).scatter_add(
                1, ctx.index, w)
        if c is not None:
            he = self._head_chain(_pool(slot_w, ctx.cand) + c)
        elif vm is not None:
            he = _pool(slot_w, vm) + hb
        else:
            he = torch.addmm(hb, _pool(slot_w, ctx.cand), ctx.head[0].t())
        if ctx.index is None:
            return add_relu_dot(ctx.dec, he, lin2.weight[0], lin2.bias, w, out=out)
        return add_relu_dot(ctx.dec, he, lin2.weight[0], lin2.bias, None, out=out).gather(1, ctx.index) + w

    # ---------------------------------------------------------------- public fast path
    def denoise(self, x_t: Tensor, t, ctx: Context) -> Tensor:
        """x_t [B, K], t LongTensor [B] (or int, or stride-0) -> x0_hat [B, K]; differentiable."""
        c = self.embed_timestep(_timestep(t, x_t.device))  # [B or 1, D]
        logits = ctx.base + sum(_rowdot(f, gi) for f, gi in zip(ctx.feats, self._step_vectors(c)))
        if torch.is_grad_enabled():  # training: B rows once, the unfolded head is cheaper
            return self._predict(ctx, x_t, logits, c=c)
        m, b = ctx.head
        return self._predict(ctx, x_t, logits, c @ m.t() + b)

    def sampling(self, ctx: Context, timesteps: list[int]):
        """predict(i, x_t [B, K]) -> x0_hat at timesteps[i], everything that no x_t changes
        precomputed: every step's logits but x_t ([S, B, U], one product), the head input's time
        share, the candidates through the head when U <= 2 S, one [B, U, 2D] scratch buffer."""
        if ctx.head is None:
            ctx = replace(ctx, head=self._head())
        g, hb = self._sampling_terms(tuple(timesteps), ctx.base.device, ctx.head)
        logits = ctx.base.unsqueeze(-1) + sum(f @ gi.t() for f, gi in zip(ctx.feats, g))  # [B|1, U, S]
        B = max(x.shape[0] for x in (ctx.base, ctx.dec, *ctx.feats))
        U = ctx.dec.shape[1]
        logits = logits.expand(B, U, -1).permute(2, 0, 1).contiguous()
        vm = ctx.headed if ctx.headed is not None else ctx.cand @ ctx.head[0].t() if U <= 2 * len(timesteps) else None
        scratch = torch.empty((B, U, ctx.dec.shape[-1]), dtype=ctx.dec.dtype, device=ctx.dec.device)
        return lambda i, x_t: self._predict(ctx, x_t, logits[i], hb[i:i + 1], vm, scratch)

    def pairs(self, query: Tensor, query_mask: Tensor | None, gallery: Tensor, gallery_mask: Tensor | None,
              index: Tensor, dense: bool | None = None) -> Context:
        """Context of the pairs (query b, gallery row index[b, k]): the distinct rows' items are built
        once (training's in-batch candidates are the batch's own few items)."""
        uniq, inv = torch.unique(index, return_inverse=True)
        items = self.items(gallery[uniq], None if gallery_mask is None else gallery_mask[uniq], index.numel(),
                           None if dense else index.shape[1] if dense is None else 0)
        return self.context(query, query_mask, items, inv, dense)


class T2VDenoiser(_Denoiser):
    """Text query, K candidate videos: text [B,D], frames [B,K,F,D], frame_mask [B,K,F] (1 valid)."""

    direction = "t2v"

    def reference_pairs(self, x_t, t, text: Tensor, query_mask, frames: Tensor, frame_mask: Tensor, index: Tensor):
        """reference_forward over the pairs (query b, gallery video index[b, k]): frames [U, F, D]."""
        return self.reference_forward(x_t, t, text, frames[index], frame_mask[index])

    def _step_vectors(self, c: Tensor) -> tuple:
        return (self.q_proj(c) @ self.k_proj.weight,)  # logit_k = v_k . Wk^T Wq (text + c) + const

    def items(self, frames: Tensor, frame_mask: Tensor, pairs: int | None = None, k: int | None = None) -> Items:
        """frames [U, F, D], frame_mask [U, F]; pairs: how many (query, candidate) pairs will read them
        (None: many); k: candidates per query (None: all U). The frames go through the first layer
        once (the factored layer) when the context will attend densely (k None or U <= 2 k: pairs
        per-pair gathers of [F, 2D] projections cost more memory traffic than they save), when that is
        fewer multiply-adds (U F <= pairs) and when it fits PROJ_BUDGET."""
        U, F_, D = frames.shape
        factor = (k is None or U <= 2 * k) and (pairs is None or U * F_ <= pairs) and \
            U * F_ * 2 * D * frames.element_size() <= PROJ_BUDGET
        return Items(frames, frame_mask, self._first_layer(frames) if factor else None)

    def context(self, text: Tensor, query_mask, items: Items, index: Tensor | None = None,
                dense: bool | None = None) -> Context:
        """text [B, D] against items' videos index [B, K] (None: all U, shared). dense: attend over
        all U items then pick (True), or gather each pair's frames (False); None: dense if U <= 2 K."""
        frames, mask, proj = items.tokens, items.mask.to(items.tokens.dtype), items.proj
        U = frames.shape[0]
        if index is None or (dense if dense is not None else U <= 2 * index.shape[1]):
            a = torch.softmax(torch.einsum("bd,ufd->buf", text, frames) / self.temp, dim=-1) * mask
            a = a.transpose(0, 1)  # [U, B, F]: per video, one [B, F] x [F, .] product
            v = torch.bmm(a, frames).transpose(0, 1)  # [B, U, D] (a view)
            dec = self._first_layer(v) if proj is None else torch.bmm(a, proj).transpose(0, 1)
        else:  # per pair (few pairs a video): the pooled video through the first layer
            fr = _rows(frames, index)  # [B, K, F, D]
            a = torch.softmax(torch.einsum("bd,bkfd->bkf", text, fr) / self.temp, dim=-1) * _rows(mask, index)
            v = torch.einsum("bkf,bkfd->bkd", a, fr)
            dec = self._first_layer(v)
            index = None
        base = _rowdot(v, self.q_proj(text) @ self.k_proj.weight)
        return Context(base, (v,), v, dec, None if torch.is_grad_enabled() else self._head(), None, index)

    def prepare(self, text: Tensor, frames: Tensor, frame_mask: Tensor) -> Context:
        """Context of per-query candidates: text [B,D], frames [B,K,F,D], frame_mask [B,K,F]."""
        B, K = frames.shape[:2]
        items = self.items(frames.reshape(B * K, *frames.shape[2:]), frame_mask.reshape(B * K, -1), B * K)
        return self.context(text, None, items, torch.arange(B * K, device=text.device).view(B, K), dense=False)

    def prepare_shared(self, text: Tensor, frames: Tensor, frame_mask: Tensor) -> Context:
        """Context when all B queries share one gallery: text [B,D], frames [K,F,D], frame_mask [K,F]."""
        return self.context(text, None, self.items(frames, frame_mask, text.shape[0] * frames.shape[0]))

    def forward(self, x_t: Tensor, t, text: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """x0_hat [B,K] = denoise(x_t, t, prepare(text, frames, frame_mask))."""
        return self.denoise(x_t, t, self.prepare(text, frames, frame_mask))

    def reference_forward(self, x_t: Tensor, t, text: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """The released formula written out plainly (the reference every fast path is tested against)."""
        c = self.embed_timestep(_timestep(t, x_t.device).expand(x_t.shape[0]))
        a = torch.softmax(torch.einsum("bd,bkfd->bkf", text, frames) / self.temp, dim=-1)
        v = torch.einsum("bkf,bkfd->bkd", a * frame_mask.to(a.dtype), frames)
        q = self.q_proj(text + c)
        k, val = self.k_proj(v + c.unsqueeze(1)), self.v_proj(v + c.unsqueeze(1))
        w = torch.softmax(torch.einsum("bd,bkd->bk", q, k) + x_t, dim=-1)
        e = self.proj(torch.einsum("bk,bkd->bd", w, val))
        emb = torch.cat([e.unsqueeze(1).expand(-1, v.shape[1], -1), v], dim=-1)
        return self.decoder(emb).squeeze(-1) + w


class V2TDenoiser(_Denoiser):
    """Video query, K candidate texts: texts [B,K,D], frames [B,F,D], frame_mask [B,F] (1 valid)."""

    direction = "v2t"

    def reference_pairs(self, x_t, t, frames: Tensor, frame_mask: Tensor, texts: Tensor, mask, index: Tensor):
        """reference_forward over the pairs (query video b, gallery text index[b, k]): texts [U, D]."""
        return self.reference_forward(x_t, t, texts[index], frames, frame_mask)

    def _step_vectors(self, c: Tensor) -> tuple:
        # (Wq(u + c)) . (Wk(s + c)) = u^T Wq^T Wk s + u . Wq^T Wk c + s . Wk^T Wq c + const
        return self.k_proj(c) @ self.q_proj.weight, self.q_proj(c) @ self.k_proj.weight

    def items(self, texts: Tensor, mask=None, pairs: int | None = None, k: int | None = None) -> Items:
        """texts [U, D]: their first-layer share (+ bias) and key side Wq^T Wk text, once a text."""
        headed = None if torch.is_grad_enabled() else texts @ self._head()[0].t()
        return Items(texts, None, self._first_layer(texts), self.k_proj(texts) @ self.q_proj.weight, headed)

    def context(self, frames: Tensor, frame_mask: Tensor, items: Items, index: Tensor | None = None,
                dense: bool | None = None) -> Context:
        """Query videos frames [B, F, D], frame_mask [B, F] against items' texts index [B, K] (None:
        all U, shared). Each text attends over the query's frames: u_k = sum_f a_kf frame_f."""
        mask = frame_mask.to(frames.dtype).unsqueeze(1)
        U = items.tokens.shape[0]
        shared = index is None or (dense if dense is not None else U <= 2 * index.shape[1])
        pick = (lambda x: None if x is None else x[None]) if shared else \
            (lambda x: None if x is None else _rows(x, index))  # noqa: E731
        texts, dec, keys, headed = pick(items.tokens), pick(items.proj), pick(items.keys), pick(items.headed)
        if shared:  # every text of the items against every query: the text tables stay shared
            a = torch.einsum("ud,bfd->buf", items.tokens, frames)
        else:
            a = torch.einsum("bkd,bfd->bkf", texts, frames)
            index = None
        u = torch.einsum("bkf,bfd->bkd", torch.softmax(a / self.temp, dim=-1) * mask, frames)
        base = (u * keys).sum(-1)
        return Context(base, (u, texts), texts, dec, None if torch.is_grad_enabled() else self._head(), headed, index)

    def prepare(self, texts: Tensor, frames: Tensor, frame_mask: Tensor) -> Context:
        """Context of per-query candidates: texts [B,K,D], frames [B,F,D], frame_mask [B,F]."""
        B, K = texts.shape[:2]
        idx = torch.arange(B * K, device=texts.device).view(B, K)
        return self.context(frames, frame_mask, self.items(texts.reshape(B * K, -1)), idx)

    def prepare_shared(self, texts: Tensor, frames: Tensor, frame_mask: Tensor) -> Context:
        """Context when all B query videos share one gallery of K texts: texts [K,D], frames [B,F,D]."""
        return self.context(frames, frame_mask, self.items(texts))

    def forward(self, x_t: Tensor, t, texts: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """x0_hat [B,K] = denoise(x_t, t, prepare(texts, frames, frame_mask))."""
        return self.denoise(x_t, t, self.prepare(texts, frames, frame_mask))

    def reference_forward(self, x_t: Tensor, t, texts: Tensor, frames: Tensor, frame_mask: Tensor) -> Tensor:
        """The released formula written out plainly (the reference every fast path is tested against)."""
        c = self.embed_timestep(_timestep(t, x_t.device).expand(x_t.shape[0]))
        a = torch.softmax(torch.einsum("bkd,bfd->bkf", texts, frames) / self.temp, dim=-1)
        u = torch.einsum("bkf,bfd->bkd", a * frame_mask.to(a.dtype).unsqueeze(1), frames)
        q = self.q_proj(u + c.unsqueeze(1))
        k, val = self.k_proj(texts + c.unsqueeze(1)), self.v_proj(texts + c.unsqueeze(1))
        w = torch.softmax(torch.einsum("bkd,bkd->bk", q, k) + x_t, dim=-1)
        e = self.proj(torch.einsum("bk,bkd->bd", w, val))
        emb = torch.cat([e.unsqueeze(1).expand(-1, texts.shape[1], -1), texts], dim=-1)
        return self.decoder(emb).squeeze(-1) + w
