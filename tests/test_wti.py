"""Weighted token-wise interaction (WTI) against hand-computed numbers, masking, chunking, gradients,
under both rules for padded pairs: "zero" (the original's `get_similarity_logits`: cosines times the
masks, so a padded pair counts as 0 inside the maxima) and "exclude" (a padded pair never wins)."""
import math

import numpy as np
import pytest
import torch

import diffret.cache.wti as wti
from diffret.cache.wti import WTIGallery, masked_softmax, wti_similarity, wti_similarity_chunked
from diffret.extract.config import ExtractConfig
from diffret.generator.candidates import paired_wti

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
    S = wti_similarity(*hand_example(), padding="exclude")
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

    # "zero" (the default, the original): video A has no padded frame slot and every cosine is >= 0,
    # so nothing changes there. Video B has a padded slot: each word's max over its 2 frame slots
    # includes 0: w1 max(0, 0) = 0, w2 max(-1, 0) = 0 -> t2v = 0; fB1's max over the 3 word slots
    # (w3 padded) is max(0, -1, 0) = 0 -> v2t = 0. s_b = 0.
    for S in (wti_similarity(*hand_example()), wti_similarity_chunked(*hand_example())):
        torch.testing.assert_close(S, torch.tensor([[s_a, 0.0]]), atol=1e-6, rtol=0)


def hand_2x2():
    """2 captions x 2 videos, D = 2, 2 word and 2 frame slots, equal logits (uniform weights).

      T1: w11 = (1, 0), w12 = (0, 1), both valid          T2: w21 = (-1, 0); w22 padded, (3, 3)
      V1: f11 = (1, 0), f12 = (0, -1), both valid         V2: f21 = (-0.6, -0.8); f22 padded, (1, 1)
    """
    words = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [3.0, 3.0]]])
    word_mask = torch.tensor([[True, True], [True, False]])
    frames = torch.tensor([[[1.0, 0.0], [0.0, -1.0]], [[-0.6, -0.8], [1.0, 1.0]]])
    frame_mask = torch.tensor([[True, True], [True, False]])
    return words, word_mask, torch.zeros(2, 2), frames, frame_mask, torch.zeros(2, 2)


# Cosines (rows words, columns frames):
#   T1 x V1: w11 (1, 0), w12 (0, -1)    T1 x V2: w11 (-0.6), w12 (-0.8)    (all negative)
#   T2 x V1: w21 (-1, 0)                T2 x V2: w21 (0.6)
# exclude:  T1V1 t2v (1 + 0)/2 = 0.5, v2t (max(1, 0) + max(0, -1))/2 = 0.5          -> 0.5
#           T1V2 t2v (-0.6 - 0.8)/2 = -0.7, v2t max(-0.6, -0.8) = -0.6              -> -0.65
#           T2V1 t2v max(-1, 0) = 0, v2t (-1 + 0)/2 = -0.5                           -> -0.25
#           T2V2 t2v 0.6, v2t 0.6                                                    -> 0.6
# zero:     V2 has a padded slot, so every word's max over its frames includes 0; T2 has one, so
#           every frame's max over its words includes 0; T1 and V1 have none.
#           T1V1 as above                                                            -> 0.5
#           T1V2 t2v (max(-0.6, 0) + max(-0.8, 0))/2 = 0, v2t max(-0.6, -0.8) = -0.6  -> -0.3
#           T2V1 t2v 0, v2t (max(-1, 0) + max(0, 0))/2 = 0                           -> 0
#           T2V2 t2v max(0.6, 0), v2t max(0.6, 0)                                    -> 0.6
HAND_2X2 = {"exclude": [[0.5, -0.65], [-0.25, 0.6]], "zero": [[0.5, -0.3], [0.0, 0.6]]}


