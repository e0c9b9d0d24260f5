"""Weighted token-wise interaction (WTI) against hand-computed numbers, masking, chunking, gradients."""
import math

import numpy as np
import pytest
import torch

from diffret.cache.wti import masked_softmax, wti_similarity, wti_similarity_chunked

R = 1 / math.sqrt(2)  # cos 45 degrees
LN3 = math.log(3.0)  # softmax(ln 3, 0) = (3/4, 1/4)


def hand_example():
    """1 caption (2 valid words + 1 padded) x 2 videos (2 frames; video B's second frame padded).

    D = 2. Tokens need not be unit length: WTI L2-normalises them.
      words : w1 = (1, 0), w2 = (0, 3) -> (0, 1), w3 padded
      word logits (0.7, 0.7, <pad>) -> a = (1/2, 1/2)                  (equal logits)
      video A: fA1 = (2, 0) -> (1, 0), fA2 = (1, 1) -> (R, R); frame logits (ln 3, 0) -> b = (3/4, 1/4)
      video B: fB1 = (0, -1), fB2 padded (its vector (1, 0) would match w1 perfectly if it counted)
    """
    words = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [5.0, 5.0]]])
    word_mask = torch.tensor([[True, True, False]])
    word_logits = torch.tensor([[0.7, 0.7, 0.0]])
    frames = torch.tensor([[[2.0, 0.0], [1.0, 1.0]], [[0.0, -1.0], [1.0, 0.0]]])
    frame_mask = torch.tensor([[True, True], [True, False]])
    frame_logits = torch.tensor([[LN3, 0.0], [0.3, 9.0]])
    return words, word_mask, word_logits, frames, frame_mask, frame_logits


def test_hand_computed_example():
    S = wti_similarity(*hand_example())
    assert S.shape == (1, 2)

    # Video A. cos table (rows words, cols frames):   fA1   fA2
    #                                          w1      1     R
    #                                          w2      0     R
    # t2v = a1 * max(1, R) + a2 * max(0, R) = 1/2 * 1 + 1/2 * R
    # v2t = b1 * max(1, 0) + b2 * max(R, R) = 3/4 * 1 + 1/4 * R
    t2v_a = 0.5 * 1 + 0.5 * R
    v2t_a = 0.75 * 1 + 0.25 * R
    s_a = (t2v_a + v2t_a) / 2  # = (1.25 + 0.75 R) / 2 = 0.625 + 0.375 R ~ 0.890165
    assert s_a == pytest.approx(0.625 + 0.375 * R)

    # Video B: one valid frame fB1 = (0, -1) -> b = (1,), whatever its logit.
    # cos(w1, fB1) = 0, cos(w2, fB1) = -1. Every valid cosine is <= 0, so a padded frame that
    # leaked into the max (cos(w1, fB2) = 1) would show.
    # t2v = 1/2 * 0 + 1/2 * (-1) = -1/2
    # v2t = 1 * max(0, -1) = 0
    s_b = (-0.5 + 0.0) / 2  # = -1/4
    torch.testing.assert_close(S, torch.tensor([[s_a, s_b]]), atol=1e-6, rtol=0)


