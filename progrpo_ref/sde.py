r"""One stochastic sampling step of a rectified flow, with its exact Gaussian log-probability.

Flow-GRPO turns the probability-flow ODE ``dx = v dsigma`` into an SDE with the same marginals, so
that every denoising step is a Gaussian policy ``pi_theta(x_{t+1} | x_t, c)``. With the diffusers
convention ``x_sigma = (1 - sigma) x0 + sigma eps``, velocity ``v = v_theta(x, sigma, c) ~ eps - x0``,
step ``dt = sigma' - sigma < 0`` (sigma' = next sigma) and noise level ``a``:

    g       = a * sqrt(sigma / (1 - s))             s = sigma, or sigma' when sigma = 1 (no 1/0)
    mu      = x + dt * ( v + g^2 / (2 sigma) * (x + (1 - sigma) v) )
              (ODE drift plus a score correction: x + (1 - sigma) v = eps_hat, score = -eps_hat / sigma)
    std     = g * sqrt(-dt)
    x'      = mu + std * z,  z ~ N(0, I)
    log pi  = mean over C, H, W of  -(x' - mu)^2 / (2 std^2) - log std - log sqrt(2 pi)

The log-prob is *averaged*, not summed, over the latent's elements (64 here, 65,536 for SD3.5 at
512 px), which is why PPO clip ranges for it are tiny. ``a = 0`` is the plain Euler ODE step
``x' = x + dt * v`` (its log-prob is undefined and returned as ``None``). All the math runs in fp32.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SDEStep(NamedTuple):
    prev_sample: torch.Tensor  # x' [B, C, H, W]: the next (less noisy) state
    log_prob: torch.Tensor | None  # [B], averaged over C, H, W; None when noise_level = 0
    mean: torch.Tensor  # mu [B, C, H, W]
    std: torch.Tensor  # [B, 1, 1, 1] per-element std of the transition, g * sqrt(-dt)


def _per_sample(s: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """A float or ``[B]`` tensor of sigmas -> ``[B, 1, 1, 1]`` fp32 on ``like``'s device."""
    s = torch.as_tensor(s, dtype=torch.float32, device=like.device)
    return s.reshape(-1, *([1] * (like.dim() - 1))).expand(like.shape[0], *([1] * (like.dim() - 1)))


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """Take (or, when ``prev_sample`` is given, score) one Flow-GRPO SDE step from x at sigma.

    velocity, sample: ``[B, C, H, W]``; sigma, sigma_next: floats or ``[B]``; returns ``SDEStep``.
    """
    if noise_level < 0:
        raise ValueError(f"noise_level={noise_level} must be >= 0")
    v, x = velocity.float(), sample.float()
    sigma, sigma_next = _per_sample(sigma, x), _per_sample(sigma_next, x)
    if (sigma_next >= sigma).any():
        raise ValueError(f"sigma_next={sigma_next.flatten()[0].item()} must be < sigma={sigma.flatten()[0].item()}")
    dt = sigma_next - sigma

    if noise_level == 0:  # Euler step of the probability-flow ODE
        mean = x + dt * v
        return SDEStep(mean if prev_sample is None else prev_sample.float(), None, mean, torch.zeros_like(sigma))

    s = torch.where(sigma >= 1.0, sigma_next, sigma)  # Flow-GRPO: avoid 1 / (1 - 1) at pure noise
    g = noise_level * torch.sqrt(sigma / (1.0 - s))
    mean = x + dt * (v + g**2 / (2.0 * sigma) * (x + (1.0 - sigma) * v))
    std = g * torch.sqrt(-dt)

    if prev_sample is None:
        z = torch.randn(x.shape, generator=generator, dtype=torch.float32,
                        device=generator.device if generator is not None else x.device)
        prev_sample = mean + std * z.to(x.device)
    prev_sample = prev_sample.float()
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2.0 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return SDEStep(prev_sample, log_prob.mean(dim=tuple(range(1, x.dim()))), mean, std)
