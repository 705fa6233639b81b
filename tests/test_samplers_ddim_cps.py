"""The DDIM and CPS samplers against independent references: diffusers' ``DDIMScheduler`` (schedule,
mean, std, deterministic step, v-prediction), diffusers' flow Euler step (CPS at a = 0),
``torch.distributions.Normal`` (log-probs), and closed-form marginals (CPS with point-mass data)."""
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from progrpo_ref.algorithm.samplers import (DDIM, FAMILIES, FlowCPS, cps_step_with_logprob, ddim_step_with_logprob,
                                  sampler_from_dict, sampler_to_dict)


def diffusers_ddim(T, **kw):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", **kw)
    s.set_timesteps(T)
    return s


def randn(*shape, g):
    return torch.randn(*shape, generator=g)


# ---------------------------------------------------------------- DDIM
@pytest.mark.parametrize("T, kw", [(20, {}), (10, {}), (50, {}),
                                   (20, dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"))])
def test_ddim_schedule_is_diffusers_trailing_schedule(T, kw):
    ref, ours = diffusers_ddim(T, **kw), DDIM(T, **kw)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod.float())
    assert torch.equal(ours.alpha_bars[:-1], ref.alphas_cumprod[ref.timesteps].float())
    assert ours.alpha_bars[-1] == ref.final_alpha_cumprod  # 1 - beta_0, not 1: the last step keeps a variance
    assert bool((ours.alpha_bars[1:] > ours.alpha_bars[:-1]).all())
    assert ours.model_time(0) == ref.timesteps[0]


def test_ddim_timesteps_match_diffusers_for_any_step_count():
    """Also when T does not divide N (diffusers rounds numpy's arange; for a few T, e.g. 61, it returns
    T + 1 timesteps, which we do not copy)."""
    from diffusers import DDIMScheduler

    checked = 0
    for T in (3, 7, 13, 48, 96, 144, 250):
        ref = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing")
        ref.set_timesteps(T)
        assert len(ref.timesteps) == T and torch.equal(DDIM(T).timesteps, ref.timesteps), T
        checked += 1
    assert checked == 7


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_ddim_mean_and_std_match_diffusers_step(prediction_type, eta):
    """diffusers' step with variance_noise z returns mu + std z: z = 0 gives mu, a second z the std."""
    T = 20
    ref, ours = diffusers_ddim(T, prediction_type=prediction_type), DDIM(T, eta=eta, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(0)
    x, out = randn(4, 1, 8, 8, g=g), randn(4, 1, 8, 8, g=g)
    for i in (0, 7, 12, 19):
        t = int(ref.timesteps[i])
        mean = ref.step(out, t, x, eta=eta, variance_noise=torch.zeros_like(x)).prev_sample
        ones = ref.step(out, t, x, eta=eta, variance_noise=torch.ones_like(x)).prev_sample
        step = ours.step(out, x, i, noise=torch.zeros_like(x))
        assert torch.allclose(step.mean, mean, atol=2e-5, rtol=1e-5), i
        assert torch.allclose(step.std.expand_as(x), ones - mean, atol=2e-5, rtol=1e-4), i
        assert step.std.flatten()[0] > 0


@pytest.mark.parametrize("T", [50, 20, 7])
def test_leading_spacing_is_stable_diffusion_v1s_schedule_and_step(T):
    """SD-v1's scheduler config (DDPO, DanceGRPO): scaled_linear betas, "leading" timesteps + steps_offset 1."""
    from diffusers import DDIMScheduler

    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ref = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=1, **sd)
    ref.set_timesteps(T)
    ours = DDIM.from_scheduler_config(dict(ref.config), T, eta=1.0, follow_spacing=True)
    assert ours.spacing == "leading" and ours.steps_offset == 1
    assert torch.equal(ours.timesteps, ref.timesteps)
    if T == 50:
        assert ours.timesteps[0] == 981 and ours.timesteps[-1] == 1
    g = torch.Generator().manual_seed(1)
    x, out = randn(3, 4, 8, 8, g=g), randn(3, 4, 8, 8, g=g)
    for i in (0, T // 2, T - 1):  # the last step goes to final_alpha_cumprod, as diffusers' does
        t = int(ref.timesteps[i])
        mean = ref.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
        ones = ref.step(out, t, x, eta=1.0, variance_noise=torch.ones_like(x)).prev_sample
        step = ours.step(out, x, i, noise=torch.zeros_like(x))
        assert torch.allclose(step.mean, mean, atol=2e-5, rtol=1e-5), i
        assert torch.allclose(step.std.expand_as(x), ones - mean, atol=2e-5, rtol=1e-4), i
    assert DDIM.from_scheduler_config(dict(ref.config), T).spacing == "trailing"  # the default is unchanged
    with pytest.raises(ValueError, match="steps_offset=1 must be"):
        DDIM(T, steps_offset=1)
    with pytest.raises(ValueError, match="spacing='linspace'"):
        DDIM(T, spacing="linspace")


def test_ddim_eta_zero_is_diffusers_deterministic_step():
    T = 20
    ref, ours = diffusers_ddim(T), DDIM(T, eta=1.0).deterministic()
    assert ours.eta == 0 and not ours.stochastic and ours.trainable_steps == 0
    g = torch.Generator().manual_seed(1)
    x, eps = randn(3, 1, 8, 8, g=g), randn(3, 1, 8, 8, g=g)
    for i in (0, 10, 19):
        step = ours.step(eps, x, i)
        assert step.log_prob is None and float(step.std.max()) == 0.0
        assert torch.allclose(step.prev_sample, ref.step(eps, int(ref.timesteps[i]), x, eta=0.0).prev_sample, atol=2e-5)


@pytest.mark.parametrize("i", [0, 10, 19])
def test_ddim_log_prob_is_the_gaussian_density_of_the_step(i):
    g = torch.Generator().manual_seed(2)
    x, eps, y = randn(5, 1, 8, 8, g=g), randn(5, 1, 8, 8, g=g), randn(5, 1, 8, 8, g=g)
    sampler = DDIM(20)
    step = sampler.step(eps, x, i, prev_sample=y)
    want = Normal(step.mean, step.std).log_prob(y).mean(dim=(1, 2, 3))
    assert torch.allclose(step.log_prob, want, atol=1e-4, rtol=1e-5)
    drawn = sampler.step(eps, x, i, noise=randn(5, 1, 8, 8, g=g))
    want = Normal(drawn.mean, drawn.std).log_prob(drawn.prev_sample).mean(dim=(1, 2, 3))
    assert torch.allclose(drawn.log_prob, want, atol=1e-4, rtol=1e-5)


def test_ddim_free_function_equals_the_sampler_step():
    g = torch.Generator().manual_seed(3)
    x, eps, z = randn(2, 1, 8, 8, g=g), randn(2, 1, 8, 8, g=g), randn(2, 1, 8, 8, g=g)
    s = DDIM(20)
    a = s.step(eps, x, 4, noise=z)
    b = ddim_step_with_logprob(eps, x, s.alpha_bars[4], s.alpha_bars[5], 1.0, noise=z)
    assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)


def test_ddim_preview_is_x0_hat_unclipped_and_exact_for_the_true_noise():
    """If the network returned the true noise, x0_hat recovers x0 exactly, also outside [-1, 1]."""
    g = torch.Generator().manual_seed(4)
    s = DDIM(20)
    x0, eps = 3 * randn(4, 1, 8, 8, g=g), randn(4, 1, 8, 8, g=g)
    for i in (0, 10, 19):
        a = s.alpha_bars[i]
        x = a.sqrt() * x0 + (1 - a).sqrt() * eps
        assert torch.allclose(s.preview(eps, x, i), x0, atol=2e-3 if i == 0 else 1e-4)
        v = a.sqrt() * eps - (1 - a).sqrt() * x0
        assert torch.allclose(DDIM(20, prediction_type="v_prediction").preview(v, x, i), x0, atol=1e-4)
    assert s.preview(eps, s.alpha_bars[19].sqrt() * x0 + (1 - s.alpha_bars[19]).sqrt() * eps, 19).abs().max() > 1


def test_ddim_from_scheduler_config_and_json_round_trip():
    from diffusers import DDPMScheduler

    cfg = dict(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).config)
    s = DDIM.from_scheduler_config(cfg, num_steps=10, eta=0.7)
    assert (s.beta_schedule, s.beta_start, s.num_steps, s.eta) == ("scaled_linear", 0.00085, 10, 0.7)
    assert FAMILIES["DDIM"] is DDIM and sampler_from_dict(sampler_to_dict(s)) == s
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
        DDIM.from_scheduler_config({**cfg, "prediction_type": "sample"})


def test_ddim_step_to_alpha_bar_one_is_deterministic():
    """diffusers' set_alpha_to_one=True final step: s_t = 0, so no log-prob (not a NaN)."""
    g = torch.Generator().manual_seed(9)
    x, eps = randn(2, 1, 8, 8, g=g), randn(2, 1, 8, 8, g=g)
    step = ddim_step_with_logprob(eps, x, 0.97, 1.0, eta=1.0, noise=randn(2, 1, 8, 8, g=g))
    assert step.log_prob is None and float(step.std.max()) == 0.0
    assert torch.allclose(step.prev_sample, (x - 0.03**0.5 * eps) / 0.97**0.5, atol=1e-5)  # lands on x0_hat
    with pytest.raises(ValueError, match="alpha_bar_next must be 1 for all samples or for none"):
        ddim_step_with_logprob(eps, x, 0.97, torch.tensor([1.0, 0.99]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(alpha_bar=0.0), r"alpha_bar=0 must lie in \(0, 1\]"),
    (dict(alpha_bar=1.5, alpha_bar_next=1.6), r"alpha_bar=1.5 must lie in \(0, 1\]"),
    (dict(alpha_bar_next=1.2), r"alpha_bar_next=1.2 must lie in \(0, 1\]"),
    (dict(alpha_bar=0.5, alpha_bar_next=0.4), "alpha_bar_next=0.4 must be larger than alpha_bar=0.5"),
    (dict(alpha_bar=0.5, alpha_bar_next=0.5), "alpha_bar_next=0.5 must be larger"),
    (dict(eta=1.5), r"eta=1.5 must be in \[0, 1\]"),
    (dict(eta=-0.1), r"eta=-0.1 must be in \[0, 1\]"),
    (dict(eta=math.nan), r"eta=nan must be in"),
    (dict(noise_pred=torch.zeros(2, 1, 4, 4)), r"noise_pred has shape \(2, 1, 4, 4\) but the sample"),
])
def test_ddim_bad_step_input_is_named(kwargs, match):
    args = dict(noise_pred=torch.zeros(2, 1, 8, 8), sample=torch.zeros(2, 1, 8, 8), alpha_bar=0.3, alpha_bar_next=0.6) | kwargs
    with pytest.raises(ValueError, match=match):
        ddim_step_with_logprob(**args)


