"""Reverse-process samplers for an x0-predicting model, decoupled from the model.

A sampler holds a :class:`NoiseSchedule` and a list of (strided) timesteps. It
calls ``model_fn(x_t, t_batch) -> x0_pred`` and never sees the model itself.

Both samplers follow diffusers (``DDIMScheduler`` / ``DDPMScheduler`` with
``prediction_type="sample"``, ``timestep_spacing="leading"``, ``steps_offset=0``,
``clip_sample_range=1.0``) step for step; the tests check this. DDIM re-derives epsilon from the
clamped x0 prediction by default, as guided-diffusion's ``ddim_sample`` (the original
DiffusionRet's sampler) does: diffusers' ``use_clipped_model_output=True``. ``ddim_eps="raw"``
(diffusers' default) re-derives it from the unclamped one.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .schedule import NoiseSchedule

__all__ = ["leading_timesteps", "DDIMSampler", "DDPMSampler", "DDIM_EPS", "SAMPLERS", "make_sampler"]

ModelFn = Callable[[Tensor, Tensor], Tensor]


def leading_timesteps(num_train_timesteps: int, num_inference_steps: int | None = None) -> Tensor:
    """diffusers' "leading" spacing: arange(S) * (T // S), descending -> LongTensor [S].

    S = T when ``num_inference_steps`` is None; S > T or S < 1 raises ValueError. The original
    always samples all T steps (its ``create_gaussian_diffusion`` fixes ``timestep_respacing``);
    for S < T this equals guided-diffusion's "ddimS" striding when S divides T, and is not its
    ``space_timesteps(T, [S])`` (round(i (T-1)/(S-1)): 0, 5, 11, ..., 49 for T = 50, S = 10).
    """
    T = int(num_train_timesteps)
    S = T if num_inference_steps is None else int(num_inference_steps)
    if S < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {S}")
    if S > T:
        raise ValueError(f"num_inference_steps ({S}) cannot exceed the schedule's training steps ({T})")
    return (torch.arange(S, dtype=torch.long) * (T // S)).flip(0)


def _randn(shape, generator: torch.Generator | None, device, dtype) -> Tensor:
    """Gaussian noise drawn on the generator's device, then moved (like diffusers' randn_tensor)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    draw_on = generator.device if generator is not None else device
    out = torch.randn(tuple(shape), generator=generator, device=draw_on, dtype=dtype)
    return out.to(device)


