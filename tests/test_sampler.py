import pytest
import torch

from diffret.generator.sampler import DDIMSampler, DDPMSampler, leading_timesteps, make_sampler
from diffret.generator.schedule import NoiseSchedule

T = 50


def _ddim_ref(set_alpha_to_one=True, steps=T):
    """diffusers' DDIM configured as ours; which epsilon (clipped or raw x0) is chosen per step()."""
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
    sampler = DDIMSampler(NoiseSchedule(kind="cosine", train_steps=T), num_inference_steps=S)
    assert sampler.timesteps.dtype == torch.long
    assert torch.equal(sampler.timesteps, ref.timesteps)
    assert torch.equal(leading_timesteps(T, S), ref.timesteps)


def test_too_many_steps_raise():
    s = NoiseSchedule(kind="cosine", train_steps=T)
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
        NoiseSchedule(kind="cosine", train_steps=T), S, eta=eta,
        set_alpha_to_one=set_alpha_to_one, use_clipped_model_output=use_clipped,
    )
    g = torch.Generator().manual_seed(1)
    for t in ref.timesteps.tolist():
        x_t = torch.randn(4, 6, generator=g)
        x0_pred = 1.5 * torch.randn(4, 6, generator=g)  # partly outside [-1, 1]: clipping matters
        ours, x0 = sampler.step(x0_pred, t, x_t, generator=torch.Generator().manual_seed(t))
        assert torch.equal(x0, x0_pred.clamp(-1, 1))
        theirs = ref.step(
            x0_pred, t, x_t, eta=eta, use_clipped_model_output=use_clipped,
            generator=torch.Generator().manual_seed(t),
        ).prev_sample
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)


def _diffusers_trajectory(S, eta, use_clipped, shape=(5, 8), seed=123):
    """diffusers' DDIM loop over fake_model -> (final x_prev, last clipped x0, max |x0_hat| seen)."""
    ref = _ddim_ref()
    ref.set_timesteps(S)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    peak = 0.0
    for t in ref.timesteps.tolist():
        x0_hat = fake_model(x, torch.full((shape[0],), t))
        peak = max(peak, x0_hat.abs().max().item())
        out = ref.step(x0_hat, t, x, eta=eta, use_clipped_model_output=use_clipped, generator=g)
        x, last_x0 = out.prev_sample, out.pred_original_sample
    return x, last_x0, peak