@pytest.mark.parametrize("make, match", [
    (lambda: DDIM(20, eta=2.0), r"eta=2.0 must be in \[0, 1\]"),
    (lambda: DDIM(20, prediction_type="sample"), "prediction_type='sample' is not supported"),
    (lambda: DDIM(20, beta_schedule="cosine"), "beta_schedule='cosine' must be one of"),
    (lambda: DDIM(0), r"num_steps=0 must be an integer in \[1, 1000\]"),
    (lambda: DDIM(1000), "num_steps=1000 leaves a step whose alpha_bar does not increase"),
    (lambda: DDIM(20, beta_start=0.03, beta_end=0.02), "beta_start=0.03, beta_end=0.02"),
    (lambda: DDIM(20, beta_end=0.2), "alpha_bar at the first timestep 999 underflows to 0"),
    (lambda: DDIM(True), "num_steps=True must be an integer"),
    (lambda: DDIM.from_scheduler_config({"rescale_betas_zero_snr": True}), "rescale_betas_zero_snr=True"),
    (lambda: FlowCPS(1, 0.8), "num_steps=1 leaves CPS no stochastic step"),
    (lambda: FlowCPS(True), "num_steps=True must be an integer"),
])
def test_ddim_bad_sampler_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ---------------------------------------------------------------- CPS
def test_cps_at_noise_zero_is_diffusers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    T = 10
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=list(np.linspace(1.0, 1.0 / T, T)))
    g = torch.Generator().manual_seed(5)
    x, v = randn(3, 1, 8, 8, g=g), randn(3, 1, 8, 8, g=g)
    ode = FlowCPS(T, noise_level=0.8).deterministic()
    for i in (0, 5, 9):
        sched._step_index = i
        want = sched.step(v, sched.timesteps[i], x).prev_sample
        step = ode.step(v, x, i)
        assert step.log_prob is None and torch.allclose(step.prev_sample, want, atol=1e-6)


