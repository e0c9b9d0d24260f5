"""The stage-1 training recipe in isolation: losses, optimiser groups, schedule, gradient
checkpointing, frame slots beyond the text context. Tiny models, no videos."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffret.extract.config import ExtractConfig, recipe_mismatch
from diffret.extract.distributed import DistInfo, rank_slice
from diffret.extract.finetune import batch_loss, global_batch, make_optimizer, warmup_cosine
from diffret.extract.model import dual_softmax_loss, info_nce
from tiny_stage1 import tiny_batch, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_dual_softmax_loss_matches_its_definition():
    sim = torch.tensor([[0.30, 0.10, 0.25], [0.20, 0.28, 0.24], [0.26, 0.22, 0.27]])
    scale = torch.tensor(100.0)
    z = sim * scale
    t2v = z * torch.softmax(z / 1000, dim=0) * 3  # prior over texts, per video
    v2t = z.t() * torch.softmax(z.t() / 1000, dim=0) * 3  # prior over videos, per text
    target = torch.arange(3)
    expected = (F.cross_entropy(t2v, target) + F.cross_entropy(v2t, target)) / 2
    assert torch.allclose(dual_softmax_loss(sim, scale, 1000.0), expected)
    assert expected > 0.05 and not torch.allclose(dual_softmax_loss(sim, scale, 1000.0), info_nce(sim, scale))
    # an infinitely soft prior is a constant 1/B, times B: plain InfoNCE
    assert torch.allclose(dual_softmax_loss(sim, scale, 1e12), info_nce(sim, scale), atol=1e-5)


def test_optimizer_groups_betas_and_schedule():
    model = tiny_model()
    cfg = ExtractConfig(model="tiny", pretrained="none", lr=1e-4, clip_lr_scale=1e-3, recipe="modern")
    opt, sched = make_optimizer(model, cfg, total_steps=100)
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in opt.param_groups)
    by_lr = {}
    for g in opt.param_groups:
        lr = round(g["initial_lr"], 12)
        by_lr[lr] = by_lr.get(lr, 0) + sum(p.numel() for p in g["params"])
    new = sum(p.numel() for m in model.new_modules() for p in m.parameters())
    assert by_lr == {1e-4: new, 1e-7: sum(p.numel() for p in model.parameters()) - new}
    assert {g["weight_decay"] for g in opt.param_groups} == {0.2, 0.0}
    assert all(p.ndim < 2 for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"])
    f = warmup_cosine(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == 1.0 and f(10) == 1.0
    assert f(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90))) and f(99) < 0.001


def test_global_batch_and_slices():
    cfg = ExtractConfig(batch_size=128)
    assert global_batch(cfg, 10_000, 4) == 128 and global_batch(cfg, 50, 4) == 48 and global_batch(cfg, 1, 1) == 1
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        global_batch(cfg, 10_000, 3)
    parts = [rank_slice(10, DistInfo(r, 3)) for r in range(3)]
    assert [list(range(10))[s] for s in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_gradient_checkpointing_changes_nothing_but_memory():
    tokens, video, mask = tiny_batch()
    cfg = ExtractConfig(model="tiny", pretrained="none")
    valid = torch.ones(len(tokens), dtype=torch.bool)
    grads = []
    for ckpt in (False, True):
        model = tiny_model().train()
        model.set_grad_checkpointing(ckpt)
        assert model.clip.transformer.grad_checkpointing == ckpt and model.temporal.grad_checkpointing == ckpt
        loss = batch_loss(model, model, tokens, video, mask, valid, cfg, DistInfo(), amp=False)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert torch.allclose(l0, l1) and g0.keys() == g1.keys() and len(g0) > 50
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6), name


def test_failed_videos_are_left_out_of_the_loss():
    """A pair whose video failed to decode (all-False mask) neither scores nor gets a gradient."""
    tokens, video, mask = tiny_batch(n=4)
    cfg = ExtractConfig(model="tiny", pretrained="none")
    model = tiny_model()
    broken = mask.clone()
    broken[2] = False
    valid = broken.any(dim=1)
    loss = batch_loss(model, model, tokens, video, broken, valid, cfg, DistInfo(), amp=False)
    keep = [0, 1, 3]
    model2 = tiny_model()
    ref = batch_loss(model2, model2, tokens[keep], video[keep], mask[keep], valid[keep], cfg, DistInfo(), amp=False)
    assert torch.isfinite(loss) and torch.allclose(loss, ref, atol=1e-6)


def test_frames_beyond_the_text_context():
    """64 frame slots on a model with a 32-token text context: the first 32 positions come from
    CLIP's positional embedding, the rest start small; padded frames do not change the output."""
    model = tiny_model(frames=64).eval()
    pos = model.temporal.frame_position_embeddings.weight
    assert torch.equal(pos[:32], model.clip.positional_embedding) and pos[32:].std() < 0.05
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(1, 64, 3, 32, 32, generator=g)
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :40] = True
    with torch.no_grad():
        out = model.encode_video(frames, mask)["frames"]
        other = frames.clone()
        other[0, 40:] = torch.randn(24, 3, 32, 32, generator=g)
        again = model.encode_video(other, mask)["frames"]
    assert out.shape == (1, 64, 64) and torch.allclose(out[0, :40], again[0, :40], atol=1e-5)


def test_recipe_mismatch_names_the_field():
    a = ExtractConfig(lr=1e-4)
    assert recipe_mismatch(a.to_dict(), ExtractConfig(lr=1e-4, workers=7, device="cpu")) is None
    assert recipe_mismatch(a.to_dict(), ExtractConfig(lr=2e-4)) == "lr was 0.0001, now 0.0002"
    with pytest.raises(ValueError, match="unknown loss 'x'"):
        ExtractConfig(loss="x")


def test_stage1_step_benchmark_runs_on_cpu():
    """benchmarks/stage1_step.py (the GPU timing of one AMP step of ViT-B-32 at 128 x 12 x 224^2)
    runs the real train_step; here on a tiny model so that its code stays correct."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "stage1_step.py"
    spec = importlib.util.spec_from_file_location("stage1_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    report = bench.main(["--device", "cpu", "--model", "tiny", "--batch", "4", "--frames", "2", "--words", "8",
                         "--steps", "1", "--warmup", "1"])
    assert report["batch"] == 4 and report["frames"] == 2 and report["image_size"] == 32 and not report["amp"]
    assert report["seconds_per_step_median"] > 0 and report["peak_memory_gib"] > 0
    assert math.isfinite(report["last_loss"]) and report["last_loss"] > 0


def test_every_extract_option_shows_its_default():
    from click.testing import CliRunner

    from diffret.pipeline.cli import main

    out = CliRunner().invoke(main, ["extract", "--help"], terminal_width=200).output
    options = []  # each option's text: its line and the wrapped lines of its help below it
    for line in out.splitlines():
        if line.startswith("  --"):
            options.append(line)
        elif options and line.startswith("    "):
            options[-1] += " " + line.strip()
    options = [o for o in options if not o.startswith("  --help")]
    assert len(options) >= 25
    for line in options:
        assert "[default:" in line or "[required]" in line, line
    for flag in ("--loss [infonce|dsl]", "--grad-checkpointing", "--resume", "--stage1", "--video-dir"):
        assert flag in out
