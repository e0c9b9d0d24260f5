"""BertAdam (generator/bert_adam.py) as the original's models/optimization.py updates: a two-step
update worked out by hand, many steps against the original's update equations re-stated here,
its warmup_cosine schedule, and the original's no-decay name rule on the denoisers."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from diffret.generator.bert_adam import BertAdam, decay_groups, warmup_constant, warmup_cosine, warmup_linear
from diffret.generator.denoiser import T2VDenoiser


def test_warmup_cosine_runs_over_the_total_progress():
    assert warmup_cosine(0.0, 0.1) == 0.0
    assert warmup_cosine(0.05, 0.1) == pytest.approx(0.5)
    # after the warm-up the cosine is of the total progress x, not of (x - w) / (1 - w)
    assert warmup_cosine(0.1, 0.1) == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))  # 0.9755, not 1
    assert warmup_cosine(0.25, 0.1) == pytest.approx(0.8535533905932737)
    assert warmup_cosine(1.0, 0.1) == pytest.approx(0.0, abs=1e-12)
    assert warmup_constant(0.5, 0.1) == 1.0 and warmup_linear(0.55, 0.1) == pytest.approx(0.5)


def _params():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    b = torch.nn.Parameter(torch.tensor([0.3], dtype=torch.float64))
    big = torch.nn.Parameter(torch.tensor([0.5, 0.5], dtype=torch.float64))
    return w, b, big


def test_two_steps_by_hand():
    """lr 0.1, t_total 4, warmup 0.1: step 1 at progress 0 has lr 0; step 2 at progress 1/4 has
    lr 0.1 * 0.5 (1 + cos(pi / 4)). b1 0.9, b2 0.98, e 1e-6, decay 0.2 on `w` and `big` only; `big`'s
    first gradient (norm 5) is clipped to norm 1 / (1 + 1e-6)."""
    w, b, big = _params()
    opt = BertAdam([{"params": [w, big], "weight_decay": 0.2}, {"params": [b], "weight_decay": 0.0}], lr=0.1,
                   warmup=0.1, t_total=4, schedule="warmup_cosine", b1=0.9, b2=0.98, e=1e-6, weight_decay=0.2,
                   max_grad_norm=1.0)
    grads = [([0.5, -0.1], [0.5], [3.0, 4.0]), ([0.2, 0.3], [-0.4], [0.0, 0.6])]
    lr2 = 0.1 * 0.5 * (1 + math.cos(math.pi / 4))
    for i, (gw, gb, gbig) in enumerate(grads):
        for p, g in ((w, gw), (b, gb), (big, gbig)):
            p.grad = torch.tensor(g, dtype=torch.float64)
        assert opt.get_lr() == ([0.0] if i == 0 else pytest.approx([lr2] * 3))
        opt.step()
        if i == 0:  # lr 0: nothing moves, the moments fill
            assert w.tolist() == [1.0, -2.0] and b.tolist() == [0.3] and big.tolist() == [0.5, 0.5]
            assert opt.state[w]["next_m"].tolist() == pytest.approx([0.05, -0.01])
            assert opt.state[w]["next_v"].tolist() == pytest.approx([0.005, 0.0002])
            assert torch.linalg.vector_norm(big.grad).item() == pytest.approx(1.0, abs=1e-6)  # clipped in place
    # m2 = 0.9 m1 + 0.1 g2, v2 = 0.98 v1 + 0.02 g2^2, p2 = p - lr2 (m2 / (sqrt(v2) + e) + wd p)
    m2, v2 = torch.tensor([0.065, 0.021]), torch.tensor([0.0057, 0.001996])
    by_formula = torch.tensor([1.0, -2.0]) - lr2 * (m2 / (v2.sqrt() + 1e-6) + 0.2 * torch.tensor([1.0, -2.0]))
    assert w.tolist() == pytest.approx(by_formula.tolist(), abs=1e-7)
    assert w.tolist() == pytest.approx([0.9094435650, -2.0059777787], abs=1e-9)
    assert b.tolist() == pytest.approx([0.2952580894], abs=1e-9)  # no decay on the bias
    assert big.tolist() == pytest.approx([0.4365938299, 0.4112811582], abs=1e-9)
    assert all(opt.state[p]["step"] == 2 for p in (w, b, big))


def _original_update(params, grads_per_step, groups, lr, warmup, t_total, b1, b2, e, max_grad_norm):
    """The original BertAdam.step (DiffusionRet/models/optimization.py) re-stated on plain tensors:
    per tensor, clip_grad_norm_(p, max_grad_norm); next_m = b1 next_m + (1 - b1) g;
    next_v = b2 next_v + (1 - b2) g^2; update = next_m / (sqrt(next_v) + e) (+ wd p);
    lr_scheduled = lr * warmup_cosine(step / t_total, warmup); p -= lr_scheduled * update; step += 1."""
    p = [x.detach().clone() for x in params]
    m = [torch.zeros_like(x) for x in p]
    v = [torch.zeros_like(x) for x in p]
    for step, grads in enumerate(grads_per_step):
        for i, g in enumerate(grads):
            g = g.clone()
            norm = g.norm(2)
            g = g * min(1.0, max_grad_norm / (norm.item() + 1e-6))
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            update = m[i] / (v[i].sqrt() + e)
            if groups[i] > 0:
                update = update + groups[i] * p[i]
            x = step / t_total
            sched = x / warmup if x < warmup else 0.5 * (1.0 + math.cos(math.pi * x))
            p[i] = p[i] - lr * sched * update
    return p


def test_matches_the_original_update_over_many_steps():
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(2, 2, generator=g, dtype=torch.float64))]
    decay = [0.2, 0.0, 0.2]
    steps = 30  # past t_total: the cosine rises again, as the original's does
    grads = [[(1 + 3 * (s % 4)) * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
             for s in range(steps)]
    want = _original_update(params, grads, decay, lr=1e-2, warmup=0.1, t_total=25, b1=0.9, b2=0.98, e=1e-6,
                            max_grad_norm=1.0)
    groups = [{"params": [params[0], params[2]], "weight_decay": 0.2}, {"params": [params[1]], "weight_decay": 0.0}]
    opt = BertAdam(groups, lr=1e-2, warmup=0.1, t_total=25, schedule="warmup_cosine", b1=0.9, b2=0.98, e=1e-6,
                   weight_decay=0.2, max_grad_norm=1.0)
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = gr.clone()
        opt.step()
    for ours, theirs in zip(params, want):
        torch.testing.assert_close(ours.detach(), theirs, atol=1e-12, rtol=1e-12)
    # a constant lr without t_total; a parameter without a gradient is skipped (its step stays)
    q = torch.nn.Parameter(torch.ones(2))
    idle = torch.nn.Parameter(torch.ones(2))
    opt = BertAdam([q, idle], lr=0.5, b1=0.0, b2=0.0, e=0.0, weight_decay=0.0, max_grad_norm=-1)
    q.grad = torch.tensor([2.0, -3.0])
    opt.step()
    assert q.tolist() == [0.5, 1.5] and idle.tolist() == [1.0, 1.0] and not opt.state[idle]


def test_state_dict_round_trip_continues_identically():
    g = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.randn(4, generator=g))
    b = torch.nn.Parameter(a.detach().clone())
    kw = dict(lr=1e-2, warmup=0.1, t_total=10, schedule="warmup_cosine", b1=0.9, b2=0.98, e=1e-6, weight_decay=0.2)
    oa, ob = BertAdam([a], **kw), BertAdam([b], **kw)
    grads = [torch.randn(4, generator=g) for _ in range(6)]
    for i, gr in enumerate(grads):
        a.grad = gr.clone()
        oa.step()
        if i == 2:
            ob = BertAdam([b], **{**kw, "t_total": 99})
            b.data.copy_(a.data)
            ob.load_state_dict(copy.deepcopy(oa.state_dict()))  # as if saved and read back; restores t_total
    for gr in grads[3:]:
        b.grad = gr.clone()
        ob.step()
    assert torch.equal(a, b)


def test_bad_settings_raise():
    p = [torch.nn.Parameter(torch.ones(1))]
    for bad in (dict(lr=-1), dict(lr=1, schedule="cosine"), dict(lr=1, warmup=1.0), dict(lr=1, b2=1.0),
                dict(lr=1, e=-1)):
        with pytest.raises(ValueError):
            BertAdam(p, **bad)


def test_decay_groups_follow_the_original_names():
    """no_decay = ['bias', 'LayerNorm.bias', 'LayerNorm.weight'] as substrings (main_retrieval.py
    prep_optimizer): on a denoiser every Linear weight decays, every bias does not."""
    model = T2VDenoiser(8)
    decay, rest = decay_groups(model.named_parameters(), 0.2)
    names = {id(p): n for n, p in model.named_parameters()}
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.2, 0.0)
    assert sorted(names[id(p)] for p in decay["params"]) == sorted(
        ["q_proj.weight", "k_proj.weight", "v_proj.weight", "proj.weight", "embed_timestep.time_embed.0.weight",
         "embed_timestep.time_embed.2.weight", "decoder.0.weight", "decoder.2.weight"])
    assert sorted(names[id(p)] for p in rest["params"]) == sorted(
        ["proj.bias", "embed_timestep.time_embed.0.bias", "embed_timestep.time_embed.2.bias", "decoder.0.bias",
         "decoder.2.bias"])
    ln = torch.nn.ModuleDict({"LayerNorm": torch.nn.LayerNorm(3), "ln_1": torch.nn.LayerNorm(3)})
    decay, rest = decay_groups(ln.named_parameters(), 0.2)
    # only the literal name "LayerNorm" escapes decay: a LayerNorm called ln_1 has its weight decayed
    assert len(decay["params"]) == 1 and decay["params"][0] is ln["ln_1"].weight and len(rest["params"]) == 3
