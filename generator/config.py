"""Stage-2 configuration: one dataclass, written into every generator run folder.

Each field's metadata is its `diffret train-generator` option (help, flag, choices; see
pipeline/commands/options.py); the choice lists live beside what implements them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from diffret.cache.numbers import check_numbers

from .candidates import NEGATIVES
from .denoiser import MAX_TIMESTEPS
from .losses import LOSS_KINDS, X0_KINDS
from .schedule import SCHEDULE_KINDS, ScheduleConfig

# original: BertAdam (betas 0.9/0.98, eps 1e-6, no bias correction), 10% warm-up then the original's
# cosine over all steps, weight decay on non-bias weights, layers start N(0, 0.02) with zero bias;
# modern: AdamW at a constant lr, PyTorch's default initialisation
RECIPES = ("original", "modern")
SELECT_ON = ("last", "val")  # generator.pt: the last epoch's weights, or the best on validation

# The range of each number of GeneratorConfig (cache/numbers.py: every number must also be finite);
# validate() adds the bounds that depend on each other or on the denoisers.
NUMBER_RULES = {"grad_clip": ">0", "temp": ">0", "seed": ">=0", "weight_decay": ">=0", "val_fraction": "[0,1)",
                "eval_every": ">=1"}


@dataclass
class GeneratorConfig:
    """What `diffret train-generator` trains (defaults: the original method's)."""

    train_steps: int = field(default=ScheduleConfig.train_steps,
                             metadata={"flag": "--steps", "help": "Diffusion steps T."})
    schedule: str = field(default=ScheduleConfig.kind, metadata={"choices": SCHEDULE_KINDS})
    beta_scale: float = field(default=ScheduleConfig.beta_scale,
                              metadata={"help": "Multiplies every beta (signal-to-noise ablation)."})
    loss: str = field(default="ce", metadata={"choices": LOSS_KINDS, "help": "Generation loss on x0_hat: cross-entropy "
                                              "of 100 x0_hat, MSE to x0, or KL to a smoothed target."})
    x0: str = field(default="onehot", metadata={"choices": X0_KINDS,
                                                "help": "x0 target: 1 on the positive and 0 elsewhere, or +1 / -1."})
    # K in training: the positive, then in-batch items by stage-1 similarity
    candidates: int = field(default=128, metadata={"help": "Candidates K per query in training."})
    negatives: str = field(default="batch", metadata={"choices": NEGATIVES, "help": (
        "Hard negatives from the batch (the original) or mined from the whole training cache.")})
    batch_size: int = 128
    epochs: int = 5
    lr: float = 1e-4
    recipe: str = field(default="original", metadata={"choices": RECIPES, "help": (
        "original: BertAdam (betas 0.9/0.98, no bias correction), 10% warm-up then cosine, weight decay 0.2, layers "
        "N(0, 0.02); modern: AdamW at a constant lr, no decay, PyTorch's default init.")})
    weight_decay: float | None = None  # None: the recipe's (original 0.2, modern 0)
    grad_clip: float = 1.0
    # the EMA copy is what evaluation uses
    ema: float = field(default=0.99, metadata={"help": "EMA decay of the saved weights (0: no EMA)."})
    temp: float = 1.0  # text-frame attention temperature inside the denoisers
    seed: int = 0
    device: str = "auto"
    select_on: str = field(default="last", metadata={"choices": SELECT_ON, "help": (
        "Which weights generator.pt holds: the last epoch's EMA (or raw with --ema 0), or the best by t2v R@1 of "
        "the diffusion row on a validation split (the cache's val split, else --val-fraction of the training "
        "videos held out), raw or EMA, evaluated every --eval-every steps and at each epoch end. The test split "
        "is never read while training.")})
    val_fraction: float = field(default=0.1, metadata={"help": (
        "With --select-on val and a cache without a val split: the share of training videos held out (seeded "
        "by --seed; recorded in generator.json).")})
    eval_every: int = field(default=150, metadata={"help": "With --select-on val: validate every N steps (and at "
                                                          "each epoch end)."})

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> "GeneratorConfig":
        """Raise ValueError (one line) for a setting that cannot train; returns self."""
        check_numbers(self, NUMBER_RULES)
        if self.train_steps > MAX_TIMESTEPS:
            raise ValueError(f"--steps must be at most {MAX_TIMESTEPS} (the denoisers' timestep table), "
                             f"got {self.train_steps}")
        for name in ("schedule", "loss", "x0", "negatives", "recipe", "select_on"):
            allowed = self.__dataclass_fields__[name].metadata["choices"]
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("train_steps", "candidates", "batch_size"):
            least = 1 if name == "train_steps" else 2
            if getattr(self, name) < least:
                raise ValueError(f"{flag(name)} must be at least {least}, got {getattr(self, name)}")
        if self.epochs < 0 or not self.lr > 0 or not 0 <= self.ema < 1 or not self.beta_scale > 0:
            raise ValueError("epochs must be >= 0, lr > 0, beta_scale > 0 and ema in [0, 1)")
        if self.weight_decay is not None and not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        return self

    def schedule_config(self) -> ScheduleConfig:
        """The noise schedule this generator trains and samples with: the one place a schedule is
        built from a config."""
        return ScheduleConfig(kind=self.schedule, train_steps=self.train_steps, beta_scale=self.beta_scale)

    def decay(self) -> float:
        """The weight decay used: `weight_decay`, or the recipe's when None."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 0.2 if self.recipe == "original" else 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        """Tolerates fields written by older or newer versions (unknown keys are dropped, RENAMED keys
        mapped). A config without `recipe` was written before the field existed, when training was
        the modern recipe."""
        d = {"recipe": "modern", **{RENAMED.get(k, k): v for k, v in d.items()}}
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def flag(name: str) -> str:
    """The command-line name of field `name` (its flag without dashes, else the field's name):
    messages name what the user typed."""
    return GeneratorConfig.__dataclass_fields__[name].metadata.get("flag", name).lstrip("-")


# Keys of configs written before a field was renamed -> the field (generator.json, train_state.pt).
RENAMED = {"steps": "train_steps"}

# Settings that `train-generator --resume` may change; every other one must match the saved run.
RESUMABLE = ("epochs", "lr", "device", "grad_clip")
