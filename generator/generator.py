"""A trained generator: its config, both denoisers and what generator.json records, with the noise
schedule it was trained on and the samplers that run on that schedule.

`load_generator` (checkpoint.py) returns one; evaluation asks it for a sampler instead of building
the schedule itself, so a schedule is made from a config in one place (`GeneratorConfig.schedule_config`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import GeneratorConfig
from .denoiser import T2VDenoiser, V2TDenoiser
from .sampler import make_sampler
from .schedule import NoiseSchedule


@dataclass
class Generator:
    """config: the training settings (T, schedule, ...); t2v, v2t: the denoisers (eval mode, on the
    device they were loaded to); meta: the generator.json dict (width, parameters, cache, history)."""

    config: GeneratorConfig
    t2v: T2VDenoiser
    v2t: V2TDenoiser
    meta: dict

    def schedule(self) -> NoiseSchedule:
        """The T-step noise schedule the denoisers were trained on."""
        return NoiseSchedule(self.config.schedule_config())

    def sampler(self, name: str = "ddim", sample_steps: int | None = None, clamp: bool = True, eta: float = 0.0,
                ddim_eps: str = "clamped"):
        """A sampler ("ddim" | "ddpm") over `sample_steps` S strided steps of the schedule (None: all
        T); clamp: x0 clamped to [-1, 1] at every step; eta, ddim_eps: DDIM's (see make_sampler)."""
        T = self.config.train_steps
        if sample_steps is not None and sample_steps > T:
            raise ValueError(f"--steps {sample_steps} is more than the generator's {T} diffusion steps")
        return make_sampler(name, self.schedule(), sample_steps, clip_sample=clamp, eta=eta, ddim_eps=ddim_eps)
