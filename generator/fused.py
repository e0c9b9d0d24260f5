"""The decoder's last step, relu(dec + he) . w2 + b2 over [B, K, 2D], as few passes over memory as possible.

It is the one term of every denoising step that does not shrink with the algebra (B K 2D
elements a step, one add, one max, one multiply-add each): memory- and dispatch-bound. Three forms:

* sampling (no gradients), eager: add into a reused buffer, relu in place, one matrix-vector product;
* training: `AddReluDot`, a custom autograd function that keeps no [B, K, 2D] activation: forward
  and backward run over row chunks that stay in cache, the backward recomputing relu(dec + he);
* `compiled(True)`: torch.compile's fused kernel (one pass) for sampling, where it is available.
  It pays only when the work is large (whole-gallery generation): compiling costs seconds, so
  `use_compiled("auto", ...)` (re-ranking's default) compiles only past AUTO_COMPILE_ELEMENTS.

`add_relu_dot` picks the form; results agree to float rounding (tests/test_fused.py).
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from diffret.cache.blocks import run_blocks

# Large CPU tensors on transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE, read at the first
# allocation of 2 MiB or more): every fresh [B, K, 2D] buffer is otherwise faulted in 4 KiB at a time
# (measured: a fresh 64 MiB tensor 21.8 ms -> 8.3 ms to fill). Same numbers; THP_MEM_ALLOC_ENABLE=0 keeps it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

CHUNK_BYTES = 512 << 10  # rows per chunk of the training function: a [rows, K, 2D] chunk of about 512 KiB (in L2)
_state = {"compiled": False, "fn": None}


def _plain(dec: Tensor, he: Tensor, w2: Tensor, b2: Tensor, plus: Tensor) -> Tensor:
    return ((dec + he.unsqueeze(1)).relu() * w2).sum(-1) + b2 + plus


class AddReluDot(torch.autograd.Function):
    """relu(dec [B|1, K, E] + he [B, E]) @ w2 [E] + b2 [1] -> [B, K], saving only its inputs: the
    [B, K, E] activation is recomputed chunk by chunk in backward instead of stored. On the CPU the
    rows are split into one stripe a thread, each run single-threaded (`cache/blocks.run_blocks`):
    hundreds of small chunk ops would otherwise each wait at an OpenMP barrier, which on a shared
    machine costs a time slice. Partial sums are added in stripe order: the result does not depend
    on the scheduling."""

    @staticmethod
    def forward(ctx, dec, he, w2, b2):
        B, K, E = he.shape[0], dec.shape[1], dec.shape[2]
        out = torch.empty(B, K, dtype=he.dtype, device=he.device)
        step = _rows(dec, B)

        def stripe(rows):
            buf = torch.empty((min(step, rows.stop - rows.start), K, E), dtype=dec.dtype, device=dec.device)
            for s in range(rows.start, rows.stop, step):
                n = min(step, rows.stop - s)
                h = torch.add(dec if dec.shape[0] == 1 else dec[s:s + n], he[s:s + n, None], out=buf[:n]).relu_()
                torch.mv(h.view(n * K, E), w2, out=out[s:s + n].view(-1))

        run_blocks(stripe, _stripes(B, step, dec.device), dec.device)
        ctx.save_for_backward(dec, he, w2)
        return out.add_(b2)

    @staticmethod
    def backward(ctx, g):
        dec, he, w2 = ctx.saved_tensors
        B, K, E = he.shape[0], dec.shape[1], dec.shape[2]
        shared, want_dec = dec.shape[0] == 1, ctx.needs_input_grad[0]
        g = g.contiguous()
        g_dec = None if shared else torch.empty_like(dec)
        g_he = torch.empty_like(he)
        step = _rows(dec, B)
        stripes = _stripes(B, step, dec.device)
        partial = {}  # stripe start -> (its share of g_w2, of a shared dec's gradient)

        def stripe(rows):
            buf = torch.empty((min(step, rows.stop - rows.start), K, E), dtype=dec.dtype, device=dec.device)
            p_w2 = torch.zeros_like(w2)
            p_dec = torch.zeros_like(dec) if shared else None
            for s in range(rows.start, rows.stop, step):
                n = min(step, rows.stop - s)
                h = torch.add(dec if shared else dec[s:s + n], he[s:s + n, None], out=buf[:n]).relu_()  # recomputed
                gc = g[s:s + n]
                p_w2.addmv_(h.view(n * K, E).t(), gc.reshape(-1))
                h = h.sign_().mul_(w2)  # d relu(h) / dh = 1 where h > 0
                gh = torch.mul(h, gc.unsqueeze(-1), out=h if shared else g_dec[s:s + n])
                torch.sum(gh, 1, out=g_he[s:s + n])
                if shared:
                    p_dec[0] += gh.sum(0)
            partial[rows.start] = (p_w2, p_dec)

        run_blocks(stripe, stripes, dec.device)
        parts = [partial[r.start] for r in stripes]
        g_w2 = sum(p[0] for p in parts)
        if shared:
            g_dec = sum(p[1] for p in parts)
        return (g_dec if want_dec else None), g_he, g_w2, g.sum().reshape(1)


def _stripes(batch: int, step: int, device) -> list[range]:
    """Rows [0, batch) in one stripe a CPU thread (whole chunks each); one stripe elsewhere."""
    n = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    per = -(-max(1, -(-batch // step)) // n) * step
    return [range(s, min(batch, s + per)) for s in range(0, batch, per)]


def _rows(dec: Tensor, batch: int) -> int:
    """Rows a chunk: CPU, CHUNK_BYTES of [rows, K, E] (in L2); a GPU takes all rows at once (launches cost more)."""
    if dec.device.type != "cpu":
        return batch
    return max(1, CHUNK_BYTES // max(1, dec.shape[1] * dec.shape[2] * dec.element_size()))


def add_relu_dot(dec: Tensor, he: Tensor, w2: Tensor, b2: Tensor, plus: Tensor | None = None,
                 out: Tensor | None = None) -> Tensor:
    """relu(dec [B|1, K, E] + he [B, E]) . w2 [E] + b2 [1] (+ plus [B, K]) -> [B, K]. out: a [B, K, E]
    scratch buffer for the eager sampling form (reused across steps: a fresh one costs as much as the math)."""
    if torch.is_grad_enabled() and (dec.requires_grad or he.requires_grad or w2.requires_grad):
        y = AddReluDot.apply(dec, he, w2, b2)
        return y if plus is None else y + plus
    B, K, E = he.shape[0], dec.shape[1], dec.shape[2]
    if plus is None:
        plus = torch.zeros(B, K, dtype=dec.dtype, device=dec.device)
    if _state["compiled"]:
        try:
            return _compiled()(dec, he, w2, b2, plus)
        except Exception:  # noqa: BLE001  (no working compiler here after all: stay eager from now on)
            _state["compiled"], _state["broken"] = False, True
    if out is None:
        out = torch.empty((B, K, E), dtype=dec.dtype, device=dec.device)
    h = torch.add(dec, he.unsqueeze(1), out=out).relu_()
    return torch.addmv(plus.reshape(-1), h.view(B * K, E), w2, beta=1.0).view(B, K).add_(b2)


def _compiled():
    if _state["fn"] is None:
        _state["fn"] = torch.compile(_plain, dynamic=True)
    return _state["fn"]


def compile_available() -> bool:
    """Whether torch.compile can build a CPU kernel here (it needs a C++ compiler)."""
    import shutil

    return not _state.get("broken") and (shutil.which("g++") is not None or shutil.which("c++") is not None)


FUSED = ("auto", "eager", "compile")  # sampling's add-ReLU-dot: decide by the work | always eager | always compiled
AUTO_COMPILE_ELEMENTS = 10**10  # auto compiles (CPU) from this many [query, candidate, 2D] elements over all
#                                 steps: whole-gallery generation (1k x 1k x 50 steps x 1024 = 5e10), where the
#                                 seconds of compiling pay; top-32 (1.6e9) stays eager


def use_compiled(mode: str, device, elements: int) -> bool:
    """Whether sampling should run the compiled kernel: mode "compile", or "auto" on a CPU with a
    C++ compiler when the work is large enough to pay for compiling."""
    if mode not in FUSED:
        raise ValueError(f"fused must be one of {', '.join(FUSED)}, got {mode!r}")
    if mode == "auto":
        return torch.device(device).type == "cpu" and elements >= AUTO_COMPILE_ELEMENTS and compile_available()
    return mode == "compile"


@contextlib.contextmanager
def compiled(on: bool = True):
    """Within the block, sampling's add-ReLU-dot uses torch.compile's fused kernel (when `on`)."""
    before = _state["compiled"]
    _state["compiled"] = bool(on)
    try:
        yield
    finally:
        _state["compiled"] = before
