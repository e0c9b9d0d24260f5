"""What `diffret extract` hands stage one's fine-tuning (extract/recipe.py `Hooks`).

extract/ may not import generator/ (DESIGN's dependency direction) but the original stage-one recipe
trains with the same BertAdam as stage two (generator/bert_adam.py, the one copy of its formula and
of the original's no-decay name rule); pipeline/ may import both, so it builds the optimiser here and
hands it in as a callable, with the validation selector of `--select-on val` (pipeline/selection.py).
"""
from __future__ import annotations

from diffret.extract.recipe import Hooks
from diffret.generator.bert_adam import BertAdam, decay_groups


def stage1_bert_adam(lr_groups, cfg, total_steps: int) -> BertAdam:
    """The original's `prep_optimizer` for stage one: lr_groups [(named parameters, lr)] (CLIP's and the
    new modules', extract/recipe.py lr_groups) -> BertAdam over four groups, each lr group split by the
    name rule (decay_groups: names with `bias` / `LayerNorm.bias` / `LayerNorm.weight` undecayed, every
    other weight decayed by cfg.weight_decay); warmup_cosine over `total_steps` with cfg.warmup, betas
    cfg.adam_betas, eps cfg.adam_eps, per-tensor clipping at cfg.grad_clip (the original: 1.0)."""
    groups = []
    for named, lr in lr_groups:
        for g in decay_groups(named, cfg.weight_decay):
            if g["params"]:
                groups.append({**g, "lr": lr})
    b1, b2 = cfg.adam_betas
    return BertAdam(groups, lr=cfg.lr, warmup=cfg.warmup, t_total=max(1, total_steps), schedule="warmup_cosine",
                    b1=b1, b2=b2, e=cfg.adam_eps, weight_decay=cfg.weight_decay, max_grad_norm=cfg.grad_clip)


def stage1_hooks() -> Hooks:
    """The hooks `diffret extract` (and the benchmarks) pass to extract.stage1.run_stage1."""
    from .selection import stage1_selector

    return Hooks(optimizer=stage1_bert_adam, selector=stage1_selector)
