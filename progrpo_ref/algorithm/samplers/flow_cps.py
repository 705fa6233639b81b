r"""Coefficients-Preserving Sampling (CPS) for rectified flows, with the exact Gaussian log-prob of its step.

Flow-GRPO's recommended flow sampler since late 2025. With x_sigma = (1 - sigma) x0 + sigma eps and the
velocity v ~ eps - x0, the network's estimates at (x, sigma) are x0_hat = x - sigma v and
eps_hat = x + (1 - sigma) v. A step to sigma' re-noises x0_hat to exactly the noise level sigma', part
of the noise from eps_hat and part fresh (noise level a in [0, 1]; Flow-GRPO suggests 0.8):

    s       = sigma' sin(a pi / 2)                              (per-element std; no sqrt(dt) factor)
    mu      = (1 - sigma') x0_hat + sqrt(sigma'^2 - s^2) eps_hat
    x'      = mu + s z,  z ~ N(0, I)
    log pi  = mean over C, H, W of  -(x' - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)

The coefficients of x0 and eps in x' stay (1 - sigma') and sigma' (hence the name). a = 0 is the
Euler step x + (sigma' - sigma) v. The last step (sigma' = 0) has s = 0: it is deterministic, has no
log-prob and is never trained on (``trainable_steps = T - 1``).

How this differs from Flow-GRPO's code: it scores a CPS step with -mean((x' - mu)^2) only. The dropped
constants cancel in the policy ratio, but the factor 1 / (2 s^2) does not, and s changes every step:
its per-step log-ratio is 2 s^2 times ours (at a = 0.8 and 10 uniform steps, 2 s^2 runs from 1.46 at
the first step down to 0.018 at the ninth), so a clip range means something different at every step
there. Ours is the exact log-density, as for the SDE sampler, so the same clip range (1e-3 at our
64-element latents) bounds the same per-step change of the step's density under both samplers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Sampler, SamplerStep, check_pair, gaussian_step, per_sample
from .flow_sde import FlowSchedule


def cps_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float = 0.8,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> SamplerStep:
    """Take (or, when ``prev_sample`` is given, score) one CPS step from x at sigma to sigma_next.

    velocity, sample ``[B, C, H, W]``; sigma in (0, 1], sigma_next in [0, sigma): floats or ``[B]``.
    ``log_prob`` is ``None`` when the step is deterministic (a = 0, or sigma_next = 0).
    """
    _check_level(noise_level)
    check_pair(velocity, sample, "velocity")
    s, s_next = per_sample(sigma, sample, "sigma"), per_sample(sigma_next, sample, "sigma_next")
    bad = ~((s > 0) & (s <= 1))
    if bad.any():
        raise ValueError(f"sigma={s[bad].flatten()[0].item():.6g} must lie in (0, 1]")
    bad = ~((s_next >= 0) & (s_next < s))
    if bad.any():
        raise ValueError(f"sigma_next={s_next[bad].flatten()[0].item():.6g} must lie in [0, sigma)")
    last = s_next == 0
    if last.any() and not last.all():
        raise ValueError("sigma_next must be 0 for all samples or for none (the step to 0 is deterministic)")
    deterministic = noise_level == 0 or bool(last.all())
    return _step(velocity, sample, sigma, sigma_next, noise_level, prev_sample, generator, noise, deterministic)


def _check_level(noise_level) -> None:
    if isinstance(noise_level, bool) or not (isinstance(noise_level, (int, float)) and 0 <= noise_level <= 1):
        raise ValueError(f"noise_level={noise_level!r} must be in [0, 1] (s = sigma' sin(a pi / 2); Flow-GRPO uses 0.8)")


def _step(velocity, sample, sigma, sigma_next, noise_level, prev_sample, generator, noise, deterministic) -> SamplerStep:
    """The step for valid sigmas; ``deterministic`` when a = 0 or sigma_next = 0 (known without a device sync)."""
    check_pair(velocity, sample, "velocity")
    v, x = velocity.float(), sample.float()
    sigma, sigma_next = per_sample(sigma, x, "sigma"), per_sample(sigma_next, x, "sigma_next")
    for name, t in (("prev_sample", prev_sample), ("noise", noise)):
        if t is not None:
            check_pair(t, x, name)
    x0_hat = x - sigma * v
    eps_hat = x + (1 - sigma) * v
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp_min(0)) * eps_hat
    if deterministic:  # a = 0 (the Euler step), or the last step to sigma' = 0
        return SamplerStep(mean if prev_sample is None else prev_sample.float(), None, mean, std)
    return gaussian_step(mean, std, prev_sample, generator, noise)


@dataclass(frozen=True)
class FlowCPS(FlowSchedule, Sampler):
    """Flow-GRPO's Coefficients-Preserving Sampler on a ``num_steps`` schedule; a = 0 is the Euler ODE."""

    num_steps: int = 10
    """T: sampling steps"""
    noise_level: float = 0.8
    """a in [0, 1]: the fresh-noise share, s = sigma' sin(a pi / 2) (Flow-GRPO suggests 0.8)"""
    shift: float = 1.0
    """time shift of the schedule (SD3 uses 3.0); 1 is the uniform grid"""
    grid: tuple[float, ...] | None = None
    """explicit sigma_0 .. sigma_{T-1} (0 is appended), e.g. a pipeline's (``from_scheduler``)"""

    def __post_init__(self):
        self._check_schedule()
        _check_level(self.noise_level)
        if self.noise_level > 0 and self.num_steps < 2:
            raise ValueError(f"num_steps={self.num_steps} leaves CPS no stochastic step (its last step is "
                             f"deterministic); use num_steps >= 2")

    @property
    def stochastic(self) -> bool:
        return self.noise_level > 0

    @property
    def trainable_steps(self) -> int:
        """T - 1: the last step lands on sigma = 0 with s = 0 (deterministic, no log-prob)."""
        return self.num_steps - 1 if self.stochastic else 0

    def step(self, out, x, i, noise=None, prev_sample=None, generator=None) -> SamplerStep:
        self.check_step(i)
        deterministic = self.noise_level == 0 or i == self.num_steps - 1  # sigma_T = 0
        return _step(out, x, self.sigmas[i], self.sigmas[i + 1], self.noise_level, prev_sample, generator, noise,
                     deterministic)
