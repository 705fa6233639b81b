r"""Rollout: sample P prompts x G trajectories with a stochastic sampler, keeping what GRPO trains on.

For each prompt c, G trajectories start from x_0 ~ N(0, I) and take the sampler's T steps
(``sampler.step``). All live trajectories share one batched network call per step. Each
trajectory's x_0 and step noise come from its own stream (``noise.TrajectoryNoise``): a function of
(seed, update, the prompt's position, the trajectory's index), not of the batch or of pruning. The model is any
callable ``model(x [B, C, H, W], t [B], prompts [B]) -> out``, where t is the sampler's
``model_time(i)`` (sigma for a flow) and ``out`` what the sampler expects (a velocity for a flow);
``NFECounter`` wraps it so that the number of network evaluations is measured, not derived.

``preview_steps`` / ``on_preview`` are the hook Expand-and-Prune uses (``pro_grpo.py``): right after
the c-th network call, with the state x and the model output, the rollout forms the sampler's
one-step clean estimate x0_hat (``sampler.preview``, no extra network call) for all live
trajectories, ``[P, g, C, H, W]``, and hands it to ``on_preview(c, x0_hat, prompts)``. If that
returns indices ``[P, k]`` into the live group, only those trajectories take the step with the same
model output and go on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .noise import TrajectoryNoise, as_noise
from .samplers import Sampler


class NFECounter(torch.nn.Module):
    """Wraps a model and counts network evaluations: one per sample per forward call."""

    def __init__(self, model: Callable):
        super().__init__()
        self.model = model
        self.nfe = 0  # samples evaluated
        self.calls = 0  # batched forward calls

    def forward(self, x, t, prompts):
        self.nfe += x.shape[0]
        self.calls += 1
        return self.model(x, t, prompts)


@dataclass
class Rollout:
    """The trajectories of one rollout. K = trajectories kept per prompt (G when nothing is pruned)."""

    prompts: torch.Tensor  # [P, K] long
    latents: torch.Tensor  # [P, K, T + 1, C, H, W]: x_0 (noise) ... x_T (final sample)
    log_probs: torch.Tensor | None  # [P, K, T] log pi_old(x_{t+1} | x_t, c); NaN at a deterministic step; None for a deterministic sampler
    nfe: int  # network evaluations measured for the whole rollout (all prompts)
    previews: list[dict] = field(default_factory=list)  # per prune step: {"step", "rewards" [P, g], "keep" [P, k]}

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

        return Rollout(take(self.prompts), take(self.latents), take(self.log_probs), self.nfe, self.previews)


def _check(sampler, prompts, group_size, preview_steps, latent_shape):
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a Sampler (e.g. FlowSDE()), got {type(sampler).__name__}")
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 1 or prompts.is_floating_point() or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty integer tensor [P], got {prompts!r:.80}")
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an integer >= 1")
    bad = [c for c in preview_steps if not 1 <= c <= sampler.num_steps]
    if bad:
        raise ValueError(f"preview_steps={tuple(preview_steps)} must lie in [1, {sampler.num_steps}] (network calls)")
    if not (isinstance(latent_shape, (tuple, list)) and latent_shape and all(isinstance(d, int) and d > 0 for d in latent_shape)):
        raise ValueError(f"latent_shape={latent_shape!r} must be a tuple of positive ints, the task's [C, H, W]")


@torch.no_grad()
def rollout(
    model: Callable,
    sampler: Sampler,
    prompts: torch.Tensor,
    group_size: int,
    noise: TrajectoryNoise | int | None = None,
    preview_steps: tuple[int, ...] = (),
    on_preview: Callable | None = None,
    *,
    latent_shape: tuple[int, ...],
) -> Rollout:
    """Sample ``group_size`` trajectories for each of the P ``prompts`` ``[P]``; see the module doc.
    ``noise``: the update's ``TrajectoryNoise`` (an int is a seed); ``latent_shape``: the task's [C, H, W]."""
    _check(sampler, prompts, group_size, preview_steps, latent_shape)
    noise = as_noise(noise)
    device = prompts.device
    P, g, T = len(prompts), group_size, sampler.num_steps
    counter = model if isinstance(model, NFECounter) else NFECounter(model)
    nfe_before = counter.nfe

    z = noise.draws(P, g, T + 1, latent_shape).flatten(0, 1)  # [P * g, T + 1, C, H, W] on the CPU
    x = z[:, 0].to(device)
    c = prompts.repeat_interleave(g)  # [P * g], prompt-major
    states, log_probs = [x], []
    for i in range(T):
        out = counter(x, sampler.model_time(i).to(device).expand(len(x)), c)
        if (i + 1) in preview_steps and on_preview is not None:
            keep = on_preview(i + 1, sampler.preview(out, x, i).view(P, g, *latent_shape), c.view(P, g))
            if keep is not None:  # prune: survivors keep their history and this step's model output
                flat = (keep + g * torch.arange(P, device=keep.device)[:, None]).flatten().to(device)
                x, out, c, z = x[flat], out[flat], c[flat], z[flat.cpu()]
                states = [s[flat] for s in states]
                log_probs = [lp[flat] for lp in log_probs]
                g = keep.shape[1]
        step = sampler.step(out, x, i, noise=z[:, i + 1].to(device) if sampler.stochastic else None)
        x = step.prev_sample
        states.append(x)
        if sampler.stochastic:  # a deterministic step of a stochastic sampler (CPS's last) has no log-prob: NaN
            log_probs.append(step.log_prob if step.log_prob is not None else torch.full((len(x),), float("nan"), device=device))

    return Rollout(
        prompts=c.view(P, g),
        latents=torch.stack(states, 1).view(P, g, T + 1, *latent_shape),
        log_probs=torch.stack(log_probs, 1).view(P, g, T) if log_probs else None,
        nfe=counter.nfe - nfe_before,
    )


def sample(model, sampler: Sampler, prompts, noise=None, *, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """Final images ``[B, C, H, W]``, one per prompt ``[B]``, with ``sampler`` (its ``deterministic()``
    mode for evaluation)."""
    return rollout(model, sampler, prompts, 1, noise, latent_shape=latent_shape).images[:, 0]
