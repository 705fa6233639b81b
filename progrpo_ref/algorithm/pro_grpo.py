r"""Pro-GRPO: Expand-and-Prune during sampling.

1. Expand: start each prompt with G_0 = group_sizes[0] trajectories.
2. At the j-th prune point t_j = prune_steps[j - 1] (the paper's checkpoint steps, counted in network calls: a
   trajectory pruned at t_j has had exactly t_j evaluations), every live trajectory has just been evaluated at x
   with model output v. Its one-step clean estimate x0_hat (the sampler's ``preview``: x - sigma v for a rectified
   flow, the probability-flow ODE's projection to sigma = 0) is decoded and scored with the *training* reward: the
   proxy reward.
3. Keep the OVF subset of size G_j = group_sizes[j] of the proxy rewards; the others stop at once. Survivors take
   their step with that same v, so the preview costs no network call.
4. Survivors finish; advantages use their true final rewards, normalised over the survivors only.

NFE per prompt = sum_j G_j * (t_{j+1} - t_j), with t_0 = 0 and a last t = T: for Standard
48 * 5 + 24 * 2 + 12 * 3 = 324; Flow-GRPO's single group of 24 costs 24 * 10 = 240.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .noise import TrajectoryNoise
from .ovf import STRATEGIES, select_subset
from .rollout import OneProcess, Rollout, in_calls_of, rollout
from .samplers import Sampler


@dataclass(frozen=True)
class PruneSchedule:
    """The funnel: ``group_sizes`` G_0 > G_1 > ... and the step (network call) of each prune."""

    group_sizes: tuple[int, ...] = (48, 24, 12)
    prune_steps: tuple[int, ...] = (5, 7)
    num_steps: int = 10

    def __post_init__(self):
        try:
            sizes, steps = tuple(self.group_sizes), tuple(self.prune_steps)
        except TypeError:
            raise ValueError(f"group_sizes={self.group_sizes!r} and prune_steps={self.prune_steps!r} must be sequences") from None
        object.__setattr__(self, "group_sizes", sizes)
        object.__setattr__(self, "prune_steps", steps)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (*sizes, *steps, self.num_steps)):
            raise ValueError(f"group_sizes={sizes}, prune_steps={steps} and num_steps={self.num_steps!r} must be integers")
        if not sizes or any(s < 2 for s in sizes):
            raise ValueError(f"group_sizes={sizes} must be non-empty and each >= 2")
        if any(b >= a for a, b in zip(sizes, sizes[1:])):
            raise ValueError(f"group_sizes={sizes} must be strictly decreasing")
        if len(steps) != len(sizes) - 1:
            raise ValueError(f"prune_steps={steps} must give one step per reduction ({len(sizes) - 1} for group_sizes={sizes})")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"prune_steps={steps} must be strictly increasing")
        if self.num_steps < 1:
            raise ValueError(f"num_steps={self.num_steps} must be >= 1")
        if steps and (steps[0] <= 0 or steps[-1] >= self.num_steps):
            raise ValueError(f"prune_steps={steps} must lie inside (0, num_steps={self.num_steps})")

    @property
    def final_size(self) -> int:
        return self.group_sizes[-1]

    def size_after(self, call: int) -> int:
        """G_j: the group size the prune at network call ``call`` = t_j leaves."""
        return self.group_sizes[self.prune_steps.index(call) + 1]

    def nfe(self) -> int:
        """Denoising network evaluations per prompt: sum_j G_j * (t_{j+1} - t_j)."""
        bounds = (0, *self.prune_steps, self.num_steps)
        return sum(g * (b - a) for g, a, b in zip(self.group_sizes, bounds, bounds[1:]))


PRESETS = {
    "flow_grpo": PruneSchedule((24,), (), 10),  # the baseline: one group of 24, nothing pruned
    "standard": PruneSchedule((48, 24, 12), (5, 7), 10),  # Pro-GRPO Standard (SD3.5-M setting)
    "flash": PruneSchedule((24, 16, 12), (5, 7), 10),  # Flash: no expansion; the paper gives no steps, we use (5, 7)
    "dance_grpo": PruneSchedule((16,), (), 20),  # DanceGRPO's group of 16: 320 NFE per prompt
    # the paper's SD-v1.4 setting (T = 50, prunes at 30 and 40) scaled to T = 20: prunes at 12 and 16
    "standard_sd14": PruneSchedule((48, 32, 8), (12, 16), 20),  # 48 * 12 + 32 * 4 + 8 * 4 = 736
}


def expand_and_prune(
    model: Callable,
    sampler: Sampler,
    prompts: torch.Tensor,
    schedule: PruneSchedule,
    reward_fn: Callable,
    noise: TrajectoryNoise | int | None = None,
    strategy: str = "ovf",
    generator: torch.Generator | None = None,
    *,
    latent_shape: tuple[int, ...],
    max_batch: int = 0,
    processes: OneProcess | None = None,
) -> Rollout:
    """Roll out G_0 = ``schedule.group_sizes[0]`` trajectories per prompt ``[P]`` and prune them at each prune point
    by ``strategy`` (OVF) on their preview rewards; returns the survivors (K = final size per prompt) with
    ``previews``: per prune point, its network call, the proxy rewards ``[P, G_{j-1}]`` of all live trajectories and
    the kept indices ``[P, G_j]``.

    ``noise`` as in ``rollout``; ``generator`` draws the subsets of ``strategy="random"``; ``max_batch`` bounds every
    network and reward call (0: no bound). With several ``processes`` (``machinery.parallel.Processes``) each samples
    its share of the groups and every prune is decided on the whole groups, identically everywhere.
    """
    if sampler.num_steps != schedule.num_steps:
        raise ValueError(f"the sampler has {sampler.num_steps} steps but the prune schedule {schedule.num_steps}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    reward = in_calls_of(reward_fn, max_batch)
    previews = []

    def prune(call: int, x0_hat: torch.Tensor, live: Rollout) -> torch.Tensor:
        proxy = live.whole_groups(reward(x0_hat, live.prompts))  # preview rewards [P, G_{j-1}] of the whole groups
        keep = select_subset(proxy, schedule.size_after(call), strategy, generator)  # [P, G_j]
        previews.append({"call": call, "rewards": proxy, "keep": keep})
        return keep

    out = rollout(model, sampler, prompts, schedule.group_sizes[0], noise, schedule.prune_steps, prune,
                  latent_shape=latent_shape, max_batch=max_batch, processes=processes)
    out.previews = previews
    return out
