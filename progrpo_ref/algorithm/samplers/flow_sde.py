r"""Flow-GRPO's SDE sampler for rectified flows: one stochastic step with its exact Gaussian log-prob.

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
The preview (one-step clean estimate) is ``x0_hat = x - sigma v``. Derivation and the guard's effect
on the first step: ``docs/derivations.md``.

The schedule: sigma_i = shift u_i / (1 + (shift - 1) u_i) on the uniform grid u = 1, (T-1)/T, ..., 1/T,
then 0 (what diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=u)`` gives; tested
against it). diffusers' own ``set_timesteps(T)`` grid ends in a near-deterministic step to 0 (0.009 -> 0 with shift 3)
whose SDE log-probs are extreme, which is why the grid is explicit. A real pipeline's own grid can be
used instead: ``FlowSDE.from_scheduler(pipe.scheduler, T)`` copies the sigmas its scheduler would
sample with (SD3.5-Medium's ``set_timesteps(10)`` with shift 3: 1.000, 0.960, 0.913, ..., 0.790 at the
fifth call, 0.602 at the seventh, ..., 0.278, 0.009, then 0; Flow-GRPO samples on this grid and trains on
the first 9 steps, which skips the near-deterministic last one).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property

import torch

from .base import Sampler, SamplerStep, check_pair, gaussian_step, per_sample

SDEStep = SamplerStep  # the name this step's result had before samplers shared one type
MAX_NOISE_LEVEL = math.sqrt(2.0)


def flow_sigmas(num_steps: int = 10, shift: float = 1.0) -> torch.Tensor:
    """Sampling sigmas ``[T + 1]`` from 1 to 0 (see the module docstring), fp32."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift={shift!r} must be a finite number > 0")
    u = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).float()
    shifted = shift * u / (1 + (shift - 1) * u)
    return torch.cat([shifted, torch.zeros(1)])