@pytest.mark.parametrize("ddim_eps", ["clamped", "raw"])
@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("S", [50, 10])
def test_ddim_full_loop_matches_diffusers(ddim_eps, eta, S):
    """clamped (the default, guided-diffusion's ddim_sample) = diffusers' use_clipped_model_output=True;
    raw = diffusers' default. Over a whole trajectory whose x0 predictions leave [-1, 1]."""
    x, last_x0, peak = _diffusers_trajectory(S, eta, use_clipped=ddim_eps == "clamped")
    assert peak > 1.2  # the rule matters only when x0_hat leaves [-1, 1]
    sampler = make_sampler("ddim", NoiseSchedule(kind="cosine", train_steps=T), num_inference_steps=S, eta=eta,
                           ddim_eps=ddim_eps)
    ours = sampler.sample(fake_model, (5, 8), generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(ours, last_x0, atol=2e-5, rtol=1e-4)
    assert ours.abs().max() <= 1.0
    # with set_alpha_to_one the final x_prev is the clipped x0 prediction itself
    torch.testing.assert_close(x, last_x0, atol=1e-6, rtol=0)


def test_ddim_default_is_the_clamped_epsilon_and_raw_differs():
    s = NoiseSchedule(kind="cosine", train_steps=T)
    assert DDIMSampler(s).use_clipped_model_output and make_sampler("ddim", s).use_clipped_model_output
    assert not make_sampler("ddim", s, ddim_eps="raw").use_clipped_model_output
    runs = {e: make_sampler("ddim", s, ddim_eps=e).sample(fake_model, (5, 8),
                                                          generator=torch.Generator().manual_seed(123))
            for e in ("clamped", "raw")}
    assert (runs["clamped"] - runs["raw"]).abs().max() > 1e-2
    _, theirs_default, _ = _diffusers_trajectory(T, 0.0, use_clipped=False)  # diffusers' own default is "raw"
    torch.testing.assert_close(runs["raw"], theirs_default, atol=2e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="ddim_eps"):
        make_sampler("ddim", s, ddim_eps="clipped")
    ddpm = make_sampler("ddpm", s, ddim_eps="raw")  # DDPM's posterior always takes the clamped x0
    assert isinstance(ddpm, DDPMSampler)


# T = 4 cosine, alpha_bar_t = cos^2(((t+1)/4 + 0.008)/1.008 pi/2) / cos^2(0.008/1.008 pi/2): S = 2 strided
# steps t = 2, 0. x_T = (0.5, -1.2, 0.9); the denoiser x0_hat(x, t) = (0.4 + 1.05 t) x + 0.3 t - 0.1.
#   t = 2: x0_hat = 2.5 x_T + 0.5 = (1.75, -2.5, 2.75), clamped c = (1, -1, 1)
#          clamped: eps = (x_T - sqrt(ab_2) c) / sqrt(1 - ab_2); raw: eps = (x_T - sqrt(ab_2) x0_hat) / sqrt(1 - ab_2)
#          x_0 = sqrt(ab_0) c + sqrt(1 - ab_0) eps
#   t = 0: result = clamp(0.4 x_0 - 0.1)
HAND = {
    "alpha_bar": (0.847012161327, 0.493843590441, 0.144272102386, 0.000144272102),
    "clamped": {"eps": (0.12990389, -0.88661515, 0.56231032), "x_prev": (0.97114280, -1.26712027, 1.14027278),
                "out": (0.28845712, -0.60684811, 0.35610911)},
    "raw": {"eps": (-0.17804922, -0.27070892, -0.15624694), "x_prev": (0.85069107, -1.02621680, 0.85921874),
            "out": (0.24027643, -0.51048672, 0.24368750)},
}


@pytest.mark.parametrize("ddim_eps", ["clamped", "raw"])
def test_ddim_two_strided_steps_by_hand(ddim_eps):
    s = NoiseSchedule(kind="cosine", train_steps=4)
    ab = HAND["alpha_bar"]
    assert s.alphas_cumprod.tolist() == pytest.approx(ab, abs=1e-11)
    x_T = torch.tensor([[0.5, -1.2, 0.9]], dtype=torch.float64)
    fn = lambda x, t: (0.4 + 1.05 * t[:, None].to(x.dtype)) * x + 0.3 * t[:, None].to(x.dtype) - 0.1  # noqa: E731
    sampler = make_sampler("ddim", s, num_inference_steps=2, ddim_eps=ddim_eps)
    assert sampler.timesteps.tolist() == [2, 0]
    want = HAND[ddim_eps]
    x0_hat = fn(x_T, torch.tensor([2]))
    assert x0_hat[0].tolist() == pytest.approx([1.75, -2.5, 2.75])
    # the formulas, then the numbers written out
    src = x0_hat.clamp(-1, 1) if ddim_eps == "clamped" else x0_hat
    eps = (x_T - ab[2] ** 0.5 * src) / (1 - ab[2]) ** 0.5
    assert eps[0].tolist() == pytest.approx(want["eps"], abs=1e-8)
    x_prev, _ = sampler.step(x0_hat, 2, x_T)
    torch.testing.assert_close(x_prev, ab[0] ** 0.5 * x0_hat.clamp(-1, 1) + (1 - ab[0]) ** 0.5 * eps, atol=1e-12,
                               rtol=0)
    assert x_prev[0].tolist() == pytest.approx(want["x_prev"], abs=1e-8)
    out = sampler.sample(fn, (1, 3), x_T=x_T, dtype=torch.float64)
    assert out[0].tolist() == pytest.approx(want["out"], abs=1e-8)


def test_ddim_deterministic_and_unclipped():
    s = NoiseSchedule(kind="cosine", train_steps=T)
    a = DDIMSampler(s, 10).sample(fake_model, (3, 4), generator=torch.Generator().manual_seed(0))
    b = DDIMSampler(s, 10).sample(fake_model, (3, 4), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    raw = DDIMSampler(s, 10, clip_sample=False).sample(fake_model, (3, 4), generator=torch.Generator().manual_seed(0))
    assert raw.abs().max() > 1.0  # the fake model overshoots; nothing clamps it


def test_ddpm_posterior_by_hand():
    s = NoiseSchedule(kind="cosine", train_steps=T)
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
    torch.testing.assert_close(sampler.step(x0, 0, x_t)[0], sampler.posterior(x0, 0, x_t)[0])


@pytest.mark.parametrize("S", [None, 10])
def test_ddpm_step_and_loop_match_diffusers(S):
    ref = _ddpm_ref()
    if S is not None:
        ref.set_timesteps(S)
    sampler = DDPMSampler(NoiseSchedule(kind="cosine", train_steps=T), num_inference_steps=S)
    assert torch.equal(sampler.timesteps, ref.timesteps)
    g = torch.Generator().manual_seed(5)
    for t in ref.timesteps.tolist():
        x_t = torch.randn(4, 6, generator=g)
        x0_pred = 1.5 * torch.randn(4, 6, generator=g)
        ours, x0 = sampler.step(x0_pred, t, x_t, generator=torch.Generator().manual_seed(t))
        assert torch.equal(x0, x0_pred.clamp(-1, 1))
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

    make_sampler("ddpm", NoiseSchedule(kind="linear", train_steps=20), num_inference_steps=4).sample(fn, (3, 2))
    assert seen == [[15] * 3, [10] * 3, [5] * 3, [0] * 3]


@pytest.mark.parametrize("ddim_eps", ["clamped", "raw"])
def test_rerank_fast_path_follows_the_sampler_rule(ddim_eps):
    """generator/rerank.py's route (the denoiser's `sampling` in the sampler's `run`) equals
    DDIMSampler.sample over the plain denoiser formula, for either epsilon rule, with x0
    predictions well outside [-1, 1]."""
    from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser
    from diffret.generator.rerank import generate

    torch.manual_seed(0)
    nq, nv, F, D, K, seed = 6, 9, 4, 16, 5, 7
    text, frames = torch.randn(nq, D), torch.randn(nv, F, D)
    mask = torch.arange(F)[None, :] < torch.randint(2, F + 1, (nv,))[:, None]
    sampler = make_sampler("ddim", NoiseSchedule(kind="cosine", train_steps=20), ddim_eps=ddim_eps)
    for model in (T2VDenoiser(D).eval(), V2TDenoiser(D).eval()):
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.4)
        t2v = isinstance(model, T2VDenoiser)
        cand = torch.stack([torch.randperm(nv if t2v else nq)[:K] for _ in range(nq if t2v else nv)])
        if t2v:
            args, n = (text, None, frames, mask), nq
            fn = lambda x, t: model.reference_forward(x, t, text, frames[cand], mask[cand])  # noqa: E731
        else:
            args, n = (frames, mask, text, None), nv
            fn = lambda x, t: model.reference_forward(x, t, text[cand], frames, mask)  # noqa: E731
        peak = []

        def recorded(x, t):
            out = fn(x, t)
            peak.append(out.abs().max().item())
            return out

        with torch.no_grad():
            ref = sampler.sample(recorded, (n, K), generator=torch.Generator().manual_seed(seed))
        assert max(peak) > 2.0
        fast = generate(model, *args, sampler, cand, alpha=1.5, temp=2.0, chunk=n, seed=seed)
        torch.testing.assert_close(fast, 1.5 * torch.softmax(2.0 * ref, 1), atol=1e-5, rtol=0)


def test_a_generator_samples_on_its_own_schedule():
    """Generator.schedule() is the config's schedule (one place builds it); .sampler() strides it and
    refuses more sampling steps than the generator's T."""
    from diffret.generator.config import GeneratorConfig
    from diffret.generator.denoiser import T2VDenoiser, V2TDenoiser
    from diffret.generator.generator import Generator
    from diffret.generator.schedule import ScheduleConfig

    cfg = GeneratorConfig(train_steps=20, schedule="linear", beta_scale=0.5)
    gen = Generator(cfg, T2VDenoiser(8), V2TDenoiser(8), {"width": 8})
    assert cfg.schedule_config() == ScheduleConfig(kind="linear", train_steps=20, beta_scale=0.5)
    assert torch.equal(gen.schedule().betas, NoiseSchedule(kind="linear", train_steps=20, beta_scale=0.5).betas)
    ddim = gen.sampler()
    assert isinstance(ddim, DDIMSampler) and ddim.num_inference_steps == 20 and ddim.use_clipped_model_output
    ddpm = gen.sampler("ddpm", 5, clamp=False)
    assert isinstance(ddpm, DDPMSampler) and ddpm.timesteps.tolist() == [16, 12, 8, 4, 0] and not ddpm.clip_sample
    assert not gen.sampler("ddim", 4, ddim_eps="raw", eta=0.5).use_clipped_model_output
    with pytest.raises(ValueError, match="--steps 21 is more than the generator's 20 diffusion steps"):
        gen.sampler("ddim", 21)
