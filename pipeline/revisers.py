"""Inference-time revisers of a score matrix, as pure tensor functions: Dual Softmax and QB-Norm.

Both take scores [Nq, Nc] with one row per query (t2v: captions x videos; v2t: videos x captions)
and return a matrix of the same shape whose rows rank the candidates anew.

* Dual Softmax (DSL, CAMoE): S' = Z * softmax(Z / temp over the query axis, per candidate),
  Z = logit_scale * S. Transductive: it uses all test queries at once.
* QB-Norm with the dynamic inverted softmax (Bogolin et al. 2022): a query bank B (training
  queries) gives each candidate j the normaliser sum_b exp(beta s(b, j)); a query whose top-1
  candidate is in the activation set (candidates that are some bank query's top-k) is re-scored
  exp(beta s(q, j)) / sum_b exp(beta s(b, j)); other queries keep S. We return the logarithm of
  that ratio, beta s(q, j) - logsumexp_b beta s(b, j): the same ranking without underflow.
"""
from __future__ import annotations

from typing import Iterable

import torch


def dual_softmax(scores: torch.Tensor, temp: float = 1.0, logit_scale: float = 100.0) -> torch.Tensor:
    """scores [Nq, Nc] -> Z * softmax(Z / temp, dim=0), Z = logit_scale * scores [Nq, Nc]."""
    if not temp > 0:
        raise ValueError(f"the dual softmax temperature must be > 0, got {temp}")
    z = scores.double() * logit_scale
    return (z * torch.softmax(z / temp, dim=0)).to(scores.dtype)


class QueryBank:
    """Streaming statistics of a query bank against a gallery of Nc candidates.

    Feed bank score blocks [b, Nc] with `add`; then `lse` [Nc] = logsumexp_b beta s(b, j) and
    `active` [Nc] bool = j is in some bank query's top-k. Memory O(Nc), whatever the bank size.
    """

    def __init__(self, n_candidates: int, beta: float = 20.0, k: int = 1):
        if not beta > 0 or k < 1:
            raise ValueError(f"QB-Norm needs beta > 0 and k >= 1, got beta={beta}, k={k}")
        self.beta, self.k, self.size = float(beta), int(k), 0
        self.lse = torch.full((n_candidates,), float("-inf"), dtype=torch.float64)
        self.active = torch.zeros(n_candidates, dtype=torch.bool)

    def add(self, bank_scores: torch.Tensor) -> "QueryBank":
        """bank_scores [b, Nc]: scores of b bank queries against every candidate."""
        s = bank_scores.double().cpu()
        if s.shape[1] != len(self.lse):
            raise ValueError(f"bank scores have {s.shape[1]} candidates, expected {len(self.lse)}")
        if len(s):
            self.lse = torch.logaddexp(self.lse, torch.logsumexp(self.beta * s, dim=0))
            top = s.topk(min(self.k, s.shape[1]), dim=1).indices.reshape(-1)
            self.active[top] = True
            self.size += len(s)
        return self


def query_bank(blocks: Iterable[torch.Tensor], n_candidates: int, beta: float = 20.0, k: int = 1) -> QueryBank:
    """A QueryBank fed with every block [b, Nc] of `blocks`."""
    bank = QueryBank(n_candidates, beta, k)
    for block in blocks:
        bank.add(block)
    return bank


def qb_norm(scores: torch.Tensor, bank: QueryBank) -> torch.Tensor:
    """scores [Nq, Nc] -> revised [Nq, Nc]: log dynamic inverted softmax where the query's top-1 is active."""
    if bank.size == 0:
        raise ValueError("QB-Norm needs a non-empty query bank")
    s = scores.double()
    normalised = bank.beta * s - bank.lse.to(s.device)[None, :]
    apply = bank.active.to(s.device)[s.argmax(dim=1)]  # [Nq]
    return torch.where(apply[:, None], normalised, s).to(scores.dtype)
