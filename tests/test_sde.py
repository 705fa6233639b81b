"""Flow-GRPO's SDE step against torch.distributions and the formulas of FORMULAS.md by hand."""
import math

import pytest
import torch
from torch.distributions import Normal

from progrpo_ref.sde import sde_step_with_logprob


def by_hand(v, x, sigma, sigma_next, a):
    """FORMULAS.md, one scalar sigma at a time."""
    s = sigma_next if sigma == 1.0 else sigma
    g = a * math.sqrt(sigma / (1 - s))
    dt = sigma_next - sigma
    mu = x + dt * (v + g**2 / (2 * sigma) * (x + (1 - sigma) * v))
    return mu, g * math.sqrt(-dt)


@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.9), (0.7, 0.6), (0.3, 0.1), (0.1, 0.0)])
@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
def test_log_prob_matches_normal(sigma, sigma_next, a):
    g = torch.Generator().manual_seed(0)
    v, x = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    out = sde_step_with_logprob(v, x, sigma, sigma_next, a, generator=g)
    mu, std = by_hand(v, x, sigma, sigma_next, a)
    assert torch.allclose(out.mean, mu, atol=1e-6)
    assert torch.allclose(out.std.flatten(), torch.full((5,), std), rtol=1e-6)
    ref = Normal(mu, std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    assert out.log_prob.shape == (5,)
    assert torch.allclose(out.log_prob, ref, atol=1e-5)


def test_noise_is_gaussian_with_the_stated_std():
    g = torch.Generator().manual_seed(1)
    v, x = torch.randn(4000, 1, 8, 8, generator=g), torch.randn(4000, 1, 8, 8, generator=g)
    out = sde_step_with_logprob(v, x, 0.5, 0.4, 0.7, generator=g)
    z = (out.prev_sample - out.mean) / out.std
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1) < 0.01


def test_noise_level_zero_is_the_euler_step():
    g = torch.Generator().manual_seed(2)
    v, x = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    out = sde_step_with_logprob(v, x, 0.6, 0.5, 0.0)
    assert torch.allclose(out.prev_sample, x + (0.5 - 0.6) * v, atol=1e-6) and out.log_prob is None


def test_scoring_a_given_sample_and_per_sample_sigmas():
    g = torch.Generator().manual_seed(3)
    v, x, y = (torch.randn(3, 1, 8, 8, generator=g) for _ in range(3))
    sig, nxt = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.9, 0.4, 0.0])
    out = sde_step_with_logprob(v, x, sig, nxt, 0.7, prev_sample=y)
    assert torch.equal(out.prev_sample, y)
    for i in range(3):
        one = sde_step_with_logprob(v[i : i + 1], x[i : i + 1], sig[i].item(), nxt[i].item(), 0.7, prev_sample=y[i : i + 1])
        assert torch.allclose(out.log_prob[i], one.log_prob[0], atol=1e-6)
        assert torch.allclose(out.mean[i], one.mean[0], atol=1e-6)


def test_fp32_math_for_low_precision_inputs():
    v, x = torch.randn(2, 1, 8, 8).bfloat16(), torch.randn(2, 1, 8, 8).bfloat16()
    out = sde_step_with_logprob(v, x, 0.5, 0.4, 0.7)
    assert out.prev_sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32


def test_bad_sigmas():
    v = torch.zeros(1, 1, 8, 8)
    with pytest.raises(ValueError, match="must be < sigma"):
        sde_step_with_logprob(v, v, 0.5, 0.6)
    with pytest.raises(ValueError, match="noise_level=-1"):
        sde_step_with_logprob(v, v, 0.5, 0.4, -1)
