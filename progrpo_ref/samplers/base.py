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
- ``deterministic()``: the same schedule without noise (the ODE here; DDIM eta = 0 later), for
  evaluation. Its steps have no log-probability (``log_prob`` is ``None``); it cannot be trained on.

``out`` is the network's output at (x_i, model_time(i)): a velocity for flows, a noise or v
prediction for diffusion. Shapes: x, out, z ``[B, C, H, W]``; log_prob ``[B]``; std ``[B, 1, 1, 1]``.
Adding a sampler means adding one class here; rollout, grpo and pro_grpo do not change.
"""
from __future__ import annotations

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