@pytest.mark.parametrize("i", [0, 4, 8])
def test_cps_log_prob_is_the_gaussian_density_and_std_is_sigma_next_sin(i):
    g = torch.Generator().manual_seed(6)
    x, v, y = randn(5, 1, 8, 8, g=g), randn(5, 1, 8, 8, g=g), randn(5, 1, 8, 8, g=g)
    s = FlowCPS(10, 0.8)
    step = s.step(v, x, i, prev_sample=y)
    assert torch.allclose(step.std.flatten(), s.sigmas[i + 1] * math.sin(0.4 * math.pi) * torch.ones(5))
    want = Normal(step.mean, step.std).log_prob(y).mean(dim=(1, 2, 3))
    assert torch.allclose(step.log_prob, want, atol=1e-4, rtol=1e-5)
    free = cps_step_with_logprob(v, x, s.sigmas[i], s.sigmas[i + 1], 0.8, prev_sample=y)
    assert torch.equal(free.log_prob, step.log_prob)


def test_cps_preserves_the_marginal_exactly_for_point_mass_data():
    """Data x0 = m (a point): then x0_hat = m and eps_hat = eps exactly, and one CPS step from
    x_sigma ~ N((1 - sigma) m, sigma^2) lands on N((1 - sigma') m, sigma'^2) for any a: the
    coefficients of x0 and of the noise are preserved. Monte Carlo over 1.28M elements."""
    m, g = 0.5, torch.Generator().manual_seed(7)
    s = FlowCPS(10, 0.8)
    for i in (0, 3, 7):
        sig, nxt = s.sigmas[i].item(), s.sigmas[i + 1].item()
        x = (1 - sig) * m + sig * randn(20000, 1, 8, 8, g=g)
        v = (x - (1 - sig) * m) / sig - m  # eps - x0, with eps = (x - (1 - sigma) m) / sigma
        out = s.step(v, x, i, noise=randn(20000, 1, 8, 8, g=g)).prev_sample
        assert out.mean().item() == pytest.approx((1 - nxt) * m, abs=2e-3)
        assert out.var().item() == pytest.approx(nxt**2, rel=5e-3)