def sde_step_with_logprob(
    velocity: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    noise_level: float = 0.7,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> SamplerStep:
    """Take (or, when ``prev_sample`` is given, score) one Flow-GRPO SDE step from x at sigma.

    velocity, sample: ``[B, C, H, W]``; sigma in (0, 1], sigma_next in [0, sigma): floats or ``[B]``.
    The step's noise z is ``noise`` if given, else drawn from ``generator``. Checks its inputs;
    ``FlowSDE.step`` skips the sigma checks (its schedule was checked once) to keep the hot path free
    of device syncs.
    """
    _check_level(noise_level)
    check_pair(velocity, sample, "velocity")
    s, s_next = per_sample(sigma, sample, "sigma"), per_sample(sigma_next, sample, "sigma_next")
    bad = ~((s > 0) & (s <= 1))
    if bad.any():
        raise ValueError(f"sigma={_first(s, bad)} must lie in (0, 1]")
    bad = ~((s_next >= 0) & (s_next < s))
    if bad.any():
        raise ValueError(f"sigma_next={_first(s_next, bad)} must lie in [0, sigma) with sigma={_first(s, bad)}")
    return _step(velocity, sample, sigma, sigma_next, noise_level, prev_sample, generator, noise)


def _check_level(noise_level) -> None:
    if isinstance(noise_level, bool) or not (isinstance(noise_level, (int, float)) and 0 <= noise_level < MAX_NOISE_LEVEL):
        raise ValueError(f"noise_level={noise_level!r} must be in [0, sqrt(2)): at a >= sqrt(2) the first step's "
                         f"mean coefficient 1 - a^2 / 2 is not positive (Flow-GRPO uses 0.7)")


def _step(velocity, sample, sigma, sigma_next, noise_level, prev_sample, generator, noise) -> SamplerStep:
    """The step itself, for sigmas already known to be valid (``FlowSDE`` validates its schedule once)."""
    check_pair(velocity, sample, "velocity")
    v, x = velocity.float(), sample.float()
    sigma, sigma_next = per_sample(sigma, x, "sigma"), per_sample(sigma_next, x, "sigma_next")
    for name, t in (("prev_sample", prev_sample), ("noise", noise)):
        if t is not None:
            check_pair(t, x, name)
    dt = sigma_next - sigma

    if noise_level == 0:  # Euler step of the probability-flow ODE
        mean = x + dt * v
        return SamplerStep(mean if prev_sample is None else prev_sample.float(), None, mean, torch.zeros_like(sigma))

    s = torch.where(sigma >= 1.0, sigma_next, sigma)  # Flow-GRPO: avoid 1 / (1 - 1) at pure noise
    g = noise_level * torch.sqrt(sigma / (1.0 - s))
    mean = x + dt * (v + g**2 / (2.0 * sigma) * (x + (1.0 - sigma) * v))
    std = g * torch.sqrt(-dt)
    return gaussian_step(mean, std, prev_sample, generator, noise)


def _first(t: torch.Tensor, bad: torch.Tensor) -> str:
    """The first offending entry, for an error message."""
    return f"{t[bad].flatten()[0].item():.6g}"


class FlowSchedule:
    """What the flow samplers share (``FlowSDE``, ``FlowCPS``): the sigma schedule of ``num_steps`` and
    ``shift`` (or an explicit ``grid``), sigma_i as the model time, and the preview x0_hat = x - sigma_i v.
    A mixin for frozen dataclasses with those fields."""

    num_steps: int
    shift: float
    grid: tuple[float, ...] | None

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """sigma_0 > sigma_1 > ... > sigma_T = 0, ``[T + 1]`` fp32: ``flow_sigmas`` (sigma_0 = 1), or
        ``grid`` followed by 0."""
        if self.grid is not None:
            return torch.cat([torch.tensor(self.grid, dtype=torch.float32), torch.zeros(1)])
        return flow_sigmas(self.num_steps, self.shift)

    def _check_schedule(self) -> None:
        """Validate num_steps and shift, and ``grid`` if given (T values in (0, 1], strictly decreasing)."""
        flow_sigmas(self.num_steps, self.shift)
        if self.grid is None:
            return
        try:
            grid = tuple(float(g) for g in self.grid)
        except (TypeError, ValueError):
            raise ValueError(f"grid={self.grid!r} must be a sequence of floats") from None
        object.__setattr__(self, "grid", grid)  # a list read back from JSON becomes a tuple (hashable)
        if len(grid) != self.num_steps:
            raise ValueError(f"grid has {len(grid)} sigmas but num_steps={self.num_steps}")
        if not all(0 < g <= 1 for g in grid) or any(b >= a for a, b in zip(grid, grid[1:])):
            raise ValueError(f"grid={grid} must be strictly decreasing values in (0, 1] (0 is appended)")

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int = 10, **fields):
        """This sampler on the grid a diffusers flow scheduler (``FlowMatchEulerDiscreteScheduler``)
        samples with in ``set_timesteps(num_steps)``; the pipeline's scheduler is not modified."""
        config = dict(scheduler.config)
        if config.get("use_dynamic_shifting"):
            raise ValueError("this scheduler shifts its sigmas by resolution (use_dynamic_shifting=True, e.g. FLUX); "
                             "compute the sigmas yourself and pass grid=...")
        copy = type(scheduler).from_config(config)
        copy.set_timesteps(num_steps)
        sigmas = copy.sigmas.detach().float().cpu()
        if len(sigmas) != num_steps + 1 or sigmas[-1] != 0:
            raise ValueError(f"the scheduler gave {len(sigmas)} sigmas ending in {sigmas[-1].item():.4g}; "
                             f"expected {num_steps} followed by 0")
        return cls(num_steps=num_steps, shift=float(config.get("shift", 1.0)), grid=tuple(sigmas[:-1].tolist()), **fields)

    def model_time(self, i: int) -> torch.Tensor:
        """sigma_i: the model maps it to its network's timestep (sigma x 1000 for SD3)."""
        self.check_step(i)
        return self.sigmas[i]

    def preview(self, out, x, i) -> torch.Tensor:
        """x0_hat = x - sigma_i v: where the ODE lands from here in one step (fp32)."""
        self.check_step(i)
        check_pair(out, x, "velocity")
        return x.float() - self.sigmas[i] * out.float()

    def deterministic(self):
        """The Euler ODE on the same schedule (noise level 0)."""
        return replace(self, noise_level=0.0)


@dataclass(frozen=True)
class FlowSDE(FlowSchedule, Sampler):
    """Flow-GRPO's SDE sampler on a ``num_steps`` schedule; ``noise_level = 0`` is the Euler ODE."""

    num_steps: int = 10
    """T: sampling steps"""
    noise_level: float = 0.7
    """a: Flow-GRPO's noise level (its default 0.7); 0 gives the deterministic ODE sampler"""
    shift: float = 1.0
    """time shift of the schedule (SD3 uses 3.0); 1 is the uniform grid"""
    grid: tuple[float, ...] | None = None
    """explicit sigma_0 .. sigma_{T-1} (0 is appended), e.g. a pipeline's (``from_scheduler``); replaces the shifted uniform grid"""

    def __post_init__(self):
        self._check_schedule()
        _check_level(self.noise_level)

    @property
    def stochastic(self) -> bool:
        return self.noise_level > 0

    def step(self, out, x, i, noise=None, prev_sample=None, generator=None) -> SamplerStep:
        self.check_step(i)
        return _step(out, x, self.sigmas[i], self.sigmas[i + 1], self.noise_level, prev_sample, generator, noise)
