"""Streamed evaluation: the metrics of every row without the [Nt, Nv] score matrix.

`diffret evaluate` keeps S (and a matrix per row and direction) in memory while that fits the
memory budget (`in_memory_bytes`); past it, this module computes the same metrics from blocks of
captions (rows of S), holding O(N K) state plus one block (and, on multi-caption sets, one byte per
query video and video of several captions, below) besides the features, instead of O(Nt Nv).

Pass 1, per caption block S_b [b, Nv] (the scores are bit for bit those of the in-memory matrix):
  * t2v, `discriminative` and `qbnorm`: the ground-truth score and the number of other videos at
    or above it (the rank; QB-Norm's per-video normalisers are known first, from the bank);
  * the generator's candidates: each caption's top-K videos; each video's top-K captions, merged
    block by block;
  * per video: the running logsumexp over captions (DSL t2v normalises over the query axis) and the
    running best caption (QB-Norm v2t applies to a video whose top-1 caption is active).
Then the generator re-scores every query's top K (the bonus only needs those), and every v2t
query's own-video score is known for every row: the max over its captions of the row's v2t scores
(the diffusion row's from the re-scored entries of its own captions).
Pass 2 recomputes the blocks, re-scores their entries as the in-memory matrices have them, and
counts: t2v ranks of `diffusion` and `dsl`; v2t ranks of every row, by the multi-caption protocol
(metrics.py): for query video q, the other videos with a caption scoring at or above q's own-video
score (their max over captions is then at or above it). A video of one caption is counted through
that caption; the videos of several captions keep one bool per (query video, video) (MSRVTT full:
2,990 x 2,990, 9 MB a row), in sweeps of pass 2 over slices of them when that is over the budget.
"""
from __future__ import annotations

from itertools import islice

import torch

from diffret.cache.wti import WTIGallery
from diffret.generator.rerank import generate

from .metrics import both_directions, check_no_nan
from .revisers import dual_softmax, qb_norm

DEFAULT_MEMORY_BUDGET = 2 << 30  # bytes of score matrices `evaluate` may hold before it streams


def in_memory_bytes(nt: int, nv: int, generate_rows: bool, dsl: bool, qb: bool) -> int:
    """Bytes the in-memory evaluation needs at its peak for Nt x Nv: S and its transposed copy,
    the diffusion matrices, DSL and QB-Norm matrices (float32) with their float64 working copies
    (the metrics work on chunks of queries)."""
    mats = 2 + (3 if generate_rows else 0) + (2 if dsl else 0) + (2 if qb else 0)
    return nt * nv * (4 * mats + (16 if dsl or qb else 0))