def test_cps_last_step_is_deterministic_and_not_trainable():
    s = FlowCPS(10, 0.8)
    assert s.trainable_steps == 9 and FlowCPS(10, 0.0).trainable_steps == 0
    g = torch.Generator().manual_seed(8)
    x, v = randn(2, 1, 8, 8, g=g), randn(2, 1, 8, 8, g=g)
    last = s.step(v, x, 9, noise=randn(2, 1, 8, 8, g=g))
    assert last.log_prob is None and torch.allclose(last.prev_sample, x - s.sigmas[9] * v)  # lands on x0_hat
    assert FAMILIES["FlowCPS"] is FlowCPS and sampler_from_dict(sampler_to_dict(s)) == s


@pytest.mark.parametrize("kwargs, match", [
    (dict(noise_level=1.2), r"noise_level=1.2 must be in \[0, 1\]"),
    (dict(sigma=1.5), r"sigma=1.5 must lie in \(0, 1\]"),
    (dict(sigma_next=0.7), r"sigma_next=0.7 must lie in \[0, sigma\)"),
    (dict(sigma_next=torch.tensor([0.0, 0.2])), "sigma_next must be 0 for all samples or for none"),
])
def test_cps_bad_input_is_named(kwargs, match):
    args = dict(velocity=torch.zeros(2, 1, 8, 8), sample=torch.zeros(2, 1, 8, 8), sigma=0.5, sigma_next=0.4) | kwargs
    with pytest.raises(ValueError, match=match):
        cps_step_with_logprob(**args)
