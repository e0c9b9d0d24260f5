import math

import pytest
import torch

from diffret.generator.schedule import MAX_BETA, NoiseSchedule, ScheduleConfig


@pytest.mark.parametrize("steps", [10, 50, 1000])
def test_cosine_matches_diffusers_squaredcos_cap_v2(steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=steps, beta_schedule="squaredcos_cap_v2")
    s = NoiseSchedule(ScheduleConfig(kind="cosine", train_steps=steps))
    assert s.alphas_cumprod.dtype == torch.float64 and s.alphas_cumprod.shape == (steps,)
    torch.testing.assert_close(s.betas.float(), ref.betas, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(s.alphas_cumprod.float(), ref.alphas_cumprod, atol=1e-6, rtol=1e-5)


def test_cosine_formula_by_hand():
    T = 50
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    s = NoiseSchedule(kind="cosine", train_steps=T)
    for t in (0, 1, 17, 48):
        assert s.betas[t].item() == pytest.approx(min(1 - f((t + 1) / T) / f(t / T), 0.999), rel=1e-12)
    # alpha_bar(t) telescopes to f((t+1)/T) / f(0) wherever no beta is capped
    assert s.alphas_cumprod[10].item() == pytest.approx(f(11 / T) / f(0.0), rel=1e-10)


def test_linear_schedule():
    for T in (50, 1000):
        s = NoiseSchedule(ScheduleConfig(kind="linear", train_steps=T))
        scale = 1000 / T
        expected = torch.linspace(scale * 1e-4, scale * 0.02, T, dtype=torch.float64)
        torch.testing.assert_close(s.betas, expected)
        torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - expected, 0))


def test_beta_cap():
    s = NoiseSchedule(kind="cosine", train_steps=50)
    assert s.betas.max().item() <= MAX_BETA
    assert s.betas[-1].item() == pytest.approx(MAX_BETA)  # alpha_bar(1) = 0 -> raw beta = 1 -> capped


def test_beta_scale():
    base = NoiseSchedule(kind="cosine", train_steps=50)
    half = NoiseSchedule(kind="cosine", train_steps=50, beta_scale=0.5)
    torch.testing.assert_close(half.betas, base.betas * 0.5)
    big = NoiseSchedule(ScheduleConfig(kind="linear", train_steps=50, beta_scale=3.0))
    lin = NoiseSchedule(ScheduleConfig(kind="linear", train_steps=50))
    torch.testing.assert_close(big.betas, (lin.betas * 3.0).clamp(max=MAX_BETA))
    assert big.betas.max().item() == pytest.approx(MAX_BETA)
    torch.testing.assert_close(big.alphas_cumprod, torch.cumprod(1 - big.betas, 0))


def test_bad_config():
    with pytest.raises(ValueError, match="unknown noise schedule kind"):
        NoiseSchedule(kind="sigmoid")
    with pytest.raises(ValueError):
        NoiseSchedule(kind="cosine", train_steps=0)
    with pytest.raises(ValueError):
        NoiseSchedule(kind="cosine", beta_scale=0.0)


def test_add_noise_matches_diffusers():
    diffusers = pytest.importorskip("diffusers")
    T = 50
    ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    s = NoiseSchedule(kind="cosine", train_steps=T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(6, 5, generator=g) * 2 - 1
    noise = torch.randn(6, 5, generator=g)
    t = torch.tensor([0, 1, 10, 25, 48, 49])
    torch.testing.assert_close(s.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-6, rtol=1e-5)
    # hand formula, higher-rank input
    x3 = torch.randn(2, 3, 4, generator=g)
    n3 = torch.randn(2, 3, 4, generator=g)
    t3 = torch.tensor([3, 40])
    ab = s.alphas_cumprod[t3].float().view(-1, 1, 1)
    torch.testing.assert_close(s.add_noise(x3, n3, t3), ab.sqrt() * x3 + (1 - ab).sqrt() * n3)
    with pytest.raises(ValueError):
        s.add_noise(x0, noise, torch.full((6,), T))
