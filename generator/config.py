"""Stage-2 configuration: one dataclass, written into every generator run folder."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GeneratorConfig:
    """What `diffret train-generator` trains (defaults: the original method's)."""

    steps: int = 50  # diffusion steps T
    schedule: str = "cosine"  # cosine | linear
    beta_scale: float = 1.0
    loss: str = "ce"  # ce | mse | kl
    x0: str = "onehot"  # onehot | pm1
    candidates: int = 128  # K in training: the positive, then in-batch items by stage-1 similarity
    negatives: str = "batch"  # batch: hardest in-batch items | cache: mined from the whole training split
    batch_size: int = 128
    epochs: int = 5
    lr: float = 1e-4
    # original: BertAdam (betas 0.9/0.98, eps 1e-6, no bias correction), 10% warm-up then the original's
    # cosine over all steps, weight decay on non-bias weights, layers start N(0, 0.02) with zero bias;
    # modern: AdamW at a constant lr, PyTorch's default initialisation
    recipe: str = "original"
    weight_decay: float | None = None  # None: the recipe's (original 0.2, modern 0)
    grad_clip: float = 1.0
    ema: float = 0.99  # EMA decay of the weights; the EMA copy is what evaluation uses (0 = off)
    temp: float = 1.0  # text-frame attention temperature inside the denoisers
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "GeneratorConfig":
        """Raise ValueError (one line) for a setting that cannot train; returns self."""
        choices = {"schedule": ("cosine", "linear"), "loss": ("ce", "mse", "kl"), "x0": ("onehot", "pm1"),
                   "negatives": ("batch", "cache"), "recipe": RECIPES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("steps", "candidates", "batch_size"):
            if getattr(self, name) < (2 if name != "steps" else 1):
                raise ValueError(f"{name} must be at least {2 if name != 'steps' else 1}, got {getattr(self, name)}")
        if self.epochs < 0 or not self.lr > 0 or not 0 <= self.ema < 1 or not self.beta_scale > 0:
            raise ValueError("epochs must be >= 0, lr > 0, beta_scale > 0 and ema in [0, 1)")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        return self

    def decay(self) -> float:
        """The weight decay used: `weight_decay`, or the recipe's when None."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 0.2 if self.recipe == "original" else 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        """Tolerates fields written by older or newer versions (unknown keys are dropped). A config
        without `recipe` was written before the field existed, when training was the modern recipe."""
        d = {"recipe": "modern", **d}
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


RECIPES = ("original", "modern")

# Settings that `train-generator --resume` may change; every other one must match the saved run.
RESUMABLE = ("epochs", "lr", "device", "grad_clip")
