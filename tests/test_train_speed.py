"""Stage-2 training at scale: words stay float16 in memory, the shared-candidate step equals the
plain one, and benchmarks/train_speed.py runs end to end at a tiny size (figures are not checked)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from synthetic_cache import synthetic_cache

from diffret.generator import trainer
from diffret.generator.config import GeneratorConfig
from diffret.generator.features import load_split

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_speed  # noqa: E402


def test_load_split_keeps_words_in_the_cache_dtype(tmp_path):
    f = load_split(synthetic_cache(tmp_path / "c", n_train=6), "train")
    assert f.words.dtype == torch.float16  # the big one: 2 bytes a value, converted per batch
    for name in ("sentence", "word_logits", "frames", "frame_logits"):
        assert getattr(f, name).dtype == torch.float32, name
    assert f.word_mask.dtype == f.frame_mask.dtype == torch.bool


def test_shared_candidates_give_the_plain_step(tmp_path):
    f = load_split(synthetic_cache(tmp_path / "c", n_train=12, train_caps=2), "train")
    torch.manual_seed(0)
    cfg = GeneratorConfig(batch_size=8, candidates=5)
    t2v, v2t, *_ = trainer.build_models(f.width, cfg, "cpu")
    rows = torch.tensor([0, 3, 5, 8, 11, 14, 19, 22])
    cand_v, cand_t = trainer.batch_candidates(f, rows, 5)
    x = torch.randn(2, 8, 5)
    t = torch.randint(0, 50, (8,))
    plain = trainer.denoise_pairs(t2v, v2t, f, rows, cand_v, cand_t, x[0], x[1], t, shared=False)
    shared = trainer.denoise_pairs(t2v, v2t, f, rows, cand_v, cand_t, x[0], x[1], t, shared=True)
    reference = (t2v.reference_forward(x[0], t, f.sentence[rows], f.frames[cand_v], f.frame_mask[cand_v]),
                 v2t.reference_forward(x[1], t, f.sentence[cand_t], f.frames[f.caption_video[rows]],
                                       f.frame_mask[f.caption_video[rows]]))
    for a, b, c in zip(plain, shared, reference):
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-4)
    # and the gradients the step trains with agree too
    grads = []
    for mode in (False, True):
        t2v.zero_grad()
        v2t.zero_grad()
        out = trainer.denoise_pairs(t2v, v2t, f, rows, cand_v, cand_t, x[0], x[1], t, shared=mode)
        (out[0].square().sum() + out[1].square().sum()).backward()
        grads.append([p.grad.clone() for p in list(t2v.parameters()) + list(v2t.parameters())])
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(*grads))


@pytest.mark.slow
def test_train_speed_runs_at_a_tiny_size(tmp_path):
    out = tmp_path / "train.json"
    report = train_speed.main([
        "--device", "cpu", "--videos", "24", "--captions-per-video", "2", "--frames", "2", "--words", "8",
        "--width", "16", "--batch", "8", "--candidates", "4", "--max-steps", "2", "--noise-bank", "4",
        "--model", "tiny", "--baseline-videos", "1", "--baseline-steps", "1", "--baseline-warmup", "0",
        "--workdir", str(tmp_path), "--quiet", "--json", str(out)])
    assert out.is_file() and report["extrapolated"] is True
    tr = report["training"]
    assert tr["steps_timed"] == 2 and tr["steps_per_epoch"] == 6 and tr["captions"] == 48
    for key in ("seconds_per_step", "epoch_seconds", "setup_seconds", "peak_rss_gib", "rss_after_load_gib"):
        assert tr[key] > 0, key
    assert report["cache"]["build_seconds"] >= 0 and report["cache"]["bytes"] > 0
    base = report["baseline"]
    assert base["extrapolated"] is True and base["videos_through_clip"] == 1
    assert base["seconds_per_step"] > 0 and report["ratio"] > 0
    for key in ("machine", "date", "command", "settings", "peak_rss_gib"):
        assert key in report
    assert list(tmp_path.glob("train-speed-*")) == []  # temporary caches are removed
