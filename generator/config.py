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
    batch_size: int = 128
    epochs: int = 5
    lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema: float = 0.99  # EMA decay of the weights; the EMA copy is what evaluation uses (0 = off)
    temp: float = 1.0  # text-frame attention temperature inside the denoisers
    seed: int = 0
    device: str = "auto"

    def to_dict(self) -> dict:
        return asdict(self)
