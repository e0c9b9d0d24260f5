"""The two stage-one recipes: what is trained, in which precision, by which optimiser.

`--recipe original` (the default) trains as the original's `main_retrieval.py` does:

- BertAdam (no bias correction; lr schedule `warmup_cosine`: linear warm-up over the first
  `warmup` of all steps, then 0.5 (1 + cos(pi x)) of the *total* progress x, so the rate drops
  right after the warm-up; the first update has lr 0), betas (0.9, 0.98), eps 1e-6, per-tensor
  gradient clipping at `grad_clip` after the global one;
- four groups as `prep_optimizer` makes them: {CLIP, new modules} x {decayed, not decayed}; a
  parameter is not decayed when its full name contains `bias`, `LayerNorm.bias` or `LayerNorm.weight`,
  so every other weight is decayed by 0.2: embeddings, `logit_scale`, the projections and the
  LayerNorm weights too (open_clip names them ln_*, so the original's name rule decays them);
- CLIP's patch embedding `visual.conv1` frozen;
- CLIP's weights in float16 (the original's `convert_weights`: conv / linear / attention weights and
  biases, `text_projection`, `proj`; LayerNorms, embeddings and `logit_scale` stay float32) and
  updated in place: at lr 1e-7 most updates round away, and where a gradient's square underflows
  float16 (|g| < ~2e-4, after the 0.02 of b2) the moment v is 0 and the update m / eps is large. On a
  GPU they *are* float16 tensors, with float16 gradients and float16 Adam moments, and no gradient
  scaler (its loss scaling would change which gradients underflow; the original had none); autocast
  still runs the rest in mixed precision (and runs whenever CLIP is float16: its weights need it).
  On a CPU (tests, the demo) the model's tensors stay float32 and BertAdam updates float16 copies
  of them, in float16 arithmetic, whose result is written back after every update
  (`Float16Weights`): the same arithmetic.

`--recipe modern` is diffret's earlier recipe: AdamW, decay on matrices only, the cosine over the
steps after the warm-up (torch's LambdaLR), everything float32 and trainable, a gradient scaler on GPUs.

BertAdam lives in generator/bert_adam.py (stage two's optimiser); extract/ may not import generator/
(DESIGN's dependency direction), so pipeline/ hands the original recipe's optimiser in as a callable
(`Hooks.optimizer`, made by pipeline/recipes.py): the formula stays in one place.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

RECIPES = ("original", "modern")
FROZEN = ("visual.conv1.",)  # CLIP parameters the original never trains (its VisualTransformer.__init__)


@dataclass
class Hooks:
    """What pipeline/ hands extract's fine-tuning (extract may not import generator or pipeline).

    optimizer(lr_groups, cfg, total_steps) -> torch Optimizer, for the original recipe; lr_groups:
        [(named parameters [(full name, Parameter)], lr)], one entry each for CLIP and the new modules
        (pipeline/recipes.py: BertAdam with the original's name-based decay groups).
    selector(tokens=[Nt, L], caption_video=[Nt], paths=[Nv], spec, cfg, device, log) -> a selector
        over that validation split (pipeline/selection.py Selector: step / epoch_end / best_state /
        state_dict / load_state_dict / summary), for select_on "val".
    """

    optimizer: Callable | None = None
    selector: Callable | None = None


def freeze(model: nn.Module, recipe: str) -> list[str]:
    """The original recipe: CLIP's conv1 stops training (requires_grad False). -> the frozen names."""
    if recipe != "original":
        return []
    frozen = [(n, p) for n, p in model.clip.named_parameters() if n.startswith(FROZEN)]
    for _, p in frozen:
        p.requires_grad_(False)
    return [n for n, _ in frozen]


def half_parameters(clip: nn.Module) -> list[nn.Parameter]:
    """The CLIP parameters the original holds in float16 (its `convert_weights`), in module order."""
    out: dict[int, nn.Parameter] = {}

    def add(t):
        if isinstance(t, nn.Parameter):
            out.setdefault(id(t), t)

    for m in clip.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            add(m.weight)
            add(m.bias)
        if isinstance(m, nn.MultiheadAttention):
            for attr in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                         "bias_k", "bias_v"):
                add(getattr(m, attr, None))
        for attr in ("text_projection", "proj"):  # Parameters (a Linear projection is covered above)
            add(getattr(m, attr, None))
    return list(out.values())


def round_half_(t: torch.Tensor) -> None:
    """t <- the float16 value nearest t (in place; t keeps its dtype)."""
    t.copy_(t.to(torch.float16))