def test_masked_softmax_by_hand():
    logits = torch.tensor([[0.7, 0.7, 50.0], [LN3, 0.0, -50.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    w = masked_softmax(logits, mask)
    # row 0: equal logits over 2 valid -> 1/2, 1/2; padded -> 0
    # row 1: e^ln3 = 3, e^0 = 1, e^-50 ~ 2e-22 -> 3/4, 1/4, ~0
    # row 2: no valid entry -> all zeros (not NaN)
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.75, 0.25, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(w, expected, atol=1e-7, rtol=0)


def test_padding_does_not_change_the_score():
    base = wti_similarity(*hand_example())
    words, word_mask, word_logits, frames, frame_mask, frame_logits = hand_example()
    for v_pad, l_pad in ((1e4, 1e4), (-1e4, -1e4), (0.0, 0.0), (1e-8, 88.0)):
        w, wl, fr, fl = words.clone(), word_logits.clone(), frames.clone(), frame_logits.clone()
        w[0, 2] = torch.tensor([v_pad, -3 * v_pad + 1])
        wl[0, 2] = l_pad
        fr[1, 1] = torch.tensor([7 * v_pad + 1, v_pad])
        fl[1, 1] = -l_pad
        got = wti_similarity(w, word_mask, wl, fr, frame_mask, fl)
        torch.testing.assert_close(got, base, atol=1e-6, rtol=0)

    # On random data: padded slots replaced by wild values leave every score unchanged.
    g = torch.Generator().manual_seed(0)
    args = _random(g, nt=5, nv=4, L=6, F=5, D=7)
    ref = wti_similarity(*args)
    w, wm, wl, fr, fm, fl = (x.clone() for x in args)
    w[~wm] = torch.randn(int((~wm).sum()), 7, generator=g) * 1e3
    wl[~wm] = 1e3
    fr[~fm] = torch.randn(int((~fm).sum()), 7, generator=g) * 1e3
    fl[~fm] = 1e3
    torch.testing.assert_close(wti_similarity(w, wm, wl, fr, fm, fl), ref, atol=1e-6, rtol=0)


def _random(g, nt, nv, L, F, D):
    words = torch.randn(nt, L, D, generator=g)
    word_mask = torch.rand(nt, L, generator=g) < 0.6
    word_mask[:, 0] = True
    frames = torch.randn(nv, F, D, generator=g)
    frame_mask = torch.rand(nv, F, generator=g) < 0.6
    frame_mask[:, 0] = True
    return words, word_mask, torch.randn(nt, L, generator=g), frames, frame_mask, torch.randn(nv, F, generator=g)


def test_scores_are_bounded_by_cosines():
    g = torch.Generator().manual_seed(1)
    S = wti_similarity(*_random(g, nt=6, nv=5, L=4, F=3, D=5))
    # A weighted mean of cosines: inside [-1, 1]. Identical single-token pairs score exactly 1.
    assert S.abs().max() <= 1 + 1e-6
    v = torch.randn(1, 1, 5, generator=g)
    one = torch.ones(1, 1, dtype=torch.bool)
    assert wti_similarity(v, one, torch.zeros(1, 1), 2 * v, one, torch.zeros(1, 1)).item() == pytest.approx(1.0)


@pytest.mark.parametrize("chunk", [1, 3, 100])
def test_chunked_matches_full(chunk):
    g = torch.Generator().manual_seed(2)
    args = _random(g, nt=7, nv=5, L=4, F=3, D=6)
    full = wti_similarity(*args)
    got = wti_similarity_chunked(*args, chunk=chunk)
    assert got.shape == (7, 5) and got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, full, atol=1e-6, rtol=1e-6)


def test_chunked_accepts_numpy_float16_as_read_from_the_cache():
    g = torch.Generator().manual_seed(3)
    w, wm, wl, fr, fm, fl = _random(g, nt=7, nv=5, L=4, F=3, D=6)
    f16 = lambda x: x.numpy().astype(np.float16)  # noqa: E731
    np_args = (f16(w), wm.numpy(), f16(wl), f16(fr), fm.numpy(), f16(fl))
    got = wti_similarity_chunked(*np_args, chunk=3)
    # Reference: the same float16 values, up-cast, through the differentiable path.
    up = lambda x: torch.from_numpy(x.astype(np.float32))  # noqa: E731
    ref = wti_similarity(up(np_args[0]), wm, up(np_args[2]), up(np_args[3]), fm, up(np_args[5]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # uint8 masks (as stored on disk) work too
    got_u8 = wti_similarity_chunked(np_args[0], np_args[1].astype(np.uint8), np_args[2],
                                    np_args[3], np_args[4].astype(np.uint8), np_args[5], chunk=2)
    torch.testing.assert_close(got_u8, got)
    # ... and float16 the result is close to the float32 one
    torch.testing.assert_close(got, wti_similarity(w, wm, wl, fr, fm, fl), atol=5e-3, rtol=0)


def test_chunked_with_no_captions():
    g = torch.Generator().manual_seed(4)
    w, wm, wl, fr, fm, fl = _random(g, nt=1, nv=3, L=4, F=2, D=5)
    out = wti_similarity_chunked(w[:0], wm[:0], wl[:0], fr, fm, fl)
    assert out.shape == (0, 3)


def test_gradient_flows():
    g = torch.Generator().manual_seed(5)
    w, wm, wl, fr, fm, fl = _random(g, nt=3, nv=4, L=4, F=3, D=6)
    for x in (w, wl, fr, fl):
        x.requires_grad_(True)
    S = wti_similarity(w, wm, wl, fr, fm, fl)
    loss = torch.nn.functional.cross_entropy(S[:, :3] * 10, torch.arange(3))  # InfoNCE-like
    loss.backward()
    for name, x in (("words", w), ("word_logits", wl), ("frames", fr), ("frame_logits", fl)):
        assert x.grad is not None, name
        assert torch.isfinite(x.grad).all(), name
        assert x.grad.abs().sum() > 0, name
    # valid words carry gradient; padded slots get none
    assert (w.grad[~wm] == 0).all() and (fr.grad[~fm] == 0).all()
    assert (wl.grad[~wm] == 0).all() and (fl.grad[~fm] == 0).all()
    assert w.grad[wm].abs().sum() > 0 and fr.grad[fm].abs().sum() > 0
