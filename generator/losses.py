"""Generation losses on the denoiser's x0 prediction over K candidates, and x0 targets.

Convention: candidate 0 is the positive (as in the original, which stacks the positive
first and its hard negatives after it), unless ``target_index`` says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["one_hot_x0", "generation_loss", "LOSS_KINDS", "X0_KINDS"]

LOSS_KINDS = ("ce", "mse", "kl")
X0_KINDS = ("onehot", "pm1")  # one_hot_x0 variants


def one_hot_x0(K: int, B: int, variant: str = "onehot", device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """x0 target [B, K]: "onehot" = 1 on index 0, 0 elsewhere; "pm1" = +1 on index 0, -1 elsewhere.

    (The original's ``neg == 0`` and ``neg != 0`` settings.)
    """
    if variant == "onehot":
        x0 = torch.zeros(B, K, device=device, dtype=dtype)
    elif variant == "pm1":
        x0 = torch.full((B, K), -1.0, device=device, dtype=dtype)
    else:
        raise ValueError(f"unknown x0 variant {variant!r}; expected {' or '.join(map(repr, X0_KINDS))}")
    x0[:, 0] = 1.0
    return x0


def _index(target_index: Tensor | None, B: int, device) -> Tensor:
    if target_index is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    return torch.as_tensor(target_index, dtype=torch.long, device=device).reshape(B)


def generation_loss(
    x0_hat: Tensor,
    target_index: Tensor | None = None,
    kind: str = "ce",
    x0: Tensor | None = None,
    temp: float = 100.0,
    label_smoothing: float = 0.1,
) -> Tensor:
    """Scalar loss of x0_hat [B, K] against the positive candidate.

    kind:
      "ce":  cross_entropy(x0_hat * temp, target_index), the original's "kl_loss" (temp = d_temp = 100).
      "mse": mean over B*K of (x0_hat - x0)^2, the plain diffusion x0 objective; x0 [B, K] defaults to
             the one-hot target on ``target_index``.
      "kl":  KL(p || softmax(x0_hat * temp)), batch mean, with p the label-smoothed one-hot on
             ``target_index``: p = (1 - eps) onehot + eps / K, eps = ``label_smoothing``.
             Equals "ce" minus the (constant) entropy of p when eps = 0.
    target_index: LongTensor [B]; None means all zeros (positive first).
    """
    if x0_hat.dim() != 2:
        raise ValueError(f"x0_hat must be [B, K], got {tuple(x0_hat.shape)}")
    B, K = x0_hat.shape
    idx = _index(target_index, B, x0_hat.device)
    if kind == "ce":
        return F.cross_entropy(x0_hat * temp, idx)
    if kind == "mse":
        if x0 is None:
            x0 = F.one_hot(idx, K).to(x0_hat.dtype)
        if x0.shape != x0_hat.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} must match x0_hat {tuple(x0_hat.shape)}")
        return F.mse_loss(x0_hat, x0.to(x0_hat.dtype))
    if kind == "kl":
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        p = F.one_hot(idx, K).to(x0_hat.dtype) * (1.0 - label_smoothing) + label_smoothing / K
        log_q = F.log_softmax(x0_hat * temp, dim=-1)
        return F.kl_div(log_q, p, reduction="batchmean")
    raise ValueError(f"unknown generation loss {kind!r}; expected one of {LOSS_KINDS}")
