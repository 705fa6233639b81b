"""The flow SDE sampler against independent references: diffusers' scheduler (schedule and ODE step),
torch.distributions (log-prob), and the closed-form marginals of Gaussian data (moments, preview).

For data x0 ~ N(m, s0^2) per element, x_sigma = (1 - sigma) x0 + sigma eps is Gaussian with mean
(1 - sigma) m and variance V = (1 - sigma)^2 s0^2 + sigma^2, and the exact velocity E[eps - x0 | x] and
clean estimate E[x0 | x] are linear in x (``exact_velocity``, ``exact_x0``). A sampler with the right
drift and noise must carry N(0, 1) at sigma = 1 to these marginals, the closer the finer the grid.
The measurements behind the tolerances are in docs/derivations.md (section "How exact is the SDE step").
"""
import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from progrpo_ref.algorithm.samplers import FlowSDE, flow_sigmas, sde_step_with_logprob

M, S0 = 0.5, 0.3  # the Gaussian "data"
A = 0.7  # Flow-GRPO's noise level
N = 20000  # latents of 64 elements: 1.28M samples per moment


def exact_velocity(x, sigma):
    V = (1 - sigma) ** 2 * S0**2 + sigma**2
    return -M + (sigma - (1 - sigma) * S0**2) / V * (x - (1 - sigma) * M)


def exact_x0(x, sigma):
    V = (1 - sigma) ** 2 * S0**2 + sigma**2
    return M + (1 - sigma) * S0**2 / V * (x - (1 - sigma) * M)


def marginal(sigma):
    return (1 - sigma) * M, (1 - sigma) ** 2 * S0**2 + sigma**2


def x_at(sigma, g):
    return (1 - sigma) * (M + S0 * torch.randn(N, 1, 8, 8, generator=g)) + sigma * torch.randn(N, 1, 8, 8, generator=g)


# ---------------------------------------------------------------- schedule and ODE step against diffusers
@pytest.mark.parametrize("T, shift", [(10, 1.0), (20, 1.0), (10, 3.0), (7, 2.5)])
def test_schedule_matches_diffusers(T, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=list(np.linspace(1.0, 1.0 / T, T)))
    ours = FlowSDE(T, shift=shift).sigmas
    assert ours.dtype == torch.float32 and ours.shape == (T + 1,)
    assert torch.allclose(ours, sched.sigmas.float(), atol=1e-6, rtol=0)
    if shift == 1.0:
        assert torch.equal(ours, sched.sigmas.float())


def test_deterministic_mode_is_diffusers_euler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    T = 10
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=list(np.linspace(1.0, 1.0 / T, T)))
    ode = FlowSDE(T).deterministic()
    assert not ode.stochastic and ode.noise_level == 0 and ode.sigmas.equal(FlowSDE(T).sigmas)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(3, 1, 8, 8, generator=g)
        want = sched.step(v, t, x, return_dict=False)[0]
        step = ode.step(v, x, i)
        assert step.log_prob is None and torch.allclose(step.prev_sample, want, atol=1e-6)
        x = want


# ---------------------------------------------------------------- the Gaussian step
@pytest.mark.parametrize("i", [0, 3, 9])
@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_log_prob_is_the_gaussian_density_of_the_step(i, a):
    g = torch.Generator().manual_seed(i)
    sampler = FlowSDE(10, a)
    v, x, z = (torch.randn(5, 1, 8, 8, generator=g) for _ in range(3))
    out = sampler.step(v, x, i, noise=z)
    assert torch.equal(out.prev_sample, out.mean + out.std * z)  # x' = mu + s z with the given z
    ref = Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    assert out.log_prob.shape == (5,) and torch.allclose(out.log_prob, ref, atol=1e-5)
    y = torch.randn(5, 1, 8, 8, generator=g)  # scoring a given sample
    scored = sampler.step(v, x, i, prev_sample=y)
    assert torch.allclose(scored.log_prob, Normal(out.mean, out.std).log_prob(y).mean(dim=(1, 2, 3)), atol=1e-5)


