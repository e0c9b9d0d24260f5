"""Stage one's `--recipe original` (extract/recipe.py, pipeline/recipes.py) on a tiny model: BertAdam's
arithmetic against a hand computation of the original's formula, float16 rounding of CLIP's updates
(and that it is the arithmetic of real float16 tensors), conv1 frozen, the name-based decay groups."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from diffret.extract.config import ExtractConfig, recipe_mismatch
from diffret.extract.distributed import DistInfo
from diffret.extract.finetune import train_step
from diffret.extract.recipe import (
    Float16Weights, Hooks, RecipeError, freeze, half_parameters, lr_groups, make_optimizer)
from diffret.generator.bert_adam import BertAdam
from diffret.pipeline.recipes import stage1_bert_adam, stage1_hooks

import tiny_stage1
from tiny_stage1 import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

HOOKS = Hooks(optimizer=stage1_bert_adam)


def tiny_batch(n: int = 4, frames: int = 4, words: int = 8, seed: int = 1):
    """tiny_stage1's batch, every frame and video valid: -> tokens, video, frame mask, video valid."""
    tokens, video, mask = tiny_stage1.tiny_batch(n, frames, words, seed, short_first=False)
    return tokens, video, mask, torch.ones(n, dtype=torch.bool)


def setup(recipe="original", lr=1e-2, clip_lr_scale=0.1, total=10, **kw):
    """A tiny model prepared as finetune() prepares it -> (model, cfg, opt, sched, half, scaler)."""
    model = tiny_model()
    cfg = ExtractConfig(model="tiny", pretrained="none", lr=lr, clip_lr_scale=clip_lr_scale, recipe=recipe, **kw)
    freeze(model, recipe)
    half = Float16Weights(half_parameters(model.clip), torch.device("cpu")) if recipe == "original" else None
    opt, sched = make_optimizer(model, cfg, total, HOOKS, half)
    return model, cfg, opt, sched, half, torch.amp.GradScaler("cuda", enabled=False)


def step(model, cfg, opt, sched, half, scaler, seed=1):
    train_step(model, model, opt, scaler, tiny_batch(seed=seed), cfg, DistInfo(), False, half)
    if sched is not None:
        sched.step()


def r16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(t.dtype)


