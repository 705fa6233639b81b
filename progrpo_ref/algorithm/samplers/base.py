r"""The sampler seam: what the rollout, the objective and Expand-and-Prune need from a sampler family.

A sampler owns its schedule of T steps and, for step i (0 <= i < T, noise -> clean):

- ``model_time(i)``: what the model is handed at step i (sigma_i for a flow, an integer timestep for
  DDIM); each model or adapter maps it to its network's input (the tiny flow model and the SD3
  adapter feed sigma x 1000, as ``StableDiffusion3Pipeline`` does);
- ``step(out, x, i, noise=z)``: the Gaussian policy pi(x_{i+1} | x_i, c) = N(mu, s^2) of the step,
  with x_{i+1} = mu + s z, and its exact log-density averaged over the latent's elements;
  ``step(out, x, i, prev_sample=y)`` scores a stored y instead (re-scoring for the objective);
- ``preview(out, x, i)``: the one-step clean estimate x0_hat that Expand-and-Prune scores (no extra
  network call: it reuses the step's model output);
- ``trainable_steps``: how many leading steps have a log-prob (T, or T - 1 for CPS, whose last step
  to sigma = 0 is deterministic); in a stochastic rollout a deterministic step's log-prob is stored as NaN;
- ``deterministic()``: the same schedule without noise (the Euler ODE for flows, DDIM eta = 0 for diffusion), for
  evaluation. Its steps have no log-probability (``log_prob`` is ``None``); it cannot be trained on.

``out`` is the network's output at (x_i, model_time(i)): a velocity for flows, a noise or v
prediction for diffusion. Shapes: x, out, z ``[B, C, H, W]``; log_prob ``[B]``; std ``[B, 1, 1, 1]``.
Adding a sampler means adding one class in this folder (registered in ``FAMILIES``); rollout, grpo and pro_grpo do not change.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch


class SamplerStep(NamedTuple):
    prev_sample: torch.Tensor  # x_{i+1} [B, C, H, W]: the next (less noisy) state
    log_prob: torch.Tensor | None  # [B] log pi(x_{i+1} | x_i, c), averaged over C, H, W; None if deterministic
    mean: torch.Tensor  # mu [B, C, H, W]
    std: torch.Tensor  # s [B, 1, 1, 1], per-element std of the transition (0 if deterministic)


class Sampler:
    """Interface of a sampler family (see the module docstring); subclasses are frozen dataclasses."""

    num_steps: int

    @property
    def stochastic(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def trainable_steps(self) -> int:
        """How many leading steps have a log-probability (all T for a stochastic sampler unless its
        last step is deterministic, as CPS's is); a trainer may train only on steps below this."""
        return self.num_steps if self.stochastic else 0

    def model_time(self, i: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def step(self, out: torch.Tensor, x: torch.Tensor, i: int, noise: torch.Tensor | None = None,
             prev_sample: torch.Tensor | None = None) -> SamplerStep:  # pragma: no cover - interface
        raise NotImplementedError

    def preview(self, out: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def deterministic(self) -> "Sampler":  # pragma: no cover - interface
        raise NotImplementedError

    def check_step(self, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < self.num_steps:
            raise ValueError(f"step i={i!r} must be an integer in [0, {self.num_steps})")


def check_pair(out: torch.Tensor, x: torch.Tensor, name: str = "model output") -> None:
    """Raise ``ValueError`` unless the model output and the state have the same ``[B, ...]`` shape."""
    if not isinstance(out, torch.Tensor) or not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} and sample must be tensors, got {type(out).__name__} and {type(x).__name__}")
    if out.shape != x.shape or x.dim() < 2:
        raise ValueError(f"{name} has shape {tuple(out.shape)} but the sample {tuple(x.shape)}; both must be [B, C, H, W]")


def per_sample(s: torch.Tensor | float, like: torch.Tensor, name: str) -> torch.Tensor:
    """A float or ``[B]`` tensor -> ``[B, 1, ..., 1]`` fp32 on ``like``'s device (broadcast over the latent)."""
    s = torch.as_tensor(s, dtype=torch.float32, device=like.device)
    B, ones = like.shape[0], [1] * (like.dim() - 1)
    if s.dim() > 1 or (s.dim() == 1 and len(s) not in (1, B)):
        raise ValueError(f"{name} has shape {tuple(s.shape)}; expected a float or [B] with B = {B}")
    return s.reshape(-1, *ones).expand(B, *ones)


def gaussian_step(mean: torch.Tensor, std: torch.Tensor, prev_sample: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> SamplerStep:
    """The Gaussian policy step every sampler ends with, in fp32: x' = mu + s z (z = ``noise``, else drawn
    from ``generator``) unless ``prev_sample`` is given, and

        log pi(x' | x) = mean over C, H, W of  -(x' - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)

    mean ``[B, C, H, W]``, std ``[B, 1, 1, 1]`` > 0. The gradient flows through mu (and s), not x'."""
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32,
                                device=generator.device if generator is not None else mean.device)
        prev_sample = mean + std * noise.to(device=mean.device, dtype=torch.float32)
    prev_sample = prev_sample.float()
    log_prob = -((prev_sample.detach() - mean) ** 2) / (2.0 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return SamplerStep(prev_sample, log_prob.mean(dim=tuple(range(1, mean.dim()))), mean, std)