class Float16Weights:
    """CLIP's float16 weights under the original recipe (see the module docstring).

    native (a GPU): the tensors are converted to float16 and BertAdam updates them as they are.
    emulated (a CPU, where float16 matmuls are slow): the model keeps float32 tensors for its forward
    and backward, and BertAdam updates float16 copies of them (`target`: what the optimiser is given
    instead) in float16 arithmetic: `before_step` hands each copy its weight's gradient rounded to
    float16, `after_step` writes the float16 result back into the float32 weight (exactly). So the
    weights are rounded to float16 after every update and BertAdam's moments are float16 tensors, as on
    a GPU: the same arithmetic, up to the global gradient clipping (float32 here, float16 there).
    `sync()` re-copies the weights after they were loaded (a resumed fine-tuning). `to_float32()`
    ends it (lossless: the values are float16's), so the stage-1 checkpoint holds float32 tensors.
    """

    def __init__(self, params: list[nn.Parameter], device: torch.device):
        self.params = list(params)
        self.native = torch.device(device).type == "cuda"
        self.copies: dict[int, nn.Parameter] = {}
        with torch.no_grad():
            for p in self.params:
                if self.native:
                    p.data = p.data.to(torch.float16)
                else:
                    self.copies[id(p)] = nn.Parameter(p.detach().to(torch.float16), requires_grad=p.requires_grad)
                    round_half_(p)

    def target(self, p: nn.Parameter) -> nn.Parameter:
        """The tensor the optimiser updates in place of `p`: its float16 copy (emulated), else `p`."""
        return self.copies.get(id(p), p)

    @torch.no_grad()
    def sync(self) -> None:
        for p in self.params:
            if id(p) in self.copies:
                self.copies[id(p)].copy_(p)

    def before_step(self) -> None:
        for p in self.params:
            if id(p) in self.copies:
                self.copies[id(p)].grad = None if p.grad is None else p.grad.to(torch.float16)

    @torch.no_grad()
    def after_step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        for p in self.params:
            c = self.copies.get(id(p))
            if c is None:
                continue
            if optimizer is not None and c.grad is not None and c not in optimizer.state:
                raise RecipeError("the optimiser does not update CLIP's float16 copies (make_optimizer needs `half`)")
            p.copy_(c)

    def to_float32(self) -> None:
        for p in self.params:
            p.data = p.data.float()
        self.copies.clear()


def lr_groups(model: nn.Module, cfg) -> list[tuple[list[tuple[str, nn.Parameter]], float]]:
    """[(named trainable parameters, lr)] for the new modules (lr) and CLIP (lr x clip_lr_scale);
    names are full (`clip.visual.conv1.weight`, `temporal.blocks.0.ln_1.weight`): the original's
    decay rule reads them."""
    new_ids = {id(p) for m in model.new_modules() for p in m.parameters()}
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [([(n, p) for n, p in named if id(p) in new_ids], cfg.lr),
            ([(n, p) for n, p in named if id(p) not in new_ids], cfg.lr * cfg.clip_lr_scale)]


def modern_groups(model: nn.Module, cfg) -> list[dict]:
    """AdamW groups of the modern recipe: each lr group split into matrices (decayed) and 1-d params."""
    groups = []
    for named, lr in lr_groups(model, cfg):
        params = [p for _, p in named]
        groups += [{"params": [p for p in params if p.ndim >= 2], "lr": lr, "weight_decay": cfg.weight_decay},
                   {"params": [p for p in params if p.ndim < 2], "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def modern_schedule(total_steps: int, warmup: float):
    """The modern recipe's LR multiplier: linear 0 -> 1 over the warm-up steps, then cosine 1 -> 0
    over the steps after it."""
    w = max(1, int(total_steps * warmup))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total_steps - w)))

    return f


class RecipeError(ValueError):
    """The recipe cannot be set up (one-line message)."""


def make_optimizer(model: nn.Module, cfg, total_steps: int, hooks: Hooks | None = None,
                   half: Float16Weights | None = None):
    """-> (optimizer, LambdaLR scheduler or None: BertAdam schedules itself) of cfg.recipe. `half`:
    CLIP's float16 weights (the original recipe), whose float16 copies the optimiser updates on a CPU."""
    if getattr(cfg, "recipe", "modern") == "original":
        if hooks is None or hooks.optimizer is None:
            raise RecipeError("the original stage-one recipe needs BertAdam, which pipeline/ hands in: run it "
                              "through `diffret extract` (or pass hooks=pipeline.recipes.stage1_hooks())")
        groups = [([(n, half.target(p) if half else p) for n, p in named], lr) for named, lr in lr_groups(model, cfg)]
        return hooks.optimizer(groups, cfg, total_steps), None
    opt = torch.optim.AdamW(modern_groups(model, cfg), betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, modern_schedule(total_steps, cfg.warmup))