def block_captions(nv: int, budget: int, revisers: bool, generate_rows: bool = False) -> int:
    """Captions per streamed block: the block and its working copies within a quarter of the budget."""
    per_caption = nv * ((48 if revisers else 16) + (8 if generate_rows else 0))
    return max(1, budget // 4 // max(1, per_caption))


def check_streamable(opts, nt: int, nv: int, generate_rows: bool) -> None:
    """Refuse (ValueError, one line) what streaming cannot do: re-rank whole rows."""
    if not generate_rows:
        return
    k = opts.top_k
    if k is None or k >= nv or k >= nt:
        raise ValueError(f"--top-k {'all' if k is None else k} re-ranks whole rows of the {nt} x {nv} score matrix, "
                         "which is over the memory budget; pass a --top-k below both sizes")


def _merge_topk(vals, idx, new_vals, new_idx, k):
    """Running top-k along dim 1: [n, k] (+) [n, m] -> [n, k], sorted descending."""
    v = torch.cat([vals, new_vals], 1)
    top = v.topk(min(k, v.shape[1]), dim=1)
    return top.values, torch.cat([idx, new_idx], 1).gather(1, top.indices)


class _CaptionGroups:
    """Which caption columns the v2t counts track how: caption_video [Nt] -> per caption, whether it
    is its video's only caption (`single`), else its video's slot among the videos of several
    captions (`slot`, -1 for single ones; `n_multi` slots)."""

    def __init__(self, caption_video: torch.Tensor, n_videos: int):
        counts = torch.bincount(caption_video, minlength=n_videos)
        self.single = counts[caption_video] == 1
        multi = counts >= 2
        slot = torch.full((n_videos,), -1, dtype=torch.long)
        slot[multi] = torch.arange(int(multi.sum()))
        self.slot, self.n_multi = slot[caption_video], int(multi.sum())

    def columns(self, rows: torch.Tensor, lo: int, hi: int) -> dict:
        """A block's caption columns `rows` [b] for a sweep over slots [lo, hi)."""
        sl = self.slot[rows]
        sel = (sl >= lo) & (sl < hi)
        return {"single": self.single[rows], "sel": sel, "idx": sl[sel] - lo}


class _OtherVideos:
    """v2t counts of one row in one sweep: for each query video q, the other videos with a caption c
    where y[q, c] >= theta[q] (theta: q's own-video score), over blocks of caption columns."""

    def __init__(self, theta: torch.Tensor, width: int, first: bool):
        self.theta, self.first = theta, first  # first sweep: also counts the videos of one caption
        self.count = torch.zeros(len(theta), dtype=torch.long)
        self.seen = torch.zeros(len(theta), width, dtype=torch.bool)  # [Nv, slots of this sweep]

    def add(self, y: torch.Tensor, other: torch.Tensor, cols: dict) -> None:
        """y [Nv, b] this row's v2t scores of the block; other [Nv, b] bool: caption not of the query video."""
        check_no_nan(y)
        hits = (y >= self.theta[:, None]) & other
        if self.first:
            self.count += hits[:, cols["single"]].sum(1)
        if len(cols["idx"]):
            self.seen.scatter_reduce_(1, cols["idx"].expand(len(y), -1), hits[:, cols["sel"]], "amax")

    def total(self) -> torch.Tensor:
        return self.count + self.seen.sum(1)


@torch.inference_mode()
def streamed_metrics(f, opts, device, gen=None, smp=None, banks=None, logit_scale: float = 100.0,
                     budget: int = DEFAULT_MEMORY_BUDGET, block: int | None = None, max_blocks: int | None = None,
                     progress=None) -> tuple[dict, dict]:
    """-> ({row: {"t2v", "v2t", "Rsum"}}, info) for f: SplitFeatures, as `evaluate` reports them.

    gen: the Generator (its denoisers re-score) or None; smp: its sampler; banks: {"t2v", "v2t"}
    QueryBanks (QB-Norm) or None. block: captions per block (None: from `budget`). max_blocks: stop
    each pass after that many blocks (memory measurements only: the metrics are then those of a
    partial pass).
    """
    nt, nv = len(f.caption_id), len(f.video_id)
    cv = f.caption_video.long()
    dsl, qb = opts.dsl, banks is not None
    k = opts.top_k
    check_streamable(opts, nt, nv, gen is not None)
    gallery = WTIGallery(f.frames, f.frame_mask, f.frame_logits, device=device, padding=f.wti_padding)
    block = block or block_captions(nv, budget, dsl or qb, gen is not None)
    neg = lambda n: torch.full((n,), float("-inf"))  # noqa: E731
    gt = torch.empty(nt)  # S[t, cv[t]]
    count = {"discriminative": torch.zeros(nt, dtype=torch.long)}  # t2v: other videos at or above the right one
    theta = {}  # row -> [Nv] v2t score of each query video's own video (the max over its captions)
    if qb:
        count["qbnorm"] = torch.zeros(nt, dtype=torch.long)
        col_max, col_arg = neg(nv), torch.full((nv,), nt, dtype=torch.long)
    if dsl:
        count["dsl"] = torch.zeros(nt, dtype=torch.long)
        col_lse = torch.full((nv,), float("-inf"), dtype=torch.float64)
        dsl_gt_v2t = torch.empty(nt)
    if gen is not None:
        count["diffusion"] = torch.zeros(nt, dtype=torch.long)
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

    def t2v_count(x, c):  # x [b, Nv] a row's t2v scores, c [b] right columns -> other videos at or above
        check_no_nan(x)
        return (x >= x.gather(1, c[:, None])).sum(1) - 1

    seen_rows = []
    for rows, s in blocks("stage-1 scores, pass 1"):
        seen_rows.append(rows)
        c = cv[rows]
        gt[rows] = s.gather(1, c[:, None]).squeeze(1)
        count["discriminative"][rows] = t2v_count(s, c)
        if gen is not None:
            top = s.topk(k, dim=1)
            t_vals[rows], t_idx[rows] = top.values, top.indices
            col = s.t().topk(min(k, len(rows)), dim=1)
            v_vals, v_idx = _merge_topk(v_vals, v_idx, col.values, rows[col.indices], k)
        if qb:
            count["qbnorm"][rows] = t2v_count(qb_norm(s, banks["t2v"]), c)
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
    own_max = lambda per_caption: neg(nv).scatter_reduce(0, cv, per_caption, "amax")  # noqa: E731
    theta["discriminative"] = own_max(gt)
    if dsl:
        theta["dsl"] = own_max(dsl_gt_v2t)
    if qb:
        apply = banks["v2t"].active[col_arg.clamp(max=nt - 1)]  # [Nv]: the video's top-1 caption is active
        lse_t = banks["v2t"].lse  # [Nt] per-caption normaliser of the v2t bank
        theta["qbnorm"] = own_max(torch.where(apply[cv], banks["v2t"].beta * gt.double() - lse_t, gt.double()).float())

    if gen is not None:  # re-score every query's top K; pass 2 counts on the re-scored entries
        m_t2v, m_v2t = gen.t2v, gen.v2t
        common = dict(alpha=opts.alpha, temp=opts.temp, seed=opts.seed, device=device, progress=progress)
        t_bonus, v_bonus = torch.zeros_like(t_vals), torch.zeros_like(v_vals)
        if max_blocks is not None:  # partial pass (memory measurement): generate for the rows seen, no metrics
            seen = torch.cat(seen_rows) if seen_rows else torch.zeros(0, dtype=torch.long)
            t_bonus[seen] = generate(m_t2v, f.sentence[seen], None, f.frames, f.frame_mask, smp, t_idx[seen], **common)
            nvq = min(nv, len(seen))
            v_bonus[:nvq] = generate(m_v2t, f.frames[:nvq], f.frame_mask[:nvq], f.sentence, None, smp, v_idx[:nvq],
                                     **common)
        else:
            t_bonus = generate(m_t2v, f.sentence, None, f.frames, f.frame_mask, smp, t_idx, **common)
            v_bonus = generate(m_v2t, f.frames, f.frame_mask, f.sentence, None, smp, v_idx, **common)
        t_new, v_new = t_vals + t_bonus, v_vals + v_bonus  # as rerank writes them
        own = cv[v_idx] == ar[:, None]  # [Nv, K]: re-scored entries of the query video's own captions
        final = gt.clone()  # each caption's v2t score against its own video, re-scored where in its top K
        final[v_idx[own]] = v_new[own]
        theta["diffusion"] = own_max(final)

    # pass 2: v2t counts of every row (videos of several captions in sweeps within the budget), and
    # the t2v counts that need the whole pass 1 (DSL's normalisers, the re-scored entries)
    groups = _CaptionGroups(cv, nv)
    width = max(1, budget // 4 // max(1, len(theta) * nv))
    sweeps = [(lo, min(lo + width, groups.n_multi)) for lo in range(0, groups.n_multi, width)] or [(0, 0)]
    info = {"streamed": True, "block_captions": block, "v2t_sweeps": len(sweeps),
            "v2t_state_bytes": len(theta) * nv * (sweeps[0][1] - sweeps[0][0])}
    v_count = {row: torch.zeros(nv, dtype=torch.long) for row in theta}
    for i, (lo, hi) in enumerate(sweeps):
        counters = {row: _OtherVideos(th, hi - lo, first=i == 0) for row, th in theta.items()}
        name = "stage-1 scores, pass 2" + (f" ({i + 1}/{len(sweeps)})" if len(sweeps) > 1 else "")
        for rows, s in blocks(name):
            st = s.t()  # [Nv, b]: v2t rows
            cols = groups.columns(rows, lo, hi)
            other = cv[rows][None, :] != ar[:, None]  # [Nv, b]: captions of other videos
            counters["discriminative"].add(st, other, cols)
            if gen is not None:
                if i == 0:
                    count["diffusion"][rows] = t2v_count(s.clone().scatter_(1, t_idx[rows], t_new[rows]), cv[rows])
                pos = torch.full((nt,), -1, dtype=torch.long)
                pos[rows] = torch.arange(len(rows))
                p = pos[v_idx]  # [Nv, K]: each re-scored entry's column in this block (-1: another block)
                hit = p >= 0
                y = st.clone()
                y[ar[:, None].expand_as(p)[hit], p[hit]] = v_new[hit]
                counters["diffusion"].add(y, other, cols)
            if dsl:
                if i == 0:
                    z = s.double() * logit_scale
                    r = (z * torch.exp(z / opts.dsl_temp - col_lse[None])).float()  # dual_softmax(S) rows
                    count["dsl"][rows] = t2v_count(r, cv[rows])
                counters["dsl"].add(dual_softmax(st, opts.dsl_temp, logit_scale), other, cols)
            if qb:
                sd = st.double()
                r = torch.where(apply[:, None], banks["v2t"].beta * sd - lse_t[rows][None], sd).float()
                counters["qbnorm"].add(r, other, cols)
        for row, ctr in counters.items():
            v_count[row] += ctr.total()
        del counters

    out = {}
    for row in ("discriminative", "diffusion", "dsl", "qbnorm"):
        if row in count and not (row == "diffusion" and max_blocks is not None):
            out[row] = both_directions(count[row] + 1, v_count[row][has] + 1)
    return out, info
