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


@pytest.mark.slow
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


def _interrupt_in_epoch_2(monkeypatch):
    """Make the next training stop in its second epoch (3 steps an epoch), as a crash would."""
    real, calls = trainer.batch_loss, {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(trainer, "batch_loss", flaky)
    return lambda: monkeypatch.setattr(trainer, "batch_loss", real)


@pytest.mark.parametrize("recipe", ["original", "modern"])
@pytest.mark.slow
def test_resume_equals_an_uninterrupted_run(syn, tmp_path, monkeypatch, recipe):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli("train-generator", "--cache", syn, "--out", straight, "--epochs", 3, *FAST, "--recipe", recipe)
    if recipe == "original":  # the lr schedule spans all epochs: an interrupted 3-epoch run
        restore = _interrupt_in_epoch_2(monkeypatch)
        run_cli("train-generator", "--cache", syn, "--out", resumed, "--epochs", 3, *FAST, ok=False)
        restore()
        r = run_cli("train-generator", "--cache", syn, "--out", resumed, "--resume")
    else:  # a constant lr: a 1-epoch run extended to 3 is the same run
        run_cli("train-generator", "--cache", syn, "--out", resumed, "--epochs", 1, *FAST, "--recipe", recipe)
        r = run_cli("train-generator", "--cache", syn, "--out", resumed, "--epochs", 3, "--resume")
    assert "resuming" in r.output and "after epoch 1 of 3" in " ".join(r.output.split())
    a, b = _weights(straight), _weights(resumed)
    for d in ("t2v", "v2t"):
        for k in a[d]:
            assert torch.equal(a[d][k], b[d][k]), (d, k)
    assert a["meta"]["history"] == b["meta"]["history"] and b["meta"]["epochs_done"] == 3
    assert b["meta"]["config"]["recipe"] == recipe  # resume keeps the saved recipe
    r = run_cli("train-generator", "--cache", syn, "--out", resumed, "--resume", "--epochs", 4, "--recipe",
                "modern" if recipe == "original" else "original", ok=False)
    assert r.exit_code == 1 and "cannot change recipe" in r.output
    # a finished run resumed again trains nothing; changing a fixed setting is refused in one line
    r = run_cli("train-generator", "--cache", syn, "--out", resumed, "--resume")
    assert "already has 3 epochs" in " ".join(r.output.split())
    r = run_cli("train-generator", "--cache", syn, "--out", resumed, "--resume", "--steps", 20, ok=False)
    assert r.exit_code == 1 and "cannot change steps" in r.output and r.output.strip().count("\n") == 0
    r = run_cli("train-generator", "--cache", syn, "--out", tmp_path / "none", "--resume", ok=False)
    assert r.exit_code == 1 and "nothing to resume" in r.output


@pytest.mark.slow
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


@pytest.mark.slow
def test_original_recipe_optimiser_schedule_and_init(syn, tmp_path):
    """The default recipe is the original's: BertAdam over both denoisers (decay 0.2 on weights, 0 on
    biases, betas 0.9/0.98, eps 1e-6, 10% warm-up then warmup_cosine over every step of every epoch),
    N(0, 0.02) weights and zero biases; --recipe modern is AdamW at a constant lr with PyTorch's init."""
    from diffret.generator.bert_adam import BertAdam
    from diffret.generator.config import GeneratorConfig
    from diffret.generator.denoiser import PositionalEncoding

    torch.manual_seed(0)
    t2v, v2t, params, opt, _ = trainer.build_models(64, GeneratorConfig(), "cpu", total_steps=40)
    assert isinstance(opt, BertAdam)
    g = {grp["weight_decay"]: grp for grp in opt.param_groups}
    assert set(g) == {0.2, 0.0}
    for grp in opt.param_groups:
        assert (grp["lr"], grp["b1"], grp["b2"], grp["e"], grp["warmup"], grp["t_total"], grp["schedule"],
                grp["max_grad_norm"]) == (1e-4, 0.9, 0.98, 1e-6, 0.1, 40, "warmup_cosine", 1.0)
    assert all(p.ndim == 2 for p in g[0.2]["params"]) and all(p.ndim == 1 for p in g[0.0]["params"])
    assert len(g[0.2]["params"]) + len(g[0.0]["params"]) == len(params) == 26
    for m in (t2v, v2t):
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                assert (p == 0).all(), name
            else:
                assert abs(p.std().item() - 0.02) < 0.004 and abs(p.mean().item()) < 0.005, name
        assert torch.equal(m.sequence_pos_encoder.pe, PositionalEncoding(64).pe)  # the fixed table is untouched

    torch.manual_seed(0)
    t2v, _, _, opt, _ = trainer.build_models(64, GeneratorConfig(recipe="modern"), "cpu", total_steps=40)
    assert type(opt) is torch.optim.AdamW
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["weight_decay"] == 0.0
    assert t2v.proj.bias.abs().sum() > 0 and t2v.decoder[0].weight.std() > 0.02  # PyTorch's default init

    # training: the schedule's length is every step of every epoch, recorded with the recipe
    out = tmp_path / "gen"
    run_cli("train-generator", "--cache", syn, "--out", out, "--epochs", 2, *FAST)
    state = torch.load(out / "train_state.pt", weights_only=False)
    assert state["config"]["recipe"] == "original" and state["config"]["weight_decay"] is None
    assert {grp["t_total"] for grp in state["optimizer"]["param_groups"]} == {2 * 3}  # 24 captions / 8 a batch
    assert {s["step"] for s in state["optimizer"]["state"].values()} == {6}
    assert json.loads((out / "generator.json").read_text())["config"]["recipe"] == "original"


def test_configs_written_before_the_recipe_read_as_modern():
    from diffret.generator.config import GeneratorConfig

    old = GeneratorConfig().to_dict()
    del old["recipe"]
    old["weight_decay"] = 0.0
    assert GeneratorConfig.from_dict(old).recipe == "modern" and GeneratorConfig.from_dict(old).decay() == 0.0
    assert GeneratorConfig().decay() == 0.2 and GeneratorConfig(recipe="modern").decay() == 0.0
    with pytest.raises(ValueError, match="recipe"):
        GeneratorConfig(recipe="bert").validate()


def test_configs_written_with_steps_read_as_train_steps():
    """generator.json and train_state.pt written before the rename keep their T."""
    from diffret.generator.config import GeneratorConfig

    old = GeneratorConfig().to_dict()
    old["steps"] = old.pop("train_steps") // 5
    assert GeneratorConfig.from_dict(old) == GeneratorConfig(train_steps=10)
    with pytest.raises(ValueError, match="^steps must be at least 1"):
        GeneratorConfig(train_steps=0).validate()