def test_first_steps_keep_a_variance_offset_of_about_a4_over_4_at_any_T():
    """From exact samples of x at sigma_i, one step should land on the marginal at sigma_{i+1}. It does,
    up to O(1/T), except near sigma = 1, where g^2 = a^2 sigma / (1 - sigma) diverges: the step from
    sigma = 1 - i/T adds about a^4 / (4 i^2) to the variance however fine the grid. The guarded first
    step (sigma = 1) behaves like i = 1, as the unguarded second does; its excess is
    a^4 / 4 + a^2 / T - s0^2 / T^2 (derivation in docs/derivations.md, section 2)."""
    g = torch.Generator().manual_seed(0)
    for T in (10, 40, 160):
        sampler = FlowSDE(T, A)
        s = sampler.sigmas
        excess = []
        for i in (0, 1, 2, T // 2):
            x = x_at(s[i].item(), g)
            y = sampler.step(exact_velocity(x, s[i].item()), x, i, noise=torch.randn(x.shape, generator=g)).prev_sample
            excess.append(y.var().item() - marginal(s[i + 1].item())[1])
        assert excess[0] == pytest.approx(A**4 / 4 + A**2 / T, abs=0.006), (T, excess)
        assert excess[1] == pytest.approx(excess[0], abs=0.006), (T, excess)  # not the guard: sigma near 1
        assert A**4 / 16 < excess[2] < excess[1] / 2, (T, excess)
        assert abs(excess[3]) < 0.01, (T, excess)


def test_sde_moments_approach_those_of_x_sigma_as_T_grows():
    """Full runs from N(0, 1) at sigma = 1 with the exact velocity: at fixed sigma (0.5 and the final
    sample) mean and variance approach the marginal's, the error shrinking with T; the excess that the
    first steps inject is forgotten along the way, slowly (like T^(-a^2) at fixed sigma, docs/derivations.md
    section 2.5). Tolerances: about 1.3x the errors measured at each T."""
    g = torch.Generator().manual_seed(1)
    tolerance = {10: (0.08, 0.015), 40: (0.024, 0.0035), 160: (0.010, 0.0012)}  # variance error at sigma 0.5, 0
    errors = []
    for T, (tol_half, tol_end) in tolerance.items():
        sampler = FlowSDE(T, A)
        s = sampler.sigmas
        x = torch.randn(N, 1, 8, 8, generator=g)
        for i in range(T):
            x = sampler.step(exact_velocity(x, s[i].item()), x, i, noise=torch.randn(x.shape, generator=g)).prev_sample
            if i + 1 == T // 2:
                assert s[i + 1].item() == pytest.approx(0.5)
                half = abs(x.var().item() - marginal(0.5)[1])
                assert abs(x.mean().item() - marginal(0.5)[0]) < 0.003 and half < tol_half, (T, half)
        end = abs(x.var().item() - S0**2)
        assert abs(x.mean().item() - M) < 0.003 and end < tol_end, (T, end)
        errors.append((half, end))
    assert errors[0][0] > errors[1][0] > errors[2][0] and errors[0][1] > errors[1][1] > errors[2][1]


def test_preview_is_the_posterior_mean_of_x0_under_the_exact_velocity():
    g = torch.Generator().manual_seed(2)
    sampler = FlowSDE(10)
    for i in (0, 4, 9):
        sigma = sampler.sigmas[i].item()
        x = torch.randn(4, 1, 8, 8, generator=g)
        assert torch.allclose(sampler.preview(exact_velocity(x, sigma), x, i), exact_x0(x, sigma), atol=1e-5)


def test_per_sample_sigmas_and_fp32():
    g = torch.Generator().manual_seed(3)
    v, x, y = (torch.randn(3, 1, 8, 8, generator=g) for _ in range(3))
    sig, nxt = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.9, 0.4, 0.0])
    out = sde_step_with_logprob(v, x, sig, nxt, 0.7, prev_sample=y)
    for i in range(3):
        one = sde_step_with_logprob(v[i:i + 1], x[i:i + 1], sig[i].item(), nxt[i].item(), 0.7, prev_sample=y[i:i + 1])
        assert torch.allclose(out.log_prob[i], one.log_prob[0], atol=1e-6)
    low = sde_step_with_logprob(v.bfloat16(), x.bfloat16(), 0.5, 0.4, 0.7)
    assert low.prev_sample.dtype == torch.float32 and low.log_prob.dtype == torch.float32


def test_noise_is_standard_normal_when_drawn():
    g = torch.Generator().manual_seed(4)
    v, x = torch.randn(4000, 1, 8, 8, generator=g), torch.randn(4000, 1, 8, 8, generator=g)
    out = FlowSDE(10).step(v, x, 5, generator=g)
    z = (out.prev_sample - out.mean) / out.std
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=1.2), r"sigma=1.2 must lie in \(0, 1\]"),
    (dict(sigma=0.0, sigma_next=0.0), r"must lie in \(0, 1\]"),
    (dict(sigma_next=-0.1), r"sigma_next=-0.1 must lie in \[0, sigma\) with sigma=0.5"),
    (dict(sigma_next=0.6), r"sigma_next=0.6 must lie in \[0, sigma\)"),
    (dict(noise_level=-1), "noise_level=-1 must be in"),
    (dict(noise_level=1.5), r"noise_level=1.5 must be in \[0, sqrt\(2\)\)"),
    (dict(sample=torch.zeros(2, 1, 4, 4)), r"velocity has shape \(2, 1, 8, 8\) but the sample \(2, 1, 4, 4\)"),
    (dict(prev_sample=torch.zeros(3, 1, 8, 8)), r"prev_sample has shape \(3, 1, 8, 8\)"),
    (dict(sigma=torch.tensor([0.5, 0.4, 0.3])), r"sigma has shape \(3,\); expected a float or \[B\] with B = 2"),
])
def test_bad_step_input_is_named(kwargs, match):
    args = dict(velocity=torch.zeros(2, 1, 8, 8), sample=torch.zeros(2, 1, 8, 8), sigma=0.5, sigma_next=0.4) | kwargs
    with pytest.raises(ValueError, match=match):
        sde_step_with_logprob(**args)


@pytest.mark.parametrize("make, match", [
    (lambda: FlowSDE(0), "num_steps=0 must be an integer >= 1"),
    (lambda: FlowSDE(10.0), "num_steps=10.0 must be an integer"),
    (lambda: FlowSDE(10, shift=0), "shift=0 must be a finite number > 0"),
    (lambda: FlowSDE(10, noise_level=math.nan), "noise_level=nan"),
    (lambda: FlowSDE(10).step(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), 10), r"step i=10 must be an integer in \[0, 10\)"),
    (lambda: FlowSDE(10).preview(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), -1), "step i=-1"),
    (lambda: flow_sigmas(3, shift=-1.0), "shift=-1.0"),
])
def test_bad_sampler_input_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()
