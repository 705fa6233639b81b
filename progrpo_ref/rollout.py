r"""Rollout: sample P prompts x G trajectories with the SDE sampler, keeping what GRPO trains on.

For each prompt c, G trajectories start from x_0 ~ N(0, I) at sigma_0 = 1 and take T SDE steps
(``sde_step_with_logprob``) down the sigma schedule. All live trajectories share one batched network
call per step. The model is any callable ``model(x [B, C, H, W], sigma [B], prompts [B]) -> v``;
``NFECounter`` wraps it so that the number of network evaluations is measured, not derived.

``preview_steps`` / ``on_preview`` are the hook Expand-and-Prune uses (``pro_grpo.py``): right after
the c-th network call, at state x with noise level sigma and velocity v, the rollout forms the
one-step clean estimate x0_hat = x - sigma * v (no extra network call) for all live trajectories,
``[P, g, C, H, W]``, and hands it to ``on_preview(c, x0_hat, prompts)``. If that returns indices
``[P, k]`` into the live group, only those trajectories take the SDE step with the same v and go on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .sde import sde_step_with_logprob


class NFECounter(torch.nn.Module):
    """Wraps a velocity model and counts network evaluations: one per sample per forward call."""

    def __init__(self, model: Callable):
        super().__init__()
        self.model = model
        self.nfe = 0  # samples evaluated
        self.calls = 0  # batched forward calls

    def forward(self, x, sigma, prompts):
        self.nfe += x.shape[0]
        self.calls += 1
        return self.model(x, sigma, prompts)


@dataclass
class Rollout:
    """The trajectories of one rollout. K = trajectories kept per prompt (G when nothing is pruned)."""

    prompts: torch.Tensor  # [P, K] long
    latents: torch.Tensor  # [P, K, T + 1, C, H, W]: x at sigmas[0] (noise) ... sigmas[T] (final sample)
    log_probs: torch.Tensor | None  # [P, K, T] log pi_old(x_{t+1} | x_t, c); None for the ODE (a = 0)
    sigmas: torch.Tensor  # [T + 1]
    nfe: int  # network evaluations measured for the whole rollout (all prompts)
    previews: list[dict] = field(default_factory=list)  # one per preview step: {"step", "rewards" [P, g], "keep" [P, k]}

    @property
    def images(self) -> torch.Tensor:
        """Final samples ``[P, K, C, H, W]``."""
        return self.latents[:, :, -1]

    def final_rewards(self, reward_fn: Callable) -> torch.Tensor:
        """R ``[P, K]``: ``reward_fn(images [B, C, H, W], prompts [B])`` on the final samples."""
        P, K = self.prompts.shape
        return reward_fn(self.images.flatten(0, 1), self.prompts.flatten()).view(P, K)

    def select(self, keep: torch.Tensor) -> "Rollout":
        """The sub-group ``keep`` ``[P, k]`` (indices into K) of every prompt's trajectories."""

        def take(t):  # t [P, K, ...] -> [P, k, ...]
            if t is None:
                return None
            index = keep.view(*keep.shape, *[1] * (t.dim() - 2)).expand(*keep.shape, *t.shape[2:])
            return torch.gather(t, 1, index)

        return Rollout(take(self.prompts), take(self.latents), take(self.log_probs), self.sigmas, self.nfe, self.previews)


@torch.no_grad()
def rollout(
    model: Callable,
    prompts: torch.Tensor,
    group_size: int,
    sigmas: torch.Tensor,
    noise_level: float = 0.7,
    generator: torch.Generator | None = None,
    preview_steps: tuple[int, ...] = (),
    on_preview: Callable | None = None,
    latent_shape: tuple[int, ...] = (1, 8, 8),
) -> Rollout:
    """Sample ``group_size`` trajectories for each of the P ``prompts`` ``[P]``; see the module doc."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32)
    if sigmas.dim() != 1 or len(sigmas) < 2 or not (sigmas[1:] < sigmas[:-1]).all():
        raise ValueError(f"sigmas={sigmas.tolist()} must be a strictly decreasing 1-D schedule")
    if group_size < 1:
        raise ValueError(f"group_size={group_size} must be >= 1")
    device = prompts.device
    P, g, T = len(prompts), group_size, len(sigmas) - 1
    counter = model if isinstance(model, NFECounter) else NFECounter(model)
    nfe_before = counter.nfe

    x = torch.randn((P * g, *latent_shape), generator=generator,
                    device=generator.device if generator is not None else device).to(device)
    c = prompts.repeat_interleave(g)  # [P * g], prompt-major
    states, log_probs = [x], []
    for i in range(T):
        v = counter(x, sigmas[i].to(device).expand(len(x)), c)
        if (i + 1) in preview_steps and on_preview is not None:
            x0_hat = (x.float() - sigmas[i] * v.float()).view(P, g, *latent_shape)  # one-step clean estimate
            keep = on_preview(i + 1, x0_hat, c.view(P, g))
            if keep is not None:  # prune: survivors keep their history and this step's velocity
                flat = (keep + g * torch.arange(P, device=keep.device)[:, None]).flatten().to(device)
                x, v, c = x[flat], v[flat], c[flat]
                states = [s[flat] for s in states]
                log_probs = [lp[flat] for lp in log_probs]
                g = keep.shape[1]
        step = sde_step_with_logprob(v, x, sigmas[i], sigmas[i + 1], noise_level, generator=generator)
        x = step.prev_sample
        states.append(x)
        if step.log_prob is not None:
            log_probs.append(step.log_prob)

    return Rollout(
        prompts=c.view(P, g),
        latents=torch.stack(states, 1).view(P, g, T + 1, *latent_shape),
        log_probs=torch.stack(log_probs, 1).view(P, g, T) if log_probs else None,
        sigmas=sigmas,
        nfe=counter.nfe - nfe_before,
    )


def sample(model, prompts, sigmas, noise_level=0.0, generator=None) -> torch.Tensor:
    """Final images ``[B, C, H, W]``, one per prompt ``[B]`` (default: the deterministic ODE sampler)."""
    return rollout(model, prompts, 1, sigmas, noise_level, generator).images[:, 0]
