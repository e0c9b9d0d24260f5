"""Generative re-ranking equals the original's inference loop (chunks of 32, the plain formula
at every step) started from the same noise: the fast path changes the cost, not the scores."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from eval_speed import baseline_rerank, initial_noise  # noqa: E402

from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser  # noqa: E402
from diffret.generator.rerank import rerank  # noqa: E402
from diffret.generator.sampler import make_sampler  # noqa: E402
from diffret.generator.schedule import NoiseSchedule, ScheduleConfig  # noqa: E402


def test_rerank_matches_the_original_loop():
    torch.manual_seed(0)
    nq, nv, F, D, K = 40, 30, 5, 16, 8
    text, frames = torch.randn(nq, D), torch.randn(nv, F, D)
    mask = torch.arange(F)[None, :] < torch.randint(2, F + 1, (nv,))[:, None]
    S = torch.randn(nq, nv)
    sampler = make_sampler("ddim", NoiseSchedule(ScheduleConfig(train_steps=20)), 10)
    t2v, v2t = T2VDenoiser(D).eval(), V2TDenoiser(D).eval()
    for p in list(t2v.parameters()) + list(v2t.parameters()):  # default init is too tame to matter
        torch.nn.init.normal_(p, std=0.3)
    for model, scores, args in (
        (t2v, S, (text, None, frames, mask)),
        (v2t, S.t().contiguous(), (frames, mask, text, None)),
    ):
        fast = rerank(scores, model, *args, sampler, top_k=K, chunk=16, seed=3, alpha=2.0, temp=3.0)
        x_T = initial_noise(len(scores), K, 16, 3, "cpu")
        slow = baseline_rerank(scores, model, *args, sampler, x_T, top_k=K, alpha=2.0, temp=3.0)
        assert torch.allclose(fast, slow, atol=1e-5), (fast - slow).abs().max()
        changed = (fast != scores).sum(1)
        assert (changed <= K).all() and changed.sum() > 0  # only the top-K of each row move
