"""Weighted token-wise interaction (WTI): the stage-1 similarity that cached tokens define.

The cache stores word tokens, frame tokens and the similarity head's weight logits, so the
score of any caption against any video is a pure function of cached tensors. It lives beside
the cache (not in `extract/`) because the extractor's head, the generator's candidate ordering
and the evaluation all need exactly this function, and none of them may need CLIP to score.

    a = softmax over valid words of word_logits          b = softmax over valid frames of frame_logits
    t2v = sum_i a_i max_j cos(w_i, f_j)                  v2t = sum_j b_j max_i cos(w_i, f_j)
    S = (t2v + v2t) / 2

Padded pairs (a padded word or a padded frame slot) inside the maxima, by `padding`:

* "zero" (the default, the original's `get_similarity_logits`: the cosines are multiplied by the
  word and the frame masks before the maxima): a padded pair counts as 0. Each max runs over all
  L (F) slots of the padded tensors, so a word's max over the frames of a video with fewer valid
  frames than F slots includes 0, and a frame's max over the words of a caption with fewer valid
  words than L slots includes 0; with every slot valid it does not. The rules differ only where
  all valid cosines of a word (frame) are negative.
* "exclude": a padded pair never wins a max (the maxima run over valid partners only).

`wti_reduce` is the formula's one copy (padding rule, maxima, weighted sums): every path computes
its cosines its own way and hands them to it. `wti_similarity` is the differentiable full matrix
(training); generator/candidates.py `paired_wti` scores paired candidates (training candidates,
mined negatives); `WTIGallery` / `wti_similarity_chunked` compute the same numbers for evaluation
without building the [Nt, Nv, L, F] tensor:

* one matrix product per block. "zero": words [rows, D] x frames [D, cols] with every padded
  token a zero vector, so a padded pair's product is exactly 0; the maxima of the members that
  have a padded slot are then clamped at 0 (`_floor`), which makes the result that of all L x F
  slots whatever the block trims. "exclude": words [rows, D+2] x frames [D+2, cols], with the
  masks folded into two extra coordinates (word = [w, 1, wb], frame = [f, fb, 1], wb/fb = 0 valid,
  NEG padded), so the product is cos + fb + wb: exactly cos for valid pairs (the extra terms are
  exact zeros), very negative for padded ones. No masked_fill copy of a product is ever made;
* blocks sized to stay in the CPU's L2 cache (captions x words rows, frame-major videos x frames
  columns, so both maxima reduce over an outer axis);
* captions sorted by length and videos by frame count, each block trimmed to its longest member:
  padded positions cost no multiply-adds (about a third fewer on real caption lengths).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .blocks import run_blocks

NEG = -1e4  # stands in for -inf where a masked entry must lose a max
WTI_PADDINGS = ("zero", "exclude")  # a padded pair inside the maxima: counts as 0 (the original) | never wins

ROWS = 512  # CPU block: caption tokens (captions x words) per matrix product
COLS = 3072  # CPU block: video tokens (videos x frames) per matrix product; 512 x 3072 floats = 6 MiB


def check_padding(padding: str) -> str:
    """`padding` if it is a known WTI padding rule, else ValueError (one line)."""
    if padding not in WTI_PADDINGS:
        raise ValueError(f"unknown WTI padding rule {padding!r}; known: {', '.join(WTI_PADDINGS)}")
    return padding


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis restricted to `mask` (True = valid); [..., N] -> [..., N]."""
    logits = logits.float().masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def wti_reduce(cos: torch.Tensor, a: torch.Tensor, b: torch.Tensor, word_mask=None, frame_mask=None,
               padding: str = "zero", word_floor=None, frame_floor=None, word_dim: int = -2,
               frame_dim: int = -1, matmul: bool = False) -> torch.Tensor:
    """The formula's one copy: cosines of every (word, frame) pair -> S, (t2v + v2t) / 2.

    cos [..., L, F]: the words along `word_dim`, the frames along `frame_dim` (the blocked gallery's
    [t, L, F, v] passes 1 and 2), the other axes pair caption(s) with video(s). The other tensors
    broadcast against cos with size 1 on the axis they lack: word weights a and word_mask (bool,
    True = valid) [..., L, 1], frame weights b and frame_mask [..., 1, F]; word_floor against the
    maxima over the words [..., 1, F], frame_floor against those over the frames [..., L, 1] (or a
    float). -> S [...]: cos's shape without the two axes, float32.

    With masks, `padding` applies to them: "zero" sets a padded pair to 0, "exclude" keeps it out
    of the maxima (NEG). Without masks the padding is already in the cosines (the blocked gallery's
    zeroed tokens / folded mask coordinates); `word_floor` / `frame_floor` then clamp each max over
    the words (of a frame) / over the frames (of a word) from below, the 0 of the padded slots a
    trimmed block left out ("zero", see `_floor`).

    `matmul` (the blocked layout [t, L, F, v] only) sums over the words as one batched product
    [t, 1, L] x [t, L, v] instead of elementwise: the same sum in another rounding order, kept so
    that each path's scores keep their bits (the training paths' elementwise, the gallery's matmul).
    """
    if word_mask is None:
        over_frames = over_words = cos
    elif padding == "zero":  # the original: cos x word mask x frame mask, then the maxima over all slots
        over_frames = over_words = cos.masked_fill(~(word_mask & frame_mask), 0.0)
    else:
        over_frames, over_words = cos.masked_fill(~frame_mask, NEG), cos.masked_fill(~word_mask, NEG)
    best_frame = over_frames.amax(frame_dim, keepdim=True).float()  # max_j cos(w_i, f_j)  [..., L, 1]
    best_word = over_words.amax(word_dim, keepdim=True).float()  # max_i cos(w_i, f_j)     [..., 1, F]
    if frame_floor is not None:
        best_frame.clamp_(min=frame_floor)
    if word_floor is not None:
        best_word.clamp_(min=word_floor)
    if matmul:  # [t, 1, L] x [t, L, v] -> [t, 1, 1, v]
        t2v = torch.bmm(a.flatten(1)[:, None, :], best_frame.flatten(2)).unsqueeze(1)
    else:
        t2v = (best_frame * a).sum(word_dim, keepdim=True)  # sum_i a_i max_j
    v2t = (best_word * b).sum(frame_dim, keepdim=True)  # sum_j b_j max_i
    return ((t2v + v2t) / 2).squeeze((word_dim, frame_dim))


