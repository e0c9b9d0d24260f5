"""Streamed evaluation (no [Nt, Nv] matrix) gives the in-memory metrics exactly: every row, both
directions, the multi-caption protocol, the diffusion row, ties; WTI blocks and generation blocking
change the cost, never the numbers."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import run_cli
from synthetic_cache import synthetic_cache

import diffret.cache.wti as wti
from diffret.cache.wti import WTIGallery, wti_similarity, wti_similarity_chunked
from diffret.generator.config import GeneratorConfig
from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser
from diffret.generator.features import SplitFeatures, load_split
from diffret.generator.generator import Generator
from diffret.generator.rerank import generate, rerank
from diffret.generator.sampler import make_sampler
from diffret.generator.schedule import NoiseSchedule, ScheduleConfig
from diffret.pipeline.evaluate import EvalOptions, evaluate
from diffret.pipeline.metrics import retrieval_metrics
from diffret.pipeline.revisers import dual_softmax
from diffret.pipeline.streaming import streamed_metrics


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


@pytest.mark.parametrize("top_k, sampler, alpha", [(2, "ddim", 1.5), (5, "ddpm", -0.7)])
@pytest.mark.slow
def test_streamed_equals_in_memory(multi, tiny_blocks, top_k, sampler, alpha):
    cache, gen = multi
    common = dict(sample_steps=5, top_k=top_k, sampler=sampler, dsl=True, qb_norm=True, qb_k=2, alpha=alpha, temp=2.0)
    full = evaluate(cache, gen, **common)
    streamed = evaluate(cache, gen, memory_budget=1, **common)  # 1 byte: everything streams, 2 captions a block
    assert "memory" not in full and streamed["memory"]["streamed"] is True
    # 14 videos of 3 captions: their v2t state (a bool per query video and video) in one sweep per video
    assert streamed["memory"]["v2t_sweeps"] == 14
    assert streamed["n_queries"] == full["n_queries"] == 42 and streamed["n_candidates"] == 15
    assert list(streamed["results"]) == list(full["results"]) == ["discriminative", "diffusion", "dsl", "qbnorm"]
    assert streamed["results"] == full["results"]  # identical, not approximately
    assert streamed["qbnorm"] == full["qbnorm"] and streamed["dsl"] == full["dsl"]


@pytest.mark.slow
def test_streaming_refusals(multi, tmp_path):
    cache, gen = multi
    with pytest.raises(ValueError, match="--save-sims needs the full 42 x 15 score matrices"):
        evaluate(cache, gen, memory_budget=1, save_sims_to=tmp_path / "s.npz")
    assert not (tmp_path / "s.npz").exists()
    with pytest.raises(ValueError, match="--top-k all"):
        evaluate(cache, gen, memory_budget=1, top_k=None, sample_steps=2)
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


@pytest.mark.parametrize("padding", ["zero", "exclude"])
def test_wti_blocks_are_bitwise_independent_of_the_block_size(tiny_blocks, padding):
    g = torch.Generator().manual_seed(0)
    w, wm, wl, fr, fm, fl = _random(g, nt=23, nv=11, L=7, F=5, D=16)
    wm[3, 2] = False  # a hole inside a caption: masks need not be trailing
    wm[4] = fm[5] = True  # members with every slot valid
    ref = wti_similarity(w, wm, wl, fr, fm, fl, padding=padding)
    full = wti_similarity_chunked(w.half(), wm, wl, fr, fm, fl, padding=padding)  # float16 words, as load_split keeps
    torch.testing.assert_close(full, wti_similarity(w.half().float(), wm, wl, fr, fm, fl, padding=padding), atol=1e-6,
                               rtol=0)
    assert (wti_similarity_chunked(w, wm, wl, fr, fm, fl, padding=padding) - ref).abs().max() < 1e-6
    gal = WTIGallery(fr, fm, fl, padding=padding)
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
    sampler = make_sampler("ddim", NoiseSchedule(ScheduleConfig(train_steps=20)), 10)
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


def _tied_features(frames_equal: bool) -> SplitFeatures:
    """7 videos (video 6 without captions), 12 captions (3, 2, 1, 1, 3, 2 a video), with exact ties:
    videos 4 and 5 repeat videos 0 and 1, caption 11 repeats caption 0; `frames_equal`: every
    token the same vector, every slot valid, equal weights (S exactly constant)."""
    g = torch.Generator().manual_seed(3)
    cv = torch.tensor([0, 0, 0, 1, 1, 2, 3, 4, 4, 4, 5, 5])
    nv, L, F, D = 7, 5, 4, 8
    frames, words = torch.randn(nv, F, D, generator=g), torch.randn(len(cv), L, D, generator=g)
    frames[4:6] = frames[0:2]
    words[11] = words[0]
    if frames_equal:
        frames[:], words[:] = frames[0, 0], frames[0, 0]
    fm = torch.arange(F)[None] < torch.tensor([4, 2, 3, 4, 4, 2, 1])[:, None]
    wm = torch.arange(L)[None] < torch.tensor([5, 3, 2, 4, 5, 3, 2, 4, 5, 3, 2, 5])[:, None]
    fl, wl = torch.randn(nv, F, generator=g), torch.randn(len(cv), L, generator=g)
    fl[4:6], wl[11] = fl[0:2], wl[0]
    if frames_equal:
        fm[:], wm[:], fl[:], wl[:] = True, True, 0.0, 0.0
    return SplitFeatures([f"c{i}" for i in range(len(cv))], cv, words[:, 0].clone(), words.half(), wm, wl,
                         [f"v{i}" for i in range(nv)], frames, fm, fl)


@pytest.mark.parametrize("frames_equal", [False, True])
def test_streamed_equals_in_memory_with_ties(tiny_blocks, frames_equal):
    """Exact ties (repeated videos and captions, or one constant score) count against the query in
    both paths, in every row: stage 1, diffusion (a sharp softmax, temp 1e4: most re-scored entries
    get a bonus of exactly 0 and keep their ties), DSL."""
    f = _tied_features(frames_equal)
    S = wti_similarity_chunked(f.words, f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits)
    assert torch.equal(S[:, 4], S[:, 0]) and torch.equal(S[11], S[0])  # the ties are exact
    assert (S == S[0, 0]).all() == frames_equal
    D, K = f.width, 3
    torch.manual_seed(0)
    gen = Generator(GeneratorConfig(train_steps=10), T2VDenoiser(D).eval(), V2TDenoiser(D).eval(), {"width": D})
    t2v, v2t, smp = gen.t2v, gen.v2t, gen.sampler("ddim", 3)
    opts = EvalOptions(top_k=K, alpha=1.0, temp=1e4, dsl=True)
    common = dict(sampler=smp, top_k=K, alpha=opts.alpha, temp=opts.temp, seed=opts.seed)
    rows = {"discriminative": (S, S.t()),
            "diffusion": (rerank(S, t2v, f.sentence, None, f.frames, f.frame_mask, **common),
                          rerank(S.t().contiguous(), v2t, f.frames, f.frame_mask, f.sentence, None, **common)),
            "dsl": (dual_softmax(S, 1.0, 100.0), dual_softmax(S.t(), 1.0, 100.0))}
    full = {row: retrieval_metrics(a, b, f.caption_video) for row, (a, b) in rows.items()}
    for budget in (1, 1 << 20):  # one sweep per video of several captions, or a single sweep
        streamed, info = streamed_metrics(f, opts, "cpu", gen, smp, None, 100.0, budget=budget)
        assert streamed == full, budget
        assert info["v2t_sweeps"] == (4 if budget == 1 else 1)
    if frames_equal:  # nothing to tell apart: every query behind every other candidate it could find
        for row in ("discriminative", "dsl"):
            assert full[row]["t2v"]["R@1"] == 0.0 and full[row]["t2v"]["MnR"] == 7.0
            assert full[row]["v2t"]["R@1"] == 0.0 and full[row]["v2t"]["MnR"] == 6.0  # video 6 is never found


def test_streamed_v2t_is_the_multi_caption_protocol(tiny_blocks):
    """On a gallery where counting the captions above a query video's own score and counting the
    videos (the field's protocol: a video is its best caption) disagree, streaming counts videos."""
    f = _tied_features(False)
    S = wti_similarity_chunked(f.words, f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits)
    v2t = S.t()
    cv = f.caption_video
    own = v2t.clone().masked_fill_(cv[None] != torch.arange(7)[:, None], float("-inf")).amax(1)  # [Nv]
    by_caption = (v2t >= own[:, None]).sum(1) - (cv[None] == torch.arange(7)[:, None]).mul(v2t >= own[:, None]).sum(1)
    video_max = torch.full((7, 7), float("-inf")).scatter_reduce(1, cv.expand(7, -1), v2t, "amax")
    by_video = (video_max >= own[:, None]).sum(1) - 1
    has = torch.bincount(cv, minlength=7) > 0
    assert (by_caption[has] != by_video[has]).any()  # the protocols differ on this gallery
    streamed, _ = streamed_metrics(f, EvalOptions(), "cpu", budget=1)
    assert streamed["discriminative"]["v2t"]["MnR"] == pytest.approx(float((by_video[has] + 1).float().mean()))


@pytest.mark.slow
def test_every_scorer_follows_the_cache_rule(multi, tmp_path):
    """A cache recording wti_padding "exclude" is scored by it in memory and streamed alike."""
    cache, _ = multi
    f = load_split(cache, "test")
    assert f.wti_padding == "zero"  # the manifest's default, as written by the synthetic writer
    man = json.loads((cache / "manifest.json").read_text())
    other = tmp_path / "exclude"
    shutil.copytree(cache, other)
    (other / "manifest.json").write_text(json.dumps({**man, "wti_padding": "exclude"}))
    fx = load_split(other, "test")
    assert fx.wti_padding == "exclude"
    sims = {}
    for name, root in (("zero", cache), ("exclude", other)):
        evaluate(root, None, save_sims_to=tmp_path / f"{name}.npz")
        sims[name] = torch.from_numpy(np.load(tmp_path / f"{name}.npz")["discriminative_t2v"])
        want = wti_similarity(f.words.float(), f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits,
                              padding=name)
        torch.testing.assert_close(sims[name], want, atol=1e-5, rtol=0)
        assert evaluate(root, None, memory_budget=1)["results"] == evaluate(root, None)["results"]
    assert not torch.equal(sims["zero"], sims["exclude"])
