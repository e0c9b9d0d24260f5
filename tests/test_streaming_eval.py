"""Streamed evaluation (no [Nt, Nv] matrix) gives the in-memory metrics exactly: every row, both
directions, the multi-caption protocol, the diffusion row; WTI blocks and generation blocking
change the cost, never the numbers."""
from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from synthetic_cache import synthetic_cache

import diffret.cache.wti as wti
from diffret.cache.wti import WTIGallery, wti_similarity, wti_similarity_chunked
from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser
from diffret.generator.rerank import generate, rerank
from diffret.generator.sampler import make_sampler
from diffret.generator.schedule import NoiseSchedule, ScheduleConfig
from diffret.pipeline.evaluate import evaluate


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Multi-caption test split (3 captions a video, one video without) and a generator."""
    root = tmp_path_factory.mktemp("stream")
    cache = synthetic_cache(root / "cache", n_train=12, n_test=15, test_caps=3, uncaptioned_test=1, words=7, frames=5,
                            noise=4.0)  # hard enough that ranks spread beyond the top-K
    gen = root / "gen"
    run_cli("train-generator", "--cache", cache, "--out", gen, "--epochs", 1, "--batch-size", 8, "--candidates", 4,
            "--steps", 10, "--lr", "1e-3")
    return cache, gen


@pytest.fixture
def tiny_blocks(monkeypatch):
    """WTI chunks of 2 captions and video blocks of 2 videos: many blocks even on 42 x 15."""
    monkeypatch.setattr(wti, "ROWS", 14)  # 14 // 7 words = 2 captions a chunk
    monkeypatch.setattr(wti, "COLS", 10)  # 10 // 5 frames = 2 videos a block


@pytest.mark.parametrize("top_k, sampler", [(2, "ddim"), (5, "ddpm")])
def test_streamed_equals_in_memory(multi, tiny_blocks, top_k, sampler):
    cache, gen = multi
    common = dict(steps=5, top_k=top_k, sampler=sampler, dsl=True, qb_norm=True, qb_k=2, alpha=1.5, temp=2.0)
    full = evaluate(cache, gen, **common)
    streamed = evaluate(cache, gen, memory_budget=1, **common)  # 1 byte: everything streams, 2 captions a block
    assert "memory" not in full and streamed["memory"]["streamed"] is True
    assert streamed["n_queries"] == full["n_queries"] == 42 and streamed["n_candidates"] == 15
    assert list(streamed["results"]) == list(full["results"]) == ["discriminative", "diffusion", "dsl", "qbnorm"]
    assert streamed["results"] == full["results"]  # identical, not approximately
    assert streamed["qbnorm"] == full["qbnorm"] and streamed["dsl"] == full["dsl"]


def test_streaming_refusals(multi, tmp_path):
    cache, gen = multi
    with pytest.raises(ValueError, match="--save-sims needs the full 42 x 15 score matrices"):
        evaluate(cache, gen, memory_budget=1, save_sims_to=tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()
    with pytest.raises(ValueError, match="--top-k all"):
        evaluate(cache, gen, memory_budget=1, top_k=None, steps=2)
    with pytest.raises(ValueError, match="alpha >= 0"):
        evaluate(cache, gen, memory_budget=1, alpha=-1.0, top_k=2, steps=2)
    # without a generator it streams the stage-1 row alone
    r = evaluate(cache, None, memory_budget=1)
    assert set(r["results"]) == {"discriminative"} and r["results"] == evaluate(cache, None)["results"]


def _random(g, nt, nv, L, F, D):
    words = torch.randn(nt, L, D, generator=g)
    word_mask = torch.arange(L)[None] < torch.randint(1, L + 1, (nt,), generator=g)[:, None]
    frames = torch.randn(nv, F, D, generator=g)
    frame_mask = torch.rand(nv, F, generator=g) < 0.7
    frame_mask[:, 0] = True
    return words, word_mask, torch.randn(nt, L, generator=g), frames, frame_mask, torch.randn(nv, F, generator=g)


def test_wti_blocks_are_bitwise_independent_of_the_block_size(tiny_blocks):
    g = torch.Generator().manual_seed(0)
    w, wm, wl, fr, fm, fl = _random(g, nt=23, nv=11, L=7, F=5, D=16)
    wm[3, 2] = False  # a hole inside a caption: masks need not be trailing
    ref = wti_similarity(w, wm, wl, fr, fm, fl)
    full = wti_similarity_chunked(w.half(), wm, wl, fr, fm, fl)  # float16 words, as load_split keeps them
    torch.testing.assert_close(full, wti_similarity(w.half().float(), wm, wl, fr, fm, fl), atol=1e-6, rtol=0)
    assert (wti_similarity_chunked(w, wm, wl, fr, fm, fl) - ref).abs().max() < 1e-6
    gal = WTIGallery(fr, fm, fl)
    for block in (1, 2, 5, 100):
        out = torch.full_like(full, float("nan"))
        for rows, s in gal.blocks(w.half(), wm, wl, block=block):
            out[rows] = s
        assert torch.equal(out, full), block


def test_generation_blocking_does_not_change_scores():
    torch.manual_seed(0)
    nq, nv, F, D, K = 37, 29, 5, 16, 6
    text, frames = torch.randn(nq, D), torch.randn(nv, F, D)
    mask = torch.arange(F)[None, :] < torch.randint(2, F + 1, (nv,))[:, None]
    sampler = make_sampler("ddim", NoiseSchedule(ScheduleConfig(steps=20)), 10)
    t2v, v2t = T2VDenoiser(D).eval(), V2TDenoiser(D).eval()
    for p in list(t2v.parameters()) + list(v2t.parameters()):
        torch.nn.init.normal_(p, std=0.3)
    for model, args in ((t2v, (text, None, frames, mask)), (v2t, (frames, mask, text, None))):
        nq_, nc_ = len(args[0]), len(args[2])
        c = torch.randn(nq_, nc_).topk(K, dim=1).indices
        ref = generate(model, *args, sampler, c, chunk=16, sub_chunk=16)
        for sub in (1, 3, 7):
            assert torch.allclose(generate(model, *args, sampler, c, chunk=16, sub_chunk=sub), ref, atol=1e-6)
        # whole gallery: shared candidates, every row a softmax over all of them
        allk = generate(model, *args, sampler, None, chunk=8, sub_chunk=3)
        assert allk.shape == (nq_, nc_) and torch.allclose(allk.sum(1), torch.ones(nq_))
        assert torch.allclose(allk, generate(model, *args, sampler, None, chunk=8, sub_chunk=8), atol=1e-6)
    # rerank writes the bonus onto the top-K and leaves the rest of S
    S = torch.randn(nq, nv)
    out = rerank(S, t2v, text, None, frames, mask, sampler, top_k=K, chunk=16)
    changed = out != S
    assert (changed.sum(1) <= K).all() and (out >= S).all()