class _Sampler:
    """Shared timestep bookkeeping and the sampling loop."""

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int | None = None, clip_sample: bool = True):
        self.schedule = schedule
        self.clip_sample = bool(clip_sample)
        self.timesteps = leading_timesteps(schedule.num_train_timesteps, num_inference_steps)
        self.num_inference_steps = int(self.timesteps.numel())
        self.step_ratio = schedule.num_train_timesteps // self.num_inference_steps
        self._acp = [float(a) for a in schedule.alphas_cumprod]  # float64 precision, Python floats

    def clamp(self, x0_pred: Tensor) -> Tensor:
        """x0_pred clamped to [-1, 1] (when ``clip_sample``): what each step uses and retrieval ranks by."""
        return x0_pred.clamp(-1.0, 1.0) if self.clip_sample else x0_pred

    @property
    def draws_noise(self) -> bool:
        """Whether `step` draws random numbers (then callers must keep the draws in order)."""
        raise NotImplementedError

    def step(self, x0_pred: Tensor, t: int, x_t: Tensor,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """-> (x_prev, the clamped x0 prediction)."""
        raise NotImplementedError

    def run(self, predict: Callable[[int, int, Tensor], Tensor], x_T: Tensor,
            generator: torch.Generator | None = None) -> Tensor:
        """The sampling loop: x_T [B, K] -> the last clamped x0 prediction [B, K].

        predict(i, t, x_t) -> x0_pred at the i-th timestep t. The final ``step`` is skipped: its
        x_prev is never used. Gradients are not disabled here."""
        x_t, last = x_T, self.num_inference_steps - 1
        for i, t in enumerate(self.timesteps.tolist()):
            x0_pred = predict(i, t, x_t)
            if i == last:
                return self.clamp(x0_pred)
            x_t, _ = self.step(x0_pred, t, x_t, generator=generator)
        return x_t

    def sample(
        self,
        model_fn: ModelFn,
        shape,
        generator: torch.Generator | None = None,
        device=None,
        dtype: torch.dtype = torch.float32,
        x_T: Tensor | None = None,
    ) -> Tensor:
        """Run the reverse chain from x_T ~ N(0, I) of ``shape`` ([B, K]), or from the given ``x_T``.

        Calls ``model_fn(x_t [B, K], t_batch LongTensor [B]) -> x0_pred [B, K]`` once per timestep
        (t_batch is stride 0: every row shares t, which the denoisers exploit) and returns the last
        x0 prediction, clamped when ``clip_sample`` (see `run`).
        """
        device = torch.device(device) if device is not None else torch.device("cpu")
        x_t = _randn(shape, generator, device, dtype) if x_T is None else x_T.to(device, dtype)
        batch = lambda t: torch.full((1,), t, dtype=torch.long, device=device).expand(shape[0])  # noqa: E731
        return self.run(lambda i, t, x: model_fn(x, batch(t)), x_t, generator)


class DDIMSampler(_Sampler):
    """DDIM (Song et al. 2021) for an x0-predicting model; ``eta=0`` is deterministic.

    Matches ``diffusers.DDIMScheduler(prediction_type="sample", clip_sample=True,
    clip_sample_range=1.0, timestep_spacing="leading", steps_offset=0,
    set_alpha_to_one=set_alpha_to_one)`` with ``use_clipped_model_output=use_clipped_model_output``.

    "Previous alpha" at the last timestep (t=0, whose previous step is -1):
    ``set_alpha_to_one=True`` (default) uses alpha_bar_prev = 1, so the final x_prev equals the
    (clipped) x0 prediction, which is also what guided-diffusion's DDIM loop (used by the original
    DiffusionRet) does; False uses alpha_bar_0. The choice only changes the last x_prev, which
    :meth:`sample` discards, so retrieval scores do not depend on it.

    ``use_clipped_model_output=True`` (default) re-derives epsilon from the *clipped* x0
    prediction, eps = (x_t - sqrt(a_t) clip(x0)) / sqrt(1 - a_t): guided-diffusion's
    ``ddim_sample`` (``_predict_eps_from_xstart`` of the clamped ``pred_xstart``), which the original
    DiffusionRet samples with. False (diffusers' default) re-derives it from the unclipped one.
    Whenever x0_hat leaves [-1, 1] the two trajectories differ.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        num_inference_steps: int | None = None,
        eta: float = 0.0,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        use_clipped_model_output: bool = True,
    ):
        super().__init__(schedule, num_inference_steps, clip_sample)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.eta = float(eta)
        self.set_alpha_to_one = bool(set_alpha_to_one)
        self.use_clipped_model_output = bool(use_clipped_model_output)
        self.final_alpha_cumprod = 1.0 if set_alpha_to_one else self._acp[0]

    def _alpha_prev(self, t: int) -> float:
        prev = t - self.step_ratio
        return self._acp[prev] if prev >= 0 else self.final_alpha_cumprod

    @property
    def draws_noise(self) -> bool:
        return self.eta > 0

    def step(self, x0_pred: Tensor, t: int, x_t: Tensor,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """x_t [B, ...], x0_pred [B, ...] at integer timestep t -> (x_{t - T//S}, clamped x0) [B, ...]."""
        t = int(t)
        a_t, a_prev = self._acp[t], self._alpha_prev(t)
        x0 = self.clamp(x0_pred)
        var = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)
        std = self.eta * math.sqrt(var)
        # x_prev = sqrt(a_prev) x0 + c eps with eps = (x_t - sqrt(a_t) src) / sqrt(1 - a_t), src the
        # clamped x0 (or the raw one), written as a x0 + b x_t - r src: two or three ops, not seven
        c = math.sqrt(max(1.0 - a_prev - std**2, 0.0)) / math.sqrt(1.0 - a_t)
        r = c * math.sqrt(a_t)
        if self.use_clipped_model_output:
            x_prev = x0.mul(math.sqrt(a_prev) - r).add_(x_t, alpha=c)
        else:
            x_prev = x0.mul(math.sqrt(a_prev)).add_(x_t, alpha=c).sub_(x0_pred, alpha=r)
        if self.eta > 0:
            x_prev = x_prev + std * _randn(x0_pred.shape, generator, x0_pred.device, x0_pred.dtype)
        return x_prev, x0


class DDPMSampler(_Sampler):
    """Ancestral DDPM sampling with the posterior ("fixed_small") variance, x0-prediction.

    Strided steps are allowed: with S < T inference steps the chain jumps between the
    "leading" timesteps and uses beta'_t = 1 - alpha_bar_t / alpha_bar_prev for the jump, exactly
    as ``diffusers.DDPMScheduler(prediction_type="sample", variance_type="fixed_small")`` after
    ``set_timesteps(S)``. alpha_bar_prev is 1 after the last step. No noise is added at t = 0.
    """

    def __init__(self, schedule: NoiseSchedule, num_inference_steps: int | None = None, clip_sample: bool = True):
        super().__init__(schedule, num_inference_steps, clip_sample)

    @property
    def draws_noise(self) -> bool:
        return True

    def posterior(self, x0_pred: Tensor, t: int, x_t: Tensor) -> tuple[Tensor, float]:
        """Mean [B, ...] and variance (float) of q(x_prev | x_t, x0 = clamp(x0_pred))."""
        t = int(t)
        prev = t - self.step_ratio
        a_t = self._acp[t]
        a_prev = self._acp[prev] if prev >= 0 else 1.0
        cur_alpha = a_t / a_prev
        cur_beta = 1.0 - cur_alpha
        x0 = self.clamp(x0_pred)
        c0 = math.sqrt(a_prev) * cur_beta / (1.0 - a_t)
        ct = math.sqrt(cur_alpha) * (1.0 - a_prev) / (1.0 - a_t)
        var = max((1.0 - a_prev) / (1.0 - a_t) * cur_beta, 1e-20)
        return c0 * x0 + ct * x_t, var

    def step(self, x0_pred: Tensor, t: int, x_t: Tensor,
             generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """x_t [B, ...], x0_pred [B, ...] at integer timestep t -> (sampled x_prev, clamped x0) [B, ...]."""
        mean, var = self.posterior(x0_pred, t, x_t)
        if int(t) > 0:
            mean = mean + math.sqrt(var) * _randn(x0_pred.shape, generator, x0_pred.device, x0_pred.dtype)
        return mean, self.clamp(x0_pred)


SAMPLERS = ("ddim", "ddpm")  # make_sampler names: DDIMSampler | DDPMSampler
DDIM_EPS = ("clamped", "raw")  # epsilon from the clamped x0 (guided-diffusion, the original) | the raw one (diffusers)


def make_sampler(
    name: str,
    schedule: NoiseSchedule,
    num_inference_steps: int | None = None,
    clip_sample: bool = True,
    eta: float = 0.0,
    ddim_eps: str = "clamped",
):
    """Build a sampler by name: "ddim" | "ddpm". eta and ddim_eps ("clamped" | "raw", see
    DDIMSampler's ``use_clipped_model_output``) are DDIM's; DDPM's posterior always uses the clamped
    x0, so it ignores ddim_eps."""
    key = name.lower()
    if ddim_eps not in DDIM_EPS:
        raise ValueError(f"ddim_eps must be one of {', '.join(DDIM_EPS)}, got {ddim_eps!r}")
    if key == "ddim":
        return DDIMSampler(schedule, num_inference_steps, eta=eta, clip_sample=clip_sample,
                           use_clipped_model_output=ddim_eps == "clamped")
    if key == "ddpm":
        if eta != 0.0:
            raise ValueError("eta is a DDIM parameter; DDPM sampling has no eta")
        return DDPMSampler(schedule, num_inference_steps, clip_sample=clip_sample)
    raise ValueError(f"unknown sampler {name!r}; expected {' or '.join(map(repr, SAMPLERS))}")
