"""The denoisers' one fast path (generator/denoiser.py: items -> context -> denoise / sampling) equals
the plain formula (`reference_forward`) in values and gradients, in float64, on every route that
uses it: training's pairs (shared slots or per pair), top-K re-ranking, the whole gallery and the
sampler's precomputed steps; padded frames throughout. Plus the fused add-ReLU-dot and the rule
that only the denoiser's module holds its algebra."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from diffret.generator import fused
from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser

ROOT = Path(__file__).resolve().parents[1]
B, K, U, F, D = 3, 5, 7, 4, 16


def _model(cls, seed=0):
    torch.manual_seed(seed)
    m = cls(D).double()
    for p in m.parameters():  # the default init is too tame for differences to show
        torch.nn.init.normal_(p, std=0.3)
    return m


def _data(cls, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, K, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 17, 40])
    if cls is T2VDenoiser:  # query text, gallery of U videos with padded frames
        q, qm = torch.randn(B, D, generator=g, dtype=torch.float64), None
        gal = torch.randn(U, F, D, generator=g, dtype=torch.float64)
        gm = torch.rand(U, F, generator=g) > 0.4
        gm[:, 0] = True
    else:  # query video with padded frames, gallery of U texts
        q = torch.randn(B, F, D, generator=g, dtype=torch.float64)
        qm = torch.rand(B, F, generator=g) > 0.4
        qm[:, 0] = True
        gal, gm = torch.randn(U, D, generator=g, dtype=torch.float64), None
    index = torch.randint(0, U, (B, K), generator=g)
    index[0, :2] = index[0, 2]  # a repeated candidate (in-batch items of one video do this)
    return x, t, q, qm, gal, gm, index


def _grads(m, fn):
    m.zero_grad()
    fn().square().sum().backward()
    return {n: p.grad.clone() for n, p in m.named_parameters()}


@pytest.mark.parametrize("cls", [T2VDenoiser, V2TDenoiser])
@pytest.mark.parametrize("dense", [None, True, False])
def test_training_pairs_equal_the_formula_in_values_and_gradients(cls, dense):
    m = _model(cls)
    x, t, q, qm, gal, gm, index = _data(cls)
    ref = m.reference_pairs(x, t, q, qm, gal, gm, index)
    fast = m.denoise(x, t, m.pairs(q, qm, gal, gm, index, dense=dense))
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    want = _grads(m, lambda: m.reference_pairs(x, t, q, qm, gal, gm, index))
    got = _grads(m, lambda: m.denoise(x, t, m.pairs(q, qm, gal, gm, index, dense=dense)))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-9, rtol=1e-9, msg=name)


def test_the_factored_first_layer_is_used_and_exact():
    """In-batch training candidates (few distinct videos, many pairs): the frames are projected once
    (Items.proj), and the result and its gradients equal the pooled-then-projected formula."""
    m = _model(T2VDenoiser)
    x, t, q, _, gal, gm, index = _data(T2VDenoiser)
    items = m.items(gal, gm, pairs=B * K * 10)
    assert items.proj is not None and items.proj.shape == (U, F, 2 * D)
    assert m.items(gal, gm, pairs=2).proj is None  # fewer pairs than frames: not worth it
    assert m.items(gal, gm, pairs=100, k=2).proj is None  # per-pair gathers: not worth it either
    ctx = m.context(q, None, items, index, dense=True)
    assert ctx.index is not None and ctx.dec.shape == (B, U, 2 * D)  # one slot a video, never a copy per pair
    ref = m.reference_pairs(x, t, q, None, gal, gm, index)
    torch.testing.assert_close(m.denoise(x, t, ctx), ref, atol=1e-10, rtol=1e-10)
    want = _grads(m, lambda: m.reference_pairs(x, t, q, None, gal, gm, index))
    got = _grads(m, lambda: m.denoise(x, t, m.context(q, None, m.items(gal, gm, B * K * 10), index, dense=True)))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-9, rtol=1e-9, msg=name)


@pytest.mark.parametrize("cls", [T2VDenoiser, V2TDenoiser])
def test_gallery_routes_and_the_sampling_steps_equal_the_formula(cls):
    m = _model(cls)
    x, t, q, qm, gal, gm, index = _data(cls)
    everything = torch.arange(U).expand(B, U)
    xa = torch.randn(B, U, dtype=torch.float64)
    steps = [40, 17, 3, 0]
    with torch.no_grad():
        # top-K: items of the whole gallery, per-query candidate lists
        ctx = m.context(q, qm, m.items(gal, gm, B * K, K), index)
        torch.testing.assert_close(m.denoise(x, t, ctx), m.reference_pairs(x, t, q, qm, gal, gm, index),
                                   atol=1e-10, rtol=1e-10)
        # the whole gallery, shared by every query
        ctx = m.context(q, qm, m.items(gal, gm))
        assert ctx.dec.shape[0] == 1 or cls is T2VDenoiser
        torch.testing.assert_close(m.denoise(xa, t, ctx), m.reference_pairs(xa, t, q, qm, gal, gm, everything),
                                   atol=1e-10, rtol=1e-10)
        # the sampler's route: every step's t-terms precomputed
        for c in (m.context(q, qm, m.items(gal, gm)), m.context(q, qm, m.items(gal, gm, B * K, K), index)):
            predict = m.sampling(c, steps)
            cand = everything if c.dec.shape[1] == U and c.index is None else index
            xx = xa if cand is everything else x
            for i, s in enumerate(steps):
                ref = m.reference_pairs(xx, torch.full((B,), s), q, qm, gal, gm, cand)
                torch.testing.assert_close(predict(i, xx), ref, atol=1e-10, rtol=1e-10)


def test_old_entry_points_are_the_same_path():
    """prepare / prepare_shared / forward stay (evaluation tests and callers use them)."""
    for cls in (T2VDenoiser, V2TDenoiser):
        m = _model(cls)
        x, t, q, qm, gal, gm, index = _data(cls)
        ref = m.reference_pairs(x, t, q, qm, gal, gm, index)
        if cls is T2VDenoiser:
            out = m(x, t, q, gal[index], gm[index])
        else:
            out = m(x, t, gal[index], q, qm)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shared", [False, True])
def test_fused_add_relu_dot_values_and_gradients(shared, monkeypatch):
    """AddReluDot (chunked, recomputing relu in backward) = the plain expression; gradcheck in float64."""
    monkeypatch.setattr(fused, "CHUNK_BYTES", 3 * 8 * 6)  # several chunks, a ragged last one
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(1 if shared else 5, 3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    he = torch.randn(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    b2 = torch.randn(1, generator=g, dtype=torch.float64, requires_grad=True)
    plain = (dec + he[:, None]).relu() @ w2 + b2
    torch.testing.assert_close(fused.AddReluDot.apply(dec, he, w2, b2), plain, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(fused.AddReluDot.apply, (dec, he, w2, b2))
    with torch.no_grad():  # the sampling form, with and without the extra term, into a scratch buffer
        plus = torch.randn(5, 3, generator=g, dtype=torch.float64)
        out = torch.empty(5, 3, 6, dtype=torch.float64)
        torch.testing.assert_close(fused.add_relu_dot(dec, he, w2, b2, plus, out=out), plain + plus)
        torch.testing.assert_close(fused.add_relu_dot(dec, he, w2, b2), plain)


def test_the_algebra_lives_in_the_denoiser_module_alone():
    """rerank.py, trainer.py and reference.py hold no tensor formula of the denoiser and switch on
    no denoiser or sampler type; rerank.py has one sampling loop: the sampler's `run`."""
    for name in ("rerank.py", "trainer.py", "reference.py"):
        src = (ROOT / "generator" / name).read_text()
        assert not re.search(r"isinstance\([^)]*(Denoiser|Sampler)", src), name
        for term in (".q_proj", ".k_proj", ".v_proj", ".decoder", ".embed_timestep", "relu(", "relu_(", "einsum("):
            assert term not in src, (name, term)
    rerank = (ROOT / "generator" / "rerank.py").read_text()
    assert "sampler.run(" in rerank and "sampler.step(" not in rerank