@pytest.mark.parametrize("padding", ["zero", "exclude"])
def test_hand_computed_2x2_under_both_rules(padding, monkeypatch):
    want = torch.tensor(HAND_2X2[padding])
    args = hand_2x2()
    torch.testing.assert_close(wti_similarity(*args, padding=padding), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(wti_similarity_chunked(*args, padding=padding), want, atol=1e-6, rtol=0)
    # one caption and one video a block: V2's block keeps 1 frame, T2's chunk 1 word, so the 0 of the
    # padded slots comes from the clamp alone, and the result is still that of all the slots
    monkeypatch.setattr(wti, "ROWS", 2)
    got = WTIGallery(*args[3:], cols=2, padding=padding).score(*args[:3])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    w, wm, wl, fr, fm, fl = args  # paired (training candidates): caption i against both videos
    got = paired_wti(w, wm, wl, fr[None].expand(2, -1, -1, -1), fm[None].expand(2, -1, -1), fl[None].expand(2, -1, -1),
                     padding=padding)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert wti_similarity(*args).tolist() == wti_similarity(*args, padding="zero").tolist()  # the default


def test_unknown_padding_rule_is_one_line():
    for call in (lambda: wti_similarity(*hand_2x2(), padding="mask"),
                 lambda: wti_similarity_chunked(*hand_2x2(), padding="mask"),
                 lambda: ExtractConfig(wti_padding="mask")):
        with pytest.raises(ValueError, match="unknown WTI padding rule 'mask'; known: zero, exclude"):
            call()
    assert ExtractConfig().wti_padding == "zero"


@pytest.mark.parametrize("padding", ["zero", "exclude"])
@pytest.mark.parametrize("rows, cols", [(None, None), (6, 5), (14, 10)])
def test_fast_path_equals_the_formula(padding, rows, cols, monkeypatch):
    """WTIGallery (trimmed blocks, sorted rows, folded masks or zeroed tokens) = wti_similarity."""
    if rows:
        monkeypatch.setattr(wti, "ROWS", rows)
    g = torch.Generator().manual_seed(7)
    nt, nv, L, F, D = 19, 13, 7, 5, 16
    w, wm, wl, fr, fm, fl = _random(g, nt=nt, nv=nv, L=L, F=F, D=D)
    wm[:3] = True  # captions and videos with every slot valid (their maxima never include a padded 0)
    fm[:3] = True
    wm[3] = torch.arange(L) < 2  # short members, so blocks trim
    fm[3] = torch.arange(F) < 1
    fr[4, 1:] = -w[5, 0]  # word 0 of caption 5 has only negative cosines with video 4's frames
    fr[4, 0] = -w[5, 0] + 0.1 * torch.randn(D, generator=g)
    fm[4] = torch.arange(F) < 3
    ref = wti_similarity(w, wm, wl, fr, fm, fl, padding=padding)
    got = WTIGallery(fr, fm, fl, cols=cols, padding=padding).score(w.half(), wm, wl)
    torch.testing.assert_close(got, wti_similarity(w.half().float(), wm, wl, fr, fm, fl, padding=padding),
                               atol=1e-6, rtol=0)
    assert (got - ref).abs().max() < 5e-3  # float16 words
    # the rules differ on this data (all valid cosines of some rows negative), only where padding is
    other = wti_similarity(w, wm, wl, fr, fm, fl, padding="exclude" if padding == "zero" else "zero")
    differ = (other - ref).abs() > 1e-6
    assert differ.any() and not differ[:3, :3].any()


def test_masked_softmax_by_hand():
    logits = torch.tensor([[0.7, 0.7, 50.0], [LN3, 0.0, -50.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, True, False], [True, True, True], [False, False, False]])
    w = masked_softmax(logits, mask)
    # row 0: equal logits over 2 valid -> 1/2, 1/2; padded -> 0
    # row 1: e^ln3 = 3, e^0 = 1, e^-50 ~ 2e-22 -> 3/4, 1/4, ~0
    # row 2: no valid entry -> all zeros (not NaN)
    expected = torch.tensor([[0.5, 0.5, 0.0], [0.75, 0.25, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(w, expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("padding", ["zero", "exclude"])
def test_padding_does_not_change_the_score(padding):
    def wti_similarity(*args):  # noqa: F811  (the rule under test)
        return wti.wti_similarity(*args, padding=padding)

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


@pytest.mark.parametrize("padding", ["zero", "exclude"])
def test_gradient_flows(padding):
    g = torch.Generator().manual_seed(5)
    w, wm, wl, fr, fm, fl = _random(g, nt=3, nv=4, L=4, F=3, D=6)
    for x in (w, wl, fr, fl):
        x.requires_grad_(True)
    S = wti_similarity(w, wm, wl, fr, fm, fl, padding=padding)
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


def test_stage1_loss_and_extract_option_follow_the_rule(monkeypatch, tmp_path):
    """`--wti-padding` reaches ExtractConfig (a training field), and the stage-1 loss scores by it."""
    from click.testing import CliRunner

    import diffret.extract.stage1 as stage1
    from diffret.extract.backbone import build_clip
    from diffret.extract.config import TRAINING_FIELDS, recipe_mismatch
    from diffret.extract.distributed import DistInfo
    from diffret.extract.finetune import batch_loss
    from diffret.extract.model import Stage1Model, contrastive_loss
    from diffret.pipeline.cli import main

    torch.manual_seed(0)
    model = Stage1Model(build_clip("tiny", "none"), max_frames=2).eval()
    w, wm, wl, fr, fm, fl = hand_2x2()  # the encoders' outputs, where the rules differ

    def net(tokens, frames, mask):
        return ({"words": w, "word_mask": wm, "word_logits": wl}, {"frames": fr, "frame_mask": fm, "frame_logits": fl})

    tokens, video, valid = torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 2, 3, 32, 32), torch.ones(2, dtype=bool)
    losses = {}
    for rule in ("zero", "exclude"):
        cfg = ExtractConfig(model="tiny", pretrained="none", wti_padding=rule)
        losses[rule] = batch_loss(net, model, tokens, video, fm, valid, cfg, DistInfo(), amp=False)
        text, vid = net(None, None, None)
        want = contrastive_loss(model.similarity(text, vid, padding=rule), model.logit_scale, cfg.loss)
        torch.testing.assert_close(losses[rule], want)
        torch.testing.assert_close(model.similarity(text, vid, padding=rule), torch.tensor(HAND_2X2[rule]))
    assert not torch.isclose(losses["zero"], losses["exclude"])
    assert "wti_padding" in TRAINING_FIELDS  # a resumed or reused fine-tuning must have trained by the same rule
    assert recipe_mismatch(ExtractConfig(wti_padding="exclude").to_dict(), ExtractConfig()) == \
        "wti_padding was 'exclude', now 'zero'"

    seen = []
    monkeypatch.setattr(stage1, "run_stage1", lambda cfg, out, **kw: seen.append(cfg) or
                        {"splits": {}, "seconds": 0, "device": "cpu", "failed": 0})
    for args, rule in (([], "zero"), (["--wti-padding", "exclude"], "exclude")):
        r = CliRunner().invoke(main, ["extract", "--data-root", str(tmp_path), "--out", str(tmp_path / "c"), *args])
        assert r.exit_code == 0, r.output
        assert seen[-1].wti_padding == rule
    r = CliRunner().invoke(main, ["extract", "--data-root", str(tmp_path), "--out", str(tmp_path / "c"),
                                  "--wti-padding", "mask"])
    assert r.exit_code != 0 and "zero" in r.output


def test_training_candidates_follow_the_features_rule():
    """Stage 2 orders its candidates (in-batch and mined from the cache) by the cache's rule."""
    from diffret.generator import trainer
    from diffret.generator.candidates import mine_cache_negatives, positive_first, same_video_mask
    from diffret.generator.features import SplitFeatures

    g = torch.Generator().manual_seed(11)
    w, wm, wl, fr, fm, fl = _random(g, nt=20, nv=10, L=4, F=3, D=4)  # D = 4: negative cosines are common
    cv = torch.arange(20) // 2
    picks = {}
    for rule in ("zero", "exclude"):
        f = SplitFeatures([f"c{i}" for i in range(20)], cv, w[:, 0].clone(), w.half(), wm, wl,
                          [f"v{i}" for i in range(10)], fr, fm, fl, wti_padding=rule)
        full = wti_similarity(w.half().float(), wm, wl, fr, fm, fl, padding=rule)
        video_pool, caption_pool = mine_cache_negatives(f, k=4, pool_factor=100)  # the pool covers the split: exact
        for c in range(20):
            assert video_pool[c].tolist() == full[c].masked_fill(torch.arange(10) == cv[c], -9).topk(3).indices.tolist()
        rows = torch.arange(0, 20, 2)  # one caption a video: a batch of 10 pairs
        vids, caps = trainer.batch_candidates(f, rows, 4)
        sim = full[rows][:, cv[rows]]
        same = same_video_mask(cv[rows])
        assert vids.tolist() == cv[rows][positive_first(sim, same, 4)].tolist()
        assert caps.tolist() == rows[positive_first(sim.t(), same, 4)].tolist()
        picks[rule] = (video_pool, vids, caps)
    assert all(not torch.equal(a, b) for a, b in zip(picks["zero"], picks["exclude"]))  # the rules matter here
