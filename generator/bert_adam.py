"""BertAdam, the optimiser the original DiffusionRet trains with, and its learning-rate schedules.

Our own implementation of the update in the original's `DiffusionRet/models/optimization.py`.
Per parameter p with gradient g, at that parameter's step count s (0 before its first update):

    g <- g * min(1, max_grad_norm / (||g|| + 1e-6))   when max_grad_norm > 0 (per tensor, in place)
    m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2   no bias correction
    u  = m / (sqrt(v) + e) + weight_decay p              decoupled weight decay
    p <- p - lr schedule(s / t_total, warmup) u          t_total = -1: constant lr
    s <- s + 1

`warmup_cosine(x, w)` is x / w while x < w, then 0.5 (1 + cos(pi x)): the cosine runs over the
total progress x, not over the part after the warm-up, so the lr drops from ~1 to
0.5 (1 + cos(pi w)) at the end of the warm-up (0.976 for w = 0.1), and the very first update
(s = 0) has lr 0. Past t_total (x > 1) the cosine rises again, as in the original.

Stage one (extract/) needs the same optimiser; extract may not import generator (DESIGN's
dependency direction), so it will need this module moved to a shared place or its own copy.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.optim import Optimizer

__all__ = ["BertAdam", "SCHEDULES", "NO_DECAY", "warmup_cosine", "warmup_constant", "warmup_linear",
           "decay_groups"]

# The original's no-decay list, matched as substrings of the full parameter name.
NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def warmup_cosine(x: float, warmup: float = 0.002) -> float:
    """x / warmup for x < warmup, else 0.5 (1 + cos(pi x)); x = step / t_total."""
    return x / warmup if x < warmup else 0.5 * (1.0 + math.cos(math.pi * x))


def warmup_constant(x: float, warmup: float = 0.002) -> float:
    """x / warmup for x < warmup, else 1."""
    return x / warmup if x < warmup else 1.0


def warmup_linear(x: float, warmup: float = 0.002) -> float:
    """x / warmup for x < warmup, else max((x - 1) / (warmup - 1), 0): 1 at the warm-up's end, 0 at t_total."""
    return x / warmup if x < warmup else max((x - 1.0) / (warmup - 1.0), 0.0)


SCHEDULES = {"warmup_cosine": warmup_cosine, "warmup_constant": warmup_constant, "warmup_linear": warmup_linear}


def decay_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float,
                 no_decay: tuple[str, ...] = NO_DECAY) -> list[dict]:
    """Two parameter groups as the original's `prep_optimizer` makes them: names containing none of
    `no_decay` get `weight_decay`, the others 0. Parameters without requires_grad are left out."""
    named = [(n, p) for n, p in named_params if p.requires_grad]
    decay = [p for n, p in named if not any(nd in n for nd in no_decay)]
    rest = [p for n, p in named if any(nd in n for nd in no_decay)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class BertAdam(Optimizer):
    """Adam without bias correction, decoupled weight decay, per-tensor gradient clipping and a
    warm-up schedule over `t_total` steps (see the module docstring). Defaults are the original's."""

    def __init__(self, params, lr: float, warmup: float = -1, t_total: int = -1, schedule: str = "warmup_linear",
                 b1: float = 0.9, b2: float = 0.999, e: float = 1e-6, weight_decay: float = 0.01,
                 max_grad_norm: float = 1.0):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not (0.0 <= warmup < 1.0 or warmup == -1):
            raise ValueError(f"warmup must be in [0, 1) or -1, got {warmup}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"b1 and b2 must be in [0, 1), got {b1}, {b2}")
        if not e >= 0.0:
            raise ValueError(f"e must be >= 0, got {e}")
        defaults = dict(lr=lr, schedule=schedule, warmup=warmup, t_total=t_total, b1=b1, b2=b2, e=e,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm)
        super().__init__(params, defaults)

    @staticmethod
    def scheduled_lr(group: dict, step: int) -> float:
        """The lr of `group` at a parameter's step count `step`."""
        if group["t_total"] == -1:
            return group["lr"]
        return group["lr"] * SCHEDULES[group["schedule"]](step / group["t_total"], group["warmup"])

    def get_lr(self) -> list[float]:
        """The lr the next update of each parameter with a gradient uses ([0] before any update)."""
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    return [0.0]
                out.append(self.scheduled_lr(group, state["step"]))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2, wd, max_norm = group["b1"], group["b2"], group["weight_decay"], group["max_grad_norm"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("BertAdam does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["next_m"] = torch.zeros_like(p)
                    state["next_v"] = torch.zeros_like(p)
                m, v = state["next_m"], state["next_v"]
                if max_norm > 0:
                    grad.mul_(torch.clamp(max_norm / (torch.linalg.vector_norm(grad) + 1e-6), max=1.0))
                m.mul_(b1).add_(grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                update = m / (v.sqrt() + group["e"])
                if wd > 0.0:
                    update.add_(p, alpha=wd)
                p.add_(update, alpha=-self.scheduled_lr(group, state["step"]))
                state["step"] += 1
        return loss
