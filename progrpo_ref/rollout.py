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
    """Wraps a model and counts network evaluations: one per sample per forward call, times the
    model's ``passes_per_sample`` if it has one (2 for a classifier-free-guided model, whose
    conditional and unconditional rows are both network passes, run as one batched call)."""

    def __init__(self, model: Callable):
        super().__init__()
        self.model = model
        self.nfe = 0  # samples evaluated
        self.calls = 0  # batched forward calls

    def forward(self, x, t, prompts):
        self.nfe += x.shape[0] * getattr(self.model, "passes_per_sample", 1)
        self.calls += 1
        return self.model(x, t, prompts)


def in_calls_of(reward_fn: Callable, max_batch: int) -> Callable:
    """``reward_fn(images [B, ...], prompts [B]) -> [B]`` called on at most ``max_batch`` images at a time
    (0: all at once), the results concatenated: a reward call bounded like the network's."""
    def bounded(images, prompts):
        if len(images) == 0:
            return images.new_zeros(0)
        n = max_batch or len(images)
        return torch.cat([reward_fn(images[i:i + n], prompts[i:i + n]) for i in range(0, len(images), n)])

    return bounded


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


@dataclass
class FlatRollout:
    """Trajectories as a flat list (any subset of any groups: one process's share), with who each one is."""

    prompts: torch.Tensor  # [n] prompt ids
    keys: torch.Tensor  # [n, 2] long: (prompt position p, trajectory index g) in the update's groups
    latents: torch.Tensor  # [n, T + 1, C, H, W]
    log_probs: torch.Tensor | None  # [n, T]; NaN at a deterministic step; None for a deterministic sampler
    nfe: int  # network evaluations measured in this process


@torch.no_grad()
def rollout_flat(
    model: Callable,
    sampler: Sampler,
    prompts: torch.Tensor,
    keys: torch.Tensor,
    noise: TrajectoryNoise | int | None = None,
    preview_steps: tuple[int, ...] = (),
    on_preview: Callable | None = None,
    *,
    latent_shape: tuple[int, ...],
    max_batch: int = 0,
) -> FlatRollout:
    """Sample the trajectories ``keys`` ``[n, 2]`` (prompt position, index) with prompt ids ``prompts`` ``[n]``,
    in one batch per step, or in network calls of at most ``max_batch`` (0: no limit; NFE is the same). ``on_preview(c, x0_hat [n_live, C, H, W], prompts [n_live], keys [n_live, 2])`` may
    return the indices of the live trajectories to keep (in that order). A process with no live trajectory
    still calls ``on_preview`` (a distributed prune is a collective call) but not the network."""
    noise = as_noise(noise)
    device = prompts.device
    T = sampler.num_steps
    counter = model if isinstance(model, NFECounter) else NFECounter(model)
    nfe_before = counter.nfe

    keys = keys.cpu()
    z = noise.draws_for(keys.tolist(), T + 1, latent_shape) if len(keys) else torch.zeros(0, T + 1, *latent_shape)
    x, c = z[:, 0].to(device), prompts
    states, log_probs = [x], []
    for i in range(T):
        if len(x):
            t = sampler.model_time(i).to(device)
            out = torch.cat([counter(xs, t.expand(len(xs)), cs)
                             for xs, cs in zip(x.split(max_batch or len(x)), c.split(max_batch or len(x)))])
        else:
            out = torch.zeros_like(x)
        if (i + 1) in preview_steps and on_preview is not None:
            keep = on_preview(i + 1, sampler.preview(out, x, i), c, keys)
            if keep is not None:  # prune: survivors keep their history and this step's model output
                flat = keep.to(device)
                x, out, c, z, keys = x[flat], out[flat], c[flat], z[flat.cpu()], keys[flat.cpu()]
                states = [s[flat] for s in states]
                log_probs = [lp[flat] for lp in log_probs]
        step = sampler.step(out, x, i, noise=z[:, i + 1].to(device) if sampler.stochastic else None)
        x = step.prev_sample
        states.append(x)
        if sampler.stochastic:  # a deterministic step of a stochastic sampler (CPS's last) has no log-prob: NaN
            log_probs.append(step.log_prob if step.log_prob is not None else torch.full((len(x),), float("nan"), device=device))

    return FlatRollout(c, keys, torch.stack(states, 1), torch.stack(log_probs, 1) if log_probs else None,
                       counter.nfe - nfe_before)


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
    max_batch: int = 0,
) -> Rollout:
    """Sample ``group_size`` trajectories for each of the P ``prompts`` ``[P]``; see the module doc.
    ``noise``: the update's ``TrajectoryNoise`` (an int is a seed); ``latent_shape``: the task's [C, H, W];
    ``max_batch``: at most this many trajectories per network call (0: all at once; NFE is the same)."""
    _check(sampler, prompts, group_size, preview_steps, latent_shape)
    P, T = len(prompts), sampler.num_steps
    g = group_size
    keys = torch.stack(torch.meshgrid(torch.arange(P), torch.arange(g), indexing="ij"), -1).view(-1, 2)  # prompt-major

    def prune(c, x0_hat, flat_prompts, flat_keys):  # the [P, g] view of the flat hook
        nonlocal g
        keep = on_preview(c, x0_hat.view(P, g, *latent_shape), flat_prompts.view(P, g))
        if keep is None:
            return None
        flat = (keep + g * torch.arange(P, device=keep.device)[:, None]).flatten()
        g = keep.shape[1]
        return flat

    flat = rollout_flat(model, sampler, prompts.repeat_interleave(g), keys, noise, preview_steps,
                        prune if on_preview is not None else None, latent_shape=latent_shape, max_batch=max_batch)
    return Rollout(
        prompts=flat.prompts.view(P, g),
        latents=flat.latents.view(P, g, T + 1, *latent_shape),
        log_probs=flat.log_probs.view(P, g, T) if flat.log_probs is not None else None,
        nfe=flat.nfe,
    )


def sample(model, sampler: Sampler, prompts, noise=None, *, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """Final images ``[B, C, H, W]``, one per prompt ``[B]``, with ``sampler`` (its ``deterministic()``
    mode for evaluation)."""
    return rollout(model, sampler, prompts, 1, noise, latent_shape=latent_shape).images[:, 0]