def test_the_compiled_kernel_is_chosen_only_where_it_pays():
    assert not fused.use_compiled("auto", "cpu", 32 * 1000 * 50 * 1024)  # top-32 at 1k queries: eager
    assert fused.use_compiled("auto", "cpu", 1000 * 1000 * 50 * 1024) == fused.compile_available()
    assert not fused.use_compiled("auto", "cuda", 10**12) and not fused.use_compiled("eager", "cpu", 10**12)
    assert fused.use_compiled("compile", "cpu", 1)
    with pytest.raises(ValueError, match="fused must be one of"):
        fused.use_compiled("fast", "cpu", 1)


@pytest.mark.slow
def test_compiled_sampling_gives_the_same_scores():
    """--fused compile (torch.compile's kernel, compiled here: seconds) = the eager scores."""
    if not fused.compile_available():
        pytest.skip("no C++ compiler for torch.compile")
    from diffret.generator.rerank import generate
    from diffret.generator.sampler import make_sampler
    from diffret.generator.schedule import NoiseSchedule, ScheduleConfig

    torch.manual_seed(0)
    m = T2VDenoiser(D).eval()
    text, frames = torch.randn(6, D), torch.randn(9, F, D)
    mask = torch.ones(9, F, dtype=torch.bool)
    sampler = make_sampler("ddim", NoiseSchedule(ScheduleConfig(train_steps=5)))
    eager = generate(m, text, None, frames, mask, sampler, None, fused="eager")
    torch.testing.assert_close(generate(m, text, None, frames, mask, sampler, None, fused="compile"), eager,
                               atol=1e-6, rtol=0)
