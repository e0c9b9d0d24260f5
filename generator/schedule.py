"""Noise schedule of the forward diffusion process q(x_t | x_0).

The schedule is a pure table of betas / alpha-bars; it knows nothing about the
denoiser or the sampler. Tables are float64 (like improved-DDPM); float32 copies
are kept for use on devices without float64 support.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ScheduleConfig", "NoiseSchedule", "cosine_betas", "linear_betas", "MAX_BETA", "SCHEDULE_KINDS"]

MAX_BETA = 0.999
SCHEDULE_KINDS = ("cosine", "linear")  # ScheduleConfig.kind: cosine_betas | linear_betas


@dataclass
class ScheduleConfig:
    """Configuration of a :class:`NoiseSchedule`.

    kind: "cosine" (improved-DDPM, diffusers' "squaredcos_cap_v2") or "linear" (DDPM, rescaled to T).
    train_steps: number of training timesteps T; timesteps are 0..T-1.
    beta_scale: multiplies every beta (signal-to-noise ablation); the result is clipped to <= 0.999.
    """

    kind: str = "cosine"
    train_steps: int = 50
    beta_scale: float = 1.0


def _cosine_alpha_bar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(steps: int, max_beta: float = MAX_BETA) -> Tensor:
    """beta_t = min(1 - alpha_bar((t+1)/T) / alpha_bar(t/T), max_beta), t = 0..T-1 -> float64 [T]."""
    betas = [
        min(1.0 - _cosine_alpha_bar((i + 1) / steps) / _cosine_alpha_bar(i / steps), max_beta)
        for i in range(steps)
    ]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(steps: int) -> Tensor:
    """DDPM linear schedule rescaled to T steps: linspace(s*1e-4, s*0.02, T), s = 1000/T -> float64 [T]."""
    scale = 1000.0 / steps
    return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)


class NoiseSchedule:
    """Discrete noise schedule with T steps.

    Attributes (all [T]): ``betas``, ``alphas``, ``alphas_cumprod``, ``sqrt_alphas_cumprod``,
    ``sqrt_one_minus_alphas_cumprod`` (float64) and ``alphas_cumprod_f32`` (float32).
    """

    def __init__(self, config: ScheduleConfig | None = None, **overrides):
        """``NoiseSchedule(ScheduleConfig(...))`` or ``NoiseSchedule(kind=..., train_steps=..., beta_scale=...)``."""
        if config is None:
            config = ScheduleConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a ScheduleConfig or keyword overrides, not both")
        if config.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown noise schedule kind {config.kind!r}; expected one of {SCHEDULE_KINDS}")
        if int(config.train_steps) < 1:
            raise ValueError(f"schedule steps must be >= 1, got {config.train_steps}")
        if not config.beta_scale > 0:
            raise ValueError(f"beta_scale must be > 0, got {config.beta_scale}")
        self.config = config
        steps = int(config.train_steps)

        betas = cosine_betas(steps) if config.kind == "cosine" else linear_betas(steps)
        betas = (betas * float(config.beta_scale)).clamp(max=MAX_BETA)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.alphas_cumprod_f32 = self.alphas_cumprod.float()

    @property
    def num_train_timesteps(self) -> int:
        """T."""
        return self.betas.shape[0]

    def __len__(self) -> int:
        return self.num_train_timesteps

    def __repr__(self) -> str:
        c = self.config
        return f"NoiseSchedule(kind={c.kind!r}, train_steps={c.train_steps}, beta_scale={c.beta_scale})"

    def alpha_bar(self, t: int) -> float:
        """alpha_bar_t as a Python float (float64 precision); t in [0, T-1]."""
        return float(self.alphas_cumprod[int(t)])

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """q_sample: sqrt(ab_t) x0 + sqrt(1 - ab_t) noise.

        x0, noise: [B, ...]; t: LongTensor [B] with values in [0, T-1] -> [B, ...] (x0's dtype).
        """
        if x0.shape != noise.shape:
            raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
        t = torch.as_tensor(t, dtype=torch.long).reshape(-1)
        if t.numel() not in (1, x0.shape[0]):
            raise ValueError(f"t has {t.numel()} entries for a batch of {x0.shape[0]}")
        if t.device.type == "cpu" and t.numel():  # range check without a device sync
            if int(t.min()) < 0 or int(t.max()) >= self.num_train_timesteps:
                raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}]")
        t = t.to(x0.device)
        view = (-1,) + (1,) * (x0.dim() - 1)
        a = self.sqrt_alphas_cumprod.to(x0.dtype).to(x0.device)[t].view(view)
        s = self.sqrt_one_minus_alphas_cumprod.to(x0.dtype).to(x0.device)[t].view(view)
        return a * x0 + s * noise