def test_decay_groups_follow_the_original_name_rule():
    model = tiny_model()
    cfg = ExtractConfig(model="tiny", pretrained="none", lr=1e-4, clip_lr_scale=1e-3)
    freeze(model, "original")
    opt = stage1_bert_adam(lr_groups(model, cfg), cfg, 100)
    assert isinstance(opt, BertAdam) and len(opt.param_groups) == 4
    name = {id(p): n for n, p in model.named_parameters()}
    decayed = {name[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.2 for p in g["params"]}
    plain = {name[id(p)] for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert all("bias" in n for n in plain) and not any("bias" in n for n in decayed)
    # embeddings, logit_scale, projections and the ln_* weights are decayed (the modern recipe spares 1-d ones)
    for n in ("clip.token_embedding.weight", "clip.positional_embedding", "clip.logit_scale", "clip.text_projection",
              "clip.visual.class_embedding", "clip.visual.ln_pre.weight", "temporal.frame_position_embeddings.weight",
              "temporal.blocks.0.ln_1.weight"):
        assert n in decayed, n
    assert "clip.visual.conv1.weight" not in decayed | plain  # frozen: in no group
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable
    lrs = {round(g["lr"], 12) for g in opt.param_groups}
    assert lrs == {1e-4, 1e-7}
    clip_ids = {id(p) for p in model.clip.parameters()}
    for g in opt.param_groups:
        assert all((id(p) in clip_ids) == (round(g["lr"], 12) == 1e-7) for p in g["params"])
        assert (g["b1"], g["b2"], g["e"], g["schedule"], g["warmup"], g["t_total"], g["max_grad_norm"]) == (
            0.9, 0.98, 1e-6, "warmup_cosine", 0.1, 100, 1.0)


def test_conv1_frozen_only_by_the_original_recipe():
    for recipe, trained in (("original", False), ("modern", True)):
        model, cfg, opt, sched, half, scaler = setup(recipe, total=4)
        before = model.clip.visual.conv1.weight.detach().clone()
        for s in range(3):
            step(model, cfg, opt, sched, half, scaler, seed=s)
        assert model.clip.visual.conv1.weight.requires_grad == trained
        assert (not torch.equal(model.clip.visual.conv1.weight, before)) == trained, recipe


def test_original_step_is_the_hand_computed_formula():
    """Step 0 has lr 0 (warmup_cosine at progress 0); step 1 (progress 0.1, past the 10% warm-up) has
    lr 0.5 (1 + cos(0.1 pi)) x the group's lr; m, v without bias correction; decay on p; CLIP's
    values rounded to float16."""
    model, cfg, opt, sched, half, scaler = setup("original", lr=1e-2, clip_lr_scale=0.1, total=10)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, cfg, opt, sched, half, scaler, seed=1)
    for n, p in model.named_parameters():  # lr 0: only the moments moved (BertAdam's first update)
        assert torch.equal(p, start[n]), n
    params = dict(model.named_parameters())
    watch = ["clip.transformer.resblocks.0.mlp.c_fc.weight", "clip.logit_scale", "clip.visual.ln_pre.bias",
             "text_weight_fc.0.weight", "temporal.blocks.0.attn.in_proj_bias"]
    updated = {n: half.target(params[n]) for n in watch}  # CLIP's: the float16 copies BertAdam updates
    before = {n: (q.detach().clone(), opt.state[q]["next_m"].clone(), opt.state[q]["next_v"].clone())
              for n, q in updated.items()}
    step(model, cfg, opt, sched, half, scaler, seed=2)
    factor = 0.5 * (1 + math.cos(math.pi * 0.1))
    for n in watch:
        q, (p0, m0, v0) = updated[n], before[n]
        g = q.grad  # as BertAdam used it: float16 for CLIP's float16 weights, clipped per tensor in place
        group = next(gr for gr in opt.param_groups if any(x is q for x in gr["params"]))
        lr = 1e-3 if n.startswith("clip.") else 1e-2
        assert group["lr"] == pytest.approx(lr) and group["weight_decay"] == (0.0 if "bias" in n else 0.2)
        # the original's update, op by op in the tensor's own dtype (float16 rounds after each op)
        m = m0.mul(0.9).add(g, alpha=0.1)
        v = v0.mul(0.98).addcmul(g, g, value=0.02)
        u = (m / (v.sqrt() + 1e-6)).add(p0, alpha=group["weight_decay"])
        want = p0.add(u, alpha=-group["lr"] * factor)
        assert torch.equal(q, want), n
        assert torch.equal(params[n], want.float()), n  # the model's float32 weight holds the result exactly
        assert q.dtype == (torch.float16 if q is not params[n] else torch.float32), n
        assert not torch.equal(q, p0), n


def test_modern_recipe_is_adamw_with_its_own_schedule():
    model, cfg, opt, sched, half, scaler = setup("modern", total=10)
    assert isinstance(opt, torch.optim.AdamW) and half is None and sched is not None
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, cfg, opt, sched, half, scaler)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) > 0.9 * len(start)  # the modern warm-up starts at lr / w, not 0
    assert not all(torch.equal(p, r16(p)) for p in half_parameters(model.clip))


def test_clip_updates_round_to_float16_and_mostly_round_away_at_the_original_lr():
    """At lr 1e-4 x 1e-3 = 1e-7, most of CLIP's float16 weights do not change in an update; the new
    modules (float32) all do. Weights outside convert_weights' set (LayerNorm, embeddings) stay float32."""
    model, cfg, opt, sched, half, scaler = setup("original", lr=1e-4, clip_lr_scale=1e-3, total=10)
    halves = half_parameters(model.clip)
    assert all(torch.equal(p, r16(p)) for p in halves)
    names = {id(p): n for n, p in model.clip.named_parameters()}
    assert {names[id(p)] for p in halves} >= {"text_projection", "visual.proj", "visual.conv1.weight"}
    assert not any("ln_" in names[id(p)] or "embedding" in names[id(p)] or "logit" in names[id(p)] for p in halves)
    step(model, cfg, opt, sched, half, scaler, seed=1)  # lr 0
    before = [p.detach().clone() for p in halves]
    new_before = [p.detach().clone() for m in model.new_modules() for p in m.parameters()]
    step(model, cfg, opt, sched, half, scaler, seed=2)
    assert all(torch.equal(p, r16(p)) for p in halves)
    same = sum(int((p == b).sum()) for p, b in zip(halves, before)) / sum(p.numel() for p in halves)
    assert same > 0.5, same
    new_after = [p for m in model.new_modules() for p in m.parameters()]
    assert sum(int((p != b).sum()) for p, b in zip(new_after, new_before)) > 0.9 * sum(p.numel() for p in new_after)


