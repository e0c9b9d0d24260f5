"""Streamed evaluation: the metrics of every row without the [Nt, Nv] score matrix.

`diffret evaluate` keeps S (and a matrix per row and direction) in memory while that fits the
memory budget (`in_memory_bytes`); past it, this module computes the same metrics from blocks of
captions (rows of S), holding O(N K) state plus one block: O(N K + block Nv) memory besides the
features, instead of O(Nt Nv).

Pass 1, per caption block S_b [b, Nv] (the scores are bit for bit those of the in-memory matrix):
  * t2v, every row: the ground-truth score and the number of videos strictly above it (the rank),
    for `qbnorm` from the block's QB-Norm rows (the bank's per-video normalisers are known first);
  * the generator's candidates: each caption's top-K videos; each video's top-K captions, merged
    block by block;
  * per video: the running logsumexp over captions (DSL t2v normalises over the query axis) and the
    running best caption (QB-Norm v2t applies to a video whose top-1 caption is active).
Between the passes every v2t query's best ground-truth value is known for every row (a video's
ground-truth scores are its captions' t2v ground-truth scores). Pass 2 recomputes the blocks and
counts, per video, the captions above that value (v2t ranks), and the DSL t2v ranks.

Diffusion rows. Generation needs only each query's top-K. With alpha >= 0 the bonus
alpha * softmax(...) is >= 0, so every re-scored entry ends at or above its old value, hence at or
above every untouched entry; a rank then follows from the original rank and the re-scored top-K:
  best ground truth re-scored (some ground truth in the top-K): 1 + #{top-K entries above it};
  otherwise: 1 + #{untouched above it} + #{top-K above it}
           = 1 + (original count - #{top-K originally above}) + #{top-K re-scored above}.
"""
from __future__ import annotations

from itertools import islice

import torch

from diffret.cache.wti import WTIGallery
from diffret.generator.rerank import generate

from .metrics import recall_metrics
from .revisers import dual_softmax, qb_norm

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of score matrices `evaluate` may hold before it streams


def in_memory_bytes(nt: int, nv: int, generate_rows: bool, dsl: bool, qb: bool) -> int:
    """Bytes the in-memory evaluation needs at its peak for Nt x Nv: S and its transposed copy,
    the diffusion matrices, DSL and QB-Norm matrices (float32) with their float64 working copies,
    and the metrics' boolean ground-truth mask."""
    mats = 2 + (3 if generate_rows else 0) + (2 if dsl else 0) + (2 if qb else 0)
    return nt * nv * (4 * mats + (16 if dsl or qb else 0) + 1)


