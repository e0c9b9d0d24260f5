"""Generative re-ranking equals the original's inference loop (chunks of 32, the plain formula
at every step) started from the same noise: the fast path changes the cost, not the scores."""
from __future__ import annotations

import torch

from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser
from diffret.generator.reference import baseline_rerank, initial_noise
from diffret.generator.rerank import rerank
from diffret.generator.sampler import make_sampler
from diffret.generator.schedule import NoiseSchedule, ScheduleConfig


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


def _models(D, std):
    t2v, v2t = T2VDenoiser(D).eval(), V2TDenoiser(D).eval()
    for p in list(t2v.parameters()) + list(v2t.parameters()):
        torch.nn.init.normal_(p, std=std)
    return t2v, v2t


def test_whole_gallery_and_search_sized_candidates_match_the_original_loop():
    """--top-k all (every query shares the gallery) and a few queries over a large gallery (only
    the distinct candidates' tables are built) give the original loop's scores within 1e-5."""
    torch.manual_seed(1)
    nq, nv, F, D = 12, 9, 4, 16
    text, frames = torch.randn(nq, D), torch.randn(nv, F, D)
    mask = torch.arange(F)[None, :] < torch.randint(2, F + 1, (nv,))[:, None]
    S = torch.randn(nq, nv)
    sampler = make_sampler("ddim", NoiseSchedule(ScheduleConfig(train_steps=10)))
    t2v, v2t = _models(D, 0.3)
    for model, scores, args in ((t2v, S, (text, None, frames, mask)),
                                (v2t, S.t().contiguous(), (frames, mask, text, None))):
        n, k = scores.shape
        fast = rerank(scores, model, *args, sampler, top_k=None, chunk=5, seed=2) - scores
        order = -torch.arange(k, dtype=scores.dtype).expand(n, k)  # the loop's top-k in gallery order
        slow = baseline_rerank(order, model, *args, sampler, initial_noise(n, k, 5, 2, "cpu"), top_k=k) - order
        assert (fast - slow).abs().max() <= 1e-5
        two = [a[:2] if i < 2 and a is not None else a for i, a in enumerate(args)]  # 2 queries, whole gallery
        few = rerank(scores[:2], model, *two, sampler, top_k=3, chunk=2, seed=4)
        slow = baseline_rerank(scores[:2], model, *two, sampler, initial_noise(2, 3, 2, 4, "cpu"), top_k=3)
        assert (few - slow).abs().max() <= 1e-5


def test_noisy_samplers_draw_in_the_samplers_order():
    """DDPM draws noise at every step (`draws_noise`): generate runs a chunk as one block in the
    sampler's own order, so it equals sampler.sample over the plain formula."""
    from diffret.generator.rerank import generate

    torch.manual_seed(2)
    nq, nv, F, D, K = 5, 8, 3, 8, 4
    text, frames = torch.randn(nq, D), torch.randn(nv, F, D)
    mask = torch.ones(nv, F, dtype=torch.bool)
    sampler = make_sampler("ddpm", NoiseSchedule(ScheduleConfig(train_steps=6)))
    assert sampler.draws_noise and not make_sampler("ddim", NoiseSchedule(ScheduleConfig(train_steps=6))).draws_noise
    t2v, _ = _models(D, 0.3)
    cand = torch.stack([torch.randperm(nv)[:K] for _ in range(nq)])
    with torch.no_grad():
        ref = sampler.sample(lambda x, t: t2v.reference_pairs(x, t, text, None, frames, mask, cand), (nq, K),
                             generator=torch.Generator().manual_seed(9))
    fast = generate(t2v, text, None, frames, mask, sampler, cand, chunk=nq, seed=9)
    torch.testing.assert_close(fast, torch.softmax(ref, 1), atol=1e-5, rtol=0)
