"""Dual Softmax and QB-Norm on hand-made score matrices."""
import math

import pytest
import torch

from diffret.pipeline.revisers import QueryBank, dual_softmax, qb_norm, query_bank


def test_dual_softmax_by_hand():
    S = torch.tensor([[0.30, 0.10], [0.20, 0.25], [0.05, 0.00]])
    out = dual_softmax(S, temp=1.0, logit_scale=10.0)
    Z = [[3.0, 1.0], [2.0, 2.5], [0.5, 0.0]]
    for j in range(2):  # softmax over the query axis (column j), times Z
        col = [math.exp(Z[i][j]) for i in range(3)]
        for i in range(3):
            assert out[i, j].item() == pytest.approx(Z[i][j] * col[i] / sum(col), rel=1e-5)
    # A hub (a candidate another query matches better) is damped: query 0 switches to candidate 1.
    hub = torch.tensor([[0.5, 0.45], [0.6, 0.1]])
    assert hub[0].argmax().item() == 0 and dual_softmax(hub, 1.0, 10.0)[0].argmax().item() == 1
    with pytest.raises(ValueError):
        dual_softmax(S, temp=0)


def test_qb_norm_by_hand():
    beta = 2.0
    bank = torch.tensor([[0.9, 0.1, 0.0],   # top-1: candidate 0
                         [0.8, 0.2, 0.1]])  # top-1: candidate 0 -> activation set {0}
    qb = query_bank([bank[:1], bank[1:]], n_candidates=3, beta=beta, k=1)
    one_shot = QueryBank(3, beta, 1).add(bank)
    assert torch.allclose(qb.lse, one_shot.lse) and qb.size == 2
    assert qb.active.tolist() == [True, False, False]
    lse = [math.log(sum(math.exp(beta * bank[b, j].item()) for b in range(2))) for j in range(3)]
    assert qb.lse.tolist() == pytest.approx(lse)
    S = torch.tensor([[0.7, 0.6, 0.1],    # top-1 = 0, active -> normalised
                      [0.1, 0.5, 0.4]])   # top-1 = 1, not active -> unchanged
    out = qb_norm(S, qb)
    for j in range(3):
        assert out[0, j].item() == pytest.approx(beta * S[0, j].item() - lse[j], rel=1e-5)
    assert torch.equal(out[1], S[1])
    # The bank penalises the hub (candidate 0): query 0 now prefers candidate 1.
    assert out[0].argmax().item() == 1
    # k=2 widens the activation set.
    assert query_bank([bank], 3, beta, k=2).active.tolist() == [True, True, False]
    with pytest.raises(ValueError):
        qb_norm(S, QueryBank(3))