def wti_similarity(
    words: torch.Tensor,  # [Nt, L, D]
    word_mask: torch.Tensor,  # [Nt, L] bool
    word_logits: torch.Tensor,  # [Nt, L]
    frames: torch.Tensor,  # [Nv, F, D]
    frame_mask: torch.Tensor,  # [Nv, F] bool
    frame_logits: torch.Tensor,  # [Nv, F]
    normalized: bool = False,
    padding: str = "zero",  # zero | exclude: a padded pair inside the maxima (WTI_PADDINGS)
) -> torch.Tensor:
    """Full WTI score matrix S [Nt, Nv]; differentiable. Memory is Nt * Nv * L * F floats."""
    check_padding(padding)
    if not normalized:
        words = F.normalize(words.float(), dim=-1)
        frames = F.normalize(frames.float(), dim=-1)
    a = masked_softmax(word_logits, word_mask)  # [Nt, L]
    b = masked_softmax(frame_logits, frame_mask)  # [Nv, F]
    cos = torch.einsum("tld,vfd->tvlf", words, frames)  # [Nt, Nv, L, F]
    return wti_reduce(cos, a[:, None, :, None], b[None, :, None, :], word_mask[:, None, :, None].bool(),
                      frame_mask[None, :, None, :].bool(), padding)


def _extent(mask: torch.Tensor) -> torch.Tensor:
    """[N, L] bool -> [N] 1 + index of the last valid position (0 when none)."""
    pos = torch.arange(1, mask.shape[1] + 1, device=mask.device)
    return (mask * pos).amax(1) if mask.shape[1] else torch.zeros(len(mask), dtype=torch.long)