def block_captions(nv: int, budget: int, revisers: bool) -> int:
    """Captions per streamed block: the block and its working copies within a quarter of the budget."""
    per_caption = nv * (48 if revisers else 16)
    return max(1, budget // 4 // max(1, per_caption))


def check_streamable(opts, nt: int, nv: int, generate_rows: bool) -> None:
    """Refuse (ValueError, one line) what streaming cannot do: re-rank whole rows, or alpha < 0
    (the rank argument above needs a bonus >= 0)."""
    if not generate_rows:
        return
    k = opts.top_k
    if k is None or k >= nv or k >= nt:
        raise ValueError(f"--top-k {'all' if k is None else k} re-ranks whole rows of the {nt} x {nv} score matrix, "
                         "which is over the memory budget; pass a --top-k below both sizes")
    if opts.alpha < 0:
        raise ValueError(f"streamed evaluation needs --alpha >= 0 (re-ranked entries may only rise), got {opts.alpha}")


def _ranks(count: torch.Tensor) -> torch.Tensor:
    return count.long() + 1


def _merge_topk(vals, idx, new_vals, new_idx, k):
    """Running top-k along dim 1: [n, k] (+) [n, m] -> [n, k], sorted descending."""
    v = torch.cat([vals, new_vals], 1)
    top = v.topk(min(k, v.shape[1]), dim=1)
    return top.values, torch.cat([idx, new_idx], 1).gather(1, top.indices)


def _diffusion_ranks(top_vals, top_idx, bonus, gt_rows, gt_vals, count):
    """Ranks after re-ranking each query's top-K, without the matrix.

    top_vals/top_idx [Nq, K] (sorted), bonus [Nq, K] >= 0, gt_rows: list of (query rows [g],
    candidate columns [g]) pairs giving every ground truth, gt_vals [g] their stage-1 scores,
    count [Nq] stage-1 count of candidates above the best ground truth."""
    new = top_vals + bonus
    nq = len(top_vals)
    q, c = gt_rows
    # each ground truth's final score: re-scored when it is in its query's top-K
    hit = top_idx[q] == c[:, None]  # [g, K]
    in_top = hit.any(1)
    final = torch.where(in_top, new[q].gather(1, hit.long().argmax(1, keepdim=True)).squeeze(1), gt_vals)
    best = torch.full((nq,), float("-inf")).scatter_reduce(0, q, final, "amax")
    best_s = torch.full((nq,), float("-inf")).scatter_reduce(0, q, gt_vals, "amax")
    any_top = torch.zeros(nq, dtype=torch.bool).index_put_((q,), in_top, accumulate=True)
    above_new = (new > best[:, None]).sum(1)
    untouched = count - (top_vals > best_s[:, None]).sum(1)
    return torch.where(any_top, above_new, untouched + above_new) + 1


@torch.inference_mode()
def streamed_metrics(f, opts, device, gen=None, smp=None, banks=None, logit_scale: float = 100.0,
                     budget: int = DEFAULT_MEMORY_BUDGET, block: int | None = None, max_blocks: int | None = None,
                     progress=None) -> tuple[dict, dict]:
    """-> ({row: {"t2v", "v2t", "Rsum"}}, info) for f: SplitFeatures, as `evaluate` reports them.

    gen: (cfg, t2v, v2t, meta) or None; smp: its sampler; banks: {"t2v", "v2t"} QueryBanks (QB-Norm)
    or None. block: captions per block (None: from `budget`). max_blocks: stop each pass after that
    many blocks (memory measurements only: the metrics are then those of a partial pass).
    """
    nt, nv = len(f.caption_id), len(f.video_id)
    cv = f.caption_video.long()
    dsl, qb = opts.dsl, banks is not None
    k = opts.top_k
    check_streamable(opts, nt, nv, gen is not None)
    gallery = WTIGallery(f.frames, f.frame_mask, f.frame_logits, device=device)
    block = block or block_captions(nv, budget, dsl or qb)
    info = {"streamed": True, "block_captions": block}
    neg = lambda n: torch.full((n,), float("-inf"))  # noqa: E731
    gt = torch.empty(nt)  # S[t, cv[t]]
    count = {"discriminative": torch.zeros(nt, dtype=torch.long)}
    v_count = {"discriminative": torch.zeros(nv, dtype=torch.long)}
    v_best = {}  # row -> [Nv] best ground-truth value of each video in that row's v2t matrix
    if qb:
        count["qbnorm"], v_count["qbnorm"] = torch.zeros(nt, dtype=torch.long), torch.zeros(nv, dtype=torch.long)
        col_max, col_arg = neg(nv), torch.full((nv,), nt, dtype=torch.long)
    if dsl:
        count["dsl"], v_count["dsl"] = torch.zeros(nt, dtype=torch.long), torch.zeros(nv, dtype=torch.long)
        col_lse = torch.full((nv,), float("-inf"), dtype=torch.float64)
        dsl_gt_v2t = torch.empty(nt)
    if gen is not None:
        t_vals, t_idx = torch.empty(nt, k), torch.empty(nt, k, dtype=torch.long)
        v_vals, v_idx = torch.empty(nv, 0), torch.empty(nv, 0, dtype=torch.long)
    ar = torch.arange(nv)

    def blocks(name):
        task = progress.add_task(name, total=nt) if progress else None
        for rows, s in islice(gallery.blocks(f.words, f.word_mask, f.word_logits, block=block), max_blocks):
            yield rows, s.cpu()
            if progress:
                progress.update(task, advance=len(rows))
        if progress:
            progress.remove_task(task)

    seen_rows = []
    for rows, s in blocks("stage-1 scores, pass 1"):
        seen_rows.append(rows)
        c = cv[rows]
        g = s.gather(1, c[:, None]).squeeze(1)
        gt[rows] = g
        count["discriminative"][rows] = (s > g[:, None]).sum(1)
        if gen is not None:
            top = s.topk(k, dim=1)
            t_vals[rows], t_idx[rows] = top.values, top.indices
            col = s.t().topk(min(k, len(rows)), dim=1)
            v_vals, v_idx = _merge_topk(v_vals, v_idx, col.values, rows[col.indices], k)
        if qb:
            r = qb_norm(s, banks["t2v"])
            count["qbnorm"][rows] = (r > r.gather(1, c[:, None])).sum(1)
            m = s.amax(0)  # the first (lowest caption index) maximum of each column, as argmax has it
            first = torch.where(s == m[None], rows[:, None], nt).amin(0)
            better = (m > col_max) | ((m == col_max) & (first < col_arg))
            col_max, col_arg = torch.where(better, m, col_max), torch.where(better, first, col_arg)
        if dsl:
            z = s.double() * logit_scale
            col_lse = torch.logaddexp(col_lse, torch.logsumexp(z / opts.dsl_temp, dim=0))
            d = dual_softmax(s.t(), opts.dsl_temp, logit_scale)  # v2t rows: softmax over videos, per caption
            dsl_gt_v2t[rows] = d[c, torch.arange(len(rows))]
    has = torch.bincount(cv, minlength=nv) > 0
    v_best["discriminative"] = neg(nv).scatter_reduce(0, cv, gt, "amax")
    if dsl:
        v_best["dsl"] = neg(nv).scatter_reduce(0, cv, dsl_gt_v2t, "amax")
    if qb:
        apply = banks["v2t"].active[col_arg.clamp(max=nt - 1)]  # [Nv]: the video's top-1 caption is active
        lse_t = banks["v2t"].lse  # [Nt] per-caption normaliser of the v2t bank
        qgt = torch.where(apply[cv], banks["v2t"].beta * gt.double() - lse_t, gt.double()).float()
        v_best["qbnorm"] = neg(nv).scatter_reduce(0, cv, qgt, "amax")

    for rows, s in blocks("stage-1 scores, pass 2"):
        st = s.t()  # [Nv, b]: v2t rows
        v_count["discriminative"] += (st > v_best["discriminative"][:, None]).sum(1)
        if dsl:
            z = s.double() * logit_scale
            r = (z * torch.exp(z / opts.dsl_temp - col_lse[None])).float()  # dual_softmax(S) rows
            count["dsl"][rows] = (r > r.gather(1, cv[rows][:, None])).sum(1)
            v_count["dsl"] += (dual_softmax(st, opts.dsl_temp, logit_scale) > v_best["dsl"][:, None]).sum(1)
        if qb:
            sd = st.double()
            r = torch.where(apply[:, None], banks["v2t"].beta * sd - lse_t[rows][None], sd).float()
            v_count["qbnorm"] += (r > v_best["qbnorm"][:, None]).sum(1)

    results = {}
    for row in count:
        results[row] = (_ranks(count[row]), _ranks(v_count[row])[has])
    if gen is not None:
        cfg, m_t2v, m_v2t, _ = gen
        common = dict(alpha=opts.alpha, temp=opts.temp, seed=opts.seed, device=device, progress=progress)
        if max_blocks is not None:  # partial pass (memory measurement): generate for the rows seen, no metrics
            seen = torch.cat(seen_rows) if seen_rows else torch.zeros(0, dtype=torch.long)
            generate(m_t2v, f.sentence[seen], None, f.frames, f.frame_mask, smp, t_idx[seen], **common)
            nvq = min(nv, len(seen))
            generate(m_v2t, f.frames[:nvq], f.frame_mask[:nvq], f.sentence, None, smp, v_idx[:nvq], **common)
        else:
            t_bonus = generate(m_t2v, f.sentence, None, f.frames, f.frame_mask, smp, t_idx, **common)
            v_bonus = generate(m_v2t, f.frames, f.frame_mask, f.sentence, None, smp, v_idx, **common)
            caps = torch.arange(nt)
            r_t2v = _diffusion_ranks(t_vals, t_idx, t_bonus, (caps, cv), gt, count["discriminative"])
            r_v2t = _diffusion_ranks(v_vals, v_idx, v_bonus, (cv, caps), gt, v_count["discriminative"])
            results["diffusion"] = (r_t2v, r_v2t[has])
    out = {}
    for row in ("discriminative", "diffusion", "dsl", "qbnorm"):
        if row in results:
            m_t, m_v = (recall_metrics(r) for r in results[row])
            out[row] = {"t2v": m_t, "v2t": m_v, "Rsum": sum(d[x] for d in (m_t, m_v) for x in ("R@1", "R@5", "R@10"))}
    return out, info