def test_cpu_rounding_is_the_arithmetic_of_float16_tensors():
    """The CPU emulation (float32 weights, BertAdam on their float16 copies) against BertAdam on
    float16 weights (how a GPU runs the original): bit for bit, also where g^2 underflows (|g| ~1e-4)."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 64, generator=g) * 0.05).half()
    grads = [(torch.randn(64, 64, generator=g) * 10 ** -(2 + i % 3)).half() for i in range(6)]
    kw = dict(lr=1e-3, warmup=0.1, t_total=6, schedule="warmup_cosine", b1=0.9, b2=0.98, e=1e-6, weight_decay=0.2)
    native = torch.nn.Parameter(w.clone())
    emulated = torch.nn.Parameter(w.float())
    half = Float16Weights([emulated], torch.device("cpu"))
    opt_n, opt_e = BertAdam([native], **kw), BertAdam([half.target(emulated)], **kw)
    for gr in grads:
        native.grad, emulated.grad = gr.clone(), gr.float()
        opt_n.step()
        half.before_step()
        opt_e.step()
        half.after_step(opt_e)
        assert torch.equal(native.float(), emulated) and torch.equal(opt_n.state[native]["next_v"],
                                                                    opt_e.state[half.target(emulated)]["next_v"])
    assert not torch.equal(native.float(), w.float())


def test_native_float16_weights_convert_back_losslessly():
    model = tiny_model()
    halves = half_parameters(model.clip)
    rounded = [r16(p.detach()) for p in halves]
    h = Float16Weights(halves, torch.device("cuda"))
    assert all(h.target(p) is p for p in halves)  # what a GPU does (here on CPU tensors: no forward)
    assert all(p.dtype == torch.float16 for p in halves)
    h.to_float32()
    assert all(p.dtype == torch.float32 and torch.equal(p, r) for p, r in zip(halves, rounded))


def test_the_original_recipe_needs_its_optimiser_and_is_the_default():
    assert ExtractConfig().recipe == "original" and stage1_hooks().optimizer is stage1_bert_adam
    model = tiny_model()
    with pytest.raises(RecipeError, match="needs BertAdam"):
        make_optimizer(model, ExtractConfig(model="tiny", pretrained="none"), 10, None)
    with pytest.raises(ValueError, match="unknown recipe"):
        ExtractConfig(recipe="new")


def test_a_config_written_before_the_recipe_switch_was_the_modern_recipe():
    cfg = ExtractConfig(model="tiny", pretrained="none")
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("recipe", "select_on", "val_fraction", "eval_every", "ema")}
    assert recipe_mismatch(old, cfg) == "recipe was 'modern', now 'original'"
    assert recipe_mismatch(old, replace(cfg, recipe="modern")) is None
    # the selection settings count only when both select on validation
    assert recipe_mismatch(replace(cfg, val_fraction=0.3).to_dict(), cfg) is None
    val = replace(cfg, select_on="val")
    assert recipe_mismatch(replace(val, val_fraction=0.3).to_dict(), val) == "val_fraction was 0.3, now 0.1"


def test_model_gradients_start_afresh_every_step_with_float16_copies():
    """The optimiser holds CLIP's float16 copies on a CPU, so zeroing its gradients alone would let the
    model's own float32 gradients add up over steps: each step's are its batch's alone."""
    import copy

    from diffret.extract.finetune import batch_loss

    model, cfg, opt, sched, half, scaler = setup("original", total=10, grad_clip=1e9)  # gradients as backward leaves them
    step(model, cfg, opt, sched, half, scaler, seed=1)
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    batch_loss(ref, ref, *tiny_batch(seed=2), cfg=cfg, info=DistInfo(), amp=False).backward()
    step(model, cfg, opt, sched, half, scaler, seed=2)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for n, p in model.named_parameters():
        assert (p.grad is None) == (grads[n] is None), n
        if p.grad is not None:
            assert torch.allclose(p.grad, grads[n], rtol=1e-5, atol=1e-8), n