def _floor(padded: torch.Tensor, device, trailing: int = 0):
    """[n] bool (the member has a padded slot) -> what its maxima are clamped at under "zero":
    None (no member padded: nothing to clamp), 0.0 (all padded), else [n] + [1] * trailing float on
    `device` (0 or -inf), shaped to broadcast against the maxima (`wti_reduce`'s floors)."""
    padded = padded.cpu()
    if not bool(padded.any()):
        return None
    if bool(padded.all()):
        return 0.0
    floor = torch.zeros(padded.shape).masked_fill_(~padded, float("-inf")).to(device)
    return floor.view(-1, *[1] * trailing)


class WTIGallery:
    """A video gallery for WTI scoring of any number of caption blocks (no autograd).

    Keeps references to the frames (no copy: a normalised copy would be Nv F (D+2) floats, 2.5 GB
    at 100k videos), the frame weights and the video blocks (videos sorted by frame count, COLS
    frame tokens a block). `blocks` prepares each video block ([D, frames x videos] with padded
    frames zeroed under "zero", [D+2, ...] with the mask coordinates under "exclude"; frame-major)
    once per block of captions and scores every caption chunk on it.
    `score(words, word_mask, word_logits)` -> S [n, Nv] float32 on the CPU, in gallery order.
    """

    @torch.no_grad()
    def __init__(self, frames, frame_mask, frame_logits, device="cpu", dtype: torch.dtype = torch.float32,
                 cols: int | None = None, padding: str = "zero"):
        self.device, self.dtype = torch.device(device), dtype
        self.padding = check_padding(padding)
        self.fm = torch.as_tensor(frame_mask).to(self.device).bool()
        self.fr = torch.as_tensor(frames)
        self.n, self.width = self.fm.shape[0], self.fr.shape[-1]
        nf = max(1, self.fm.shape[1])
        cols = cols or (COLS if self.device.type == "cpu" else 1 << 16)
        per = max(1, cols // nf)
        ext = _extent(self.fm)
        order = torch.argsort(ext, stable=True)  # videos by frame count: blocks trim padded frames
        self.b = masked_softmax(torch.as_tensor(frame_logits).to(self.device), self.fm)  # [Nv, F]
        padded = (~self.fm.all(1)).cpu()  # [Nv]: a padded slot among the F (under "zero" its maxima include 0)
        self.video_blocks = []  # (video rows [v], frames kept f, floor of its maxima: `_floor`, None for "exclude")
        for s in range(0, self.n, per):
            rows = order[s:s + per]
            floor = _floor(padded[rows.cpu()], self.device) if self.padding == "zero" else None
            self.video_blocks.append((rows, max(1, int(ext[rows].max())), floor))

    def _video_block(self, rows: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> frames^T [D, f*v] (normalised, padded frames zero; "zero") or [D+2, f*v] ([f, fb, 1] a
        frame; "exclude"), and weights^T [f, v]."""
        x = F.normalize(self.fr[rows.cpu(), :f].to(self.device, dtype=torch.float32), dim=-1).to(self.dtype)
        m = self.fm[rows, :f]
        if self.padding == "zero":
            x = x.masked_fill_(~m[..., None], 0.0)  # [v, f, D]
        else:
            bias = torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill_(~m, NEG)
            x = torch.cat([x, bias[..., None], torch.ones_like(bias)[..., None]], -1)  # [v, f, D+2]
        fx = x.transpose(0, 1).reshape(-1, x.shape[-1]).t().contiguous()
        return fx, self.b[rows, :f].t().contiguous()

    @staticmethod
    def _score(w: torch.Tensor, a: torch.Tensor, fx: torch.Tensor, bt: torch.Tensor, w_floor=None,
               f_floor=None) -> torch.Tensor:
        """w [t, l, D(+2)] prepared words, a [t, l, 1, 1] weights, one video block -> S [t, v].

        w_floor / f_floor ("zero" only, see `_floor`): per caption [t, 1, 1, 1] / per video [v], the
        value each max over its words / frames is clamped at (0 where it has a padded slot)."""
        t, l, _ = w.shape
        f, v = bt.shape
        cos = (w.reshape(t * l, -1) @ fx).view(t, l, f, v)
        return wti_reduce(cos, a, bt, word_floor=w_floor, frame_floor=f_floor, word_dim=1, frame_dim=2, matmul=True)

    def blocks(self, words, word_mask, word_logits, block: int | None = None, chunk: int | None = None):
        """Yield (caption rows [b] int64, S [b, Nv] float32 on the device) over the captions, sorted
        by length, `block` captions at a time (rounded up to a multiple of `chunk`; None: all).

        words [n, L, D] (any float dtype, numpy too; converted a chunk at a time), word_mask [n, L],
        word_logits [n, L]. The scores do not depend on `block`: every chunk of `chunk` captions is
        computed the same way against the same video blocks, so a streamed S equals the in-memory
        one bit for bit.
        """
        wm = torch.as_tensor(word_mask).bool()
        n = wm.shape[0]
        if n == 0:
            return
        wo, wl = torch.as_tensor(words), torch.as_tensor(word_logits)
        ext = _extent(wm)
        order = torch.argsort(ext, stable=True)  # captions by length: chunks trim padded words
        chunk = chunk or self.chunk_for(wm.shape[1])
        block = n if block is None else max(chunk, -(-block // chunk) * chunk)
        for b in range(0, n, block):
            rows = order[b:b + block]
            out = torch.empty(len(rows), self.n, dtype=torch.float32, device=self.device)
            with torch.no_grad():  # not across the yield: grad mode is the caller's between blocks
                chunks = []  # (first row in the block, prepared words [t, l, D(+2)], weights [t, l, 1, 1], floor)
                for s in range(0, len(rows), chunk):
                    idx = rows[s:s + chunk]
                    l = max(1, int(ext[idx].max()))
                    m = wm[idx, :l].to(self.device)
                    x = F.normalize(wo[idx, :l].to(self.device, dtype=torch.float32), dim=-1).to(self.dtype)
                    if self.padding == "zero":
                        x = x.masked_fill_(~m[..., None], 0.0)
                        floor = _floor(~wm[idx].all(1), self.device, 3)  # a padded slot among the L
                    else:
                        bias = torch.zeros(m.shape, dtype=self.dtype, device=self.device).masked_fill_(~m, NEG)
                        x = torch.cat([x, torch.ones_like(bias)[..., None], bias[..., None]], -1)
                        floor = None
                    chunks.append((s, x, masked_softmax(wl[idx, :l].to(self.device), m)[..., None, None], floor))

                def one(video_block, out=out, chunks=chunks):
                    vrows, f, f_floor = video_block
                    fx, bt = self._video_block(vrows, f)
                    for s, x, a, w_floor in chunks:  # the video block stays in cache across the caption chunks
                        out[s:s + len(x), vrows] = self._score(x, a, fx, bt, w_floor, f_floor)

                run_blocks(one, self.video_blocks, self.device)
            yield rows, out

    def chunk_for(self, n_words: int) -> int:
        """Captions per matrix product: ROWS caption tokens on the CPU, more on a GPU."""
        return max(1, (ROWS if self.device.type == "cpu" else 1 << 14) // max(1, n_words))

    def score(self, words, word_mask, word_logits, chunk: int | None = None) -> torch.Tensor:
        """S [n, Nv] float32 (CPU) for captions words [n, L, D], word_mask [n, L], word_logits [n, L]."""
        n = torch.as_tensor(word_mask).shape[0]
        out = torch.empty(n, self.n, dtype=torch.float32)
        for rows, blk in self.blocks(words, word_mask, word_logits, chunk=chunk):
            out[rows] = blk.cpu()
        return out


@torch.no_grad()
def wti_similarity_chunked(
    words, word_mask, word_logits, frames, frame_mask, frame_logits,
    chunk: int | None = None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    padding: str = "zero",
) -> torch.Tensor:
    """The same matrix [Nt, Nv] computed in blocks, for galleries too large at once.

    Inputs may be numpy arrays or tensors of any float dtype (as read from the cache); the result
    is float32 on the CPU. chunk: captions per block (default: sized for the CPU cache).
    padding: zero | exclude (WTI_PADDINGS; a cache's rule is its manifest's `wti_padding`).
    """
    gallery = WTIGallery(frames, frame_mask, frame_logits, device=device, dtype=dtype, padding=padding)
    return gallery.score(words, word_mask, word_logits, chunk=chunk)
