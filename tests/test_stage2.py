"""Stage-2 training: candidates (in-batch and mined from the cache), the options, atomic
per-epoch checkpoints, NaN stops, and --resume giving the same weights as an uninterrupted run."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from synthetic_cache import synthetic_cache

from diffret.cache.wti import wti_similarity
from diffret.generator import trainer
from diffret.generator.candidates import mine_cache_negatives, paired_wti
from diffret.generator.features import load_split

FAST = ["--batch-size", 8, "--candidates", 4, "--steps", 10, "--lr", "1e-3"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    return synthetic_cache(tmp_path_factory.mktemp("syn") / "cache", n_train=12, train_caps=2)


def test_paired_wti_is_the_cache_formula(syn):
    f = load_split(syn, "train")
    full = wti_similarity(f.words, f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits)
    cand = torch.tensor([[0, 3, 5], [1, 1, 7], [11, 2, 0]])  # 3 captions x 3 videos each
    rows = torch.tensor([0, 5, 9])
    got = paired_wti(f.words[rows], f.word_mask[rows], f.word_logits[rows], f.frames[cand], f.frame_mask[cand],
                     f.frame_logits[cand])
    assert torch.allclose(got, full[rows[:, None], cand], atol=1e-5)
    caps = torch.tensor([[0, 4, 8], [2, 3, 23]])  # 2 videos x 3 captions each
    vids = torch.tensor([6, 1])
    got = paired_wti(f.words[caps], f.word_mask[caps], f.word_logits[caps], f.frames[vids], f.frame_mask[vids],
                     f.frame_logits[vids])
    assert torch.allclose(got, full[caps, vids[:, None]], atol=1e-5)


def test_cache_negatives_are_the_hardest_other_videos(syn):
    f = load_split(syn, "train")
    full = wti_similarity(f.words, f.word_mask, f.word_logits, f.frames, f.frame_mask, f.frame_logits)
    video_pool, caption_pool = mine_cache_negatives(f, k=5, pool_factor=100)  # pool covers the split: exact
    assert video_pool.shape == (24, 4) and caption_pool.shape == (12, 4)
    for c in range(24):
        own = f.caption_video[c].item()
        want = full[c].clone()
        want[own] = float("-inf")
        assert video_pool[c].tolist() == want.topk(4).indices.tolist()
    for v in range(12):
        want = full[:, v].masked_fill(f.caption_video == v, float("-inf"))
        assert caption_pool[v].tolist() == want.topk(4).indices.tolist()
        assert (f.caption_video[caption_pool[v]] != v).all()
    # a small pool (pre-filtered by the global score) still never returns the query's own video
    vp, cp = mine_cache_negatives(f, k=3, pool_factor=1)
    assert (vp != f.caption_video[:, None]).all() and (f.caption_video[cp] != torch.arange(12)[:, None]).all()


def test_options_are_recorded_and_cache_negatives_train(syn, tmp_path):
    out = tmp_path / "gen"
    run_cli("train-generator", "--cache", syn, "--out", out, "--epochs", 1, *FAST, "--schedule", "linear",
            "--beta-scale", "0.5", "--loss", "mse", "--x0", "pm1", "--negatives", "cache", "--ema", "0.9")
    meta = json.loads((out / "generator.json").read_text())
    cfg = meta["config"]
    assert (cfg["schedule"], cfg["beta_scale"], cfg["loss"], cfg["x0"], cfg["negatives"], cfg["ema"]) == \
        ("linear", 0.5, "mse", "pm1", "cache", 0.9)
    assert meta["width"] == 16 and meta["parameters"]["t2v"] == 10 * 16**2 + 7 * 16 + 1
    assert meta["epochs_done"] == 1 and len(meta["history"]) == 1
    assert (out / "train_state.pt").is_file()


def _weights(folder):
    return torch.load(folder / "generator.pt", weights_only=False)


def test_resume_equals_an_uninterrupted_run(syn, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train-generator", "--cache", syn, "--out", straight, "--epochs", 3, *FAST)
    run_cli("train-generator", "--cache", syn, "--out", resumed, "--epochs", 1, *FAST)
    r = run_cli("train-generator", "--cache", syn, "--out", resumed, "--epochs", 3, "--resume")
    assert "resuming" in r.output and "after epoch 1 of 3" in " ".join(r.output.split())
    a, b = _weights(straight), _weights(resumed)
    for d in ("t2v", "v2t"):
        for k in a[d]:
            assert torch.equal(a[d][k], b[d][k]), (d, k)
    assert a["meta"]["history"] == b["meta"]["history"] and b["meta"]["epochs_done"] == 3
    # a finished run resumed again trains nothing; changing a fixed setting is refused in one line
    r = run_cli("train-generator", "--cache", syn, "--out", resumed, "--resume")
    assert "already has 3 epochs" in " ".join(r.output.split())
    r = run_cli("train-generator", "--cache", syn, "--out", resumed, "--resume", "--steps", 20, ok=False)
    assert r.exit_code == 1 and "cannot change steps" in r.output and r.output.strip().count("\n") == 0
    r = run_cli("train-generator", "--cache", syn, "--out", tmp_path / "none", "--resume", ok=False)
    assert r.exit_code == 1 and "nothing to resume" in r.output


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(syn, tmp_path, monkeypatch):
    out = tmp_path / "gen"
    real, calls = trainer.batch_loss, {"n": 0}

    def flaky(*args, **kwargs):  # 3 steps an epoch (24 captions / 8): NaN in the second epoch
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(trainer, "batch_loss", flaky)
    r = run_cli("train-generator", "--cache", syn, "--out", out, "--epochs", 3, *FAST, ok=False)
    errors = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert r.exit_code == 1 and len(errors) == 1  # one line (after the progress bar's last state)
    assert "nan at epoch 2 step 2" in errors[0] and "epoch 1" in r.output and "--resume" in r.output
    kept = _weights(out)
    assert kept["meta"]["epochs_done"] == 1
    assert all(torch.isfinite(v).all() for v in kept["t2v"].values())
    monkeypatch.setattr(trainer, "batch_loss", real)
    run_cli("train-generator", "--cache", syn, "--out", out, "--resume")
    assert _weights(out)["meta"]["epochs_done"] == 3
