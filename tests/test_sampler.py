import pytest
import torch

from diffret.generator.sampler import DDIMSampler, DDPMSampler, leading_timesteps, make_sampler
from diffret.generator.schedule import NoiseSchedule

T = 50


def _ddim_ref(set_alpha_to_one=True, steps=T):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDIMScheduler(
        num_train_timesteps=steps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=True,
        clip_sample_range=1.0,
        set_alpha_to_one=set_alpha_to_one,
        timestep_spacing="leading",
        steps_offset=0,
    )


def _ddpm_ref(steps=T):
    diffusers = pytest.importorskip("diffusers")
    return diffusers.DDPMScheduler(
        num_train_timesteps=steps,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        variance_type="fixed_small",
        clip_sample=True,
        clip_sample_range=1.0,
        timestep_spacing="leading",
        steps_offset=0,
    )


def fake_model(x_t, t):
    """A fixed nonlinear x0-predictor that mixes candidates and overshoots [-1, 1]."""
    assert t.dtype == torch.long and t.shape == (x_t.shape[0],)
    tf = t.to(x_t.dtype).unsqueeze(1)
    return 1.4 * torch.tanh(1.3 * x_t + 0.3 * x_t.roll(1, dims=1) + 0.02 * tf - 0.1)


@pytest.mark.parametrize("S", [None, 50, 10, 7, 1])
def test_timesteps_match_diffusers(S):
    ref = _ddim_ref()
    ref.set_timesteps(S or T)
    sampler = DDIMSampler(NoiseSchedule(kind="cosine", steps=T), num_inference_steps=S)
    assert sampler.timesteps.dtype == torch.long
    assert torch.equal(sampler.timesteps, ref.timesteps)
    assert torch.equal(leading_timesteps(T, S), ref.timesteps)


def test_too_many_steps_raise():
    s = NoiseSchedule(kind="cosine", steps=T)
    with pytest.raises(ValueError):
        DDIMSampler(s, num_inference_steps=T + 1)
    with pytest.raises(ValueError):
        DDPMSampler(s, num_inference_steps=T + 1)
    with pytest.raises(ValueError):
        make_sampler("euler", s)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("use_clipped", [False, True])
@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize("S", [50, 10])
def test_ddim_step_matches_diffusers(set_alpha_to_one, use_clipped, eta, S):
    ref = _ddim_ref(set_alpha_to_one)
    ref.set_timesteps(S)
    sampler = DDIMSampler(
        NoiseSchedule(kind="cosine", steps=T), S, eta=eta,
        set_alpha_to_one=set_alpha_to_one, use_clipped_model_output=use_clipped,
    )
    g = torch.Generator().manual_seed(1)
    for t in ref.timesteps.tolist():
        x_t = torch.randn(4, 6, generator=g)
        x0_pred = 1.5 * torch.randn(4, 6, generator=g)  # partly outside [-1, 1]: clipping matters
        ours = sampler.step(x0_pred, t, x_t, generator=torch.Generator().manual_seed(t))
        theirs = ref.step(
            x0_pred, t, x_t, eta=eta, use_clipped_model_output=use_clipped,
            generator=torch.Generator().manual_seed(t),
        ).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("S", [50, 10])
def test_ddim_full_loop_matches_diffusers(eta, S):
    ref = _ddim_ref()
    ref.set_timesteps(S)
    shape = (5, 8)
    g = torch.Generator().manual_seed(123)
    x = torch.randn(shape, generator=g)
    for t in ref.timesteps.tolist():
        out = ref.step(fake_model(x, torch.full((shape[0],), t)), t, x, eta=eta, generator=g)
        x, last_x0 = out.prev_sample, out.pred_original_sample
    sampler = make_sampler("ddim", NoiseSchedule(kind="cosine", steps=T), num_inference_steps=S, eta=eta)
    ours = sampler.sample(fake_model, shape, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(ours, last_x0, atol=2e-5, rtol=1e-4)
    assert ours.abs().max() <= 1.0
    # with set_alpha_to_one the final x_prev is the clipped x0 prediction itself
    torch.testing.assert_close(x, last_x0, atol=1e-6, rtol=0)


def test_ddim_deterministic_and_unclipped():
    s = NoiseSchedule(kind="cosine", steps=T)
    a = DDIMSampler(s, 10).sample(fake_model, (3, 4), generator=torch.Generator().manual_seed(0))
    b = DDIMSampler(s, 10).sample(fake_model, (3, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    raw = DDIMSampler(s, 10, clip_sample=False).sample(fake_model, (3, 4), generator=torch.Generator().manual_seed(0))
    assert raw.abs().max() > 1.0  # the fake model overshoots; nothing clamps it


def test_ddpm_posterior_by_hand():
    s = NoiseSchedule(kind="cosine", steps=T)
    sampler = DDPMSampler(s)
    ab = s.alphas_cumprod
    x_t = torch.randn(3, 4, dtype=torch.float64)
    x0 = torch.rand(3, 4, dtype=torch.float64) * 2 - 1
    for t in (49, 30, 1, 0):
        ab_prev = ab[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        beta = s.betas[t]
        coef1 = beta * ab_prev.sqrt() / (1 - ab[t])
        coef2 = (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab[t])
        var = beta * (1 - ab_prev) / (1 - ab[t])
        mean, v = sampler.posterior(x0, t, x_t)
        torch.testing.assert_close(mean, coef1 * x0 + coef2 * x_t)
        assert v == pytest.approx(max(var.item(), 1e-20), rel=1e-9)
    # t = 0 adds no noise
    torch.testing.assert_close(sampler.step(x0, 0, x_t), sampler.posterior(x0, 0, x_t)[0])


@pytest.mark.parametrize("S", [None, 10])
def test_ddpm_step_and_loop_match_diffusers(S):
    ref = _ddpm_ref()
    if S is not None:
        ref.set_timesteps(S)
    sampler = DDPMSampler(NoiseSchedule(kind="cosine", steps=T), num_inference_steps=S)
    assert torch.equal(sampler.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(5)
    for t in ref.timesteps.tolist():
        x_t = torch.randn(4, 6, generator=g)
        x0_pred = 1.5 * torch.randn(4, 6, generator=g)
        ours = sampler.step(x0_pred, t, x_t, generator=torch.Generator().manual_seed(t))
        theirs = ref.step(x0_pred, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)

    shape = (4, 7)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=g)
    for t in ref.timesteps.tolist():
        out = ref.step(fake_model(x, torch.full((shape[0],), t)), t, x, generator=g)
        x, last_x0 = out.prev_sample, out.pred_original_sample
    ours = sampler.sample(fake_model, shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(ours, last_x0, atol=2e-5, rtol=1e-4)


def test_sample_passes_shared_timestep_batch():
    seen = []

    def fn(x_t, t):
        seen.append(t.tolist())
        return torch.zeros_like(x_t)

    make_sampler("ddpm", NoiseSchedule(kind="linear", steps=20), num_inference_steps=4).sample(fn, (3, 2))
    assert seen == [[15] * 3, [10] * 3, [5] * 3, [0] * 3]
