r"""GRPO: group advantages, re-scored step log-probs, and the objective J in one function.

Over the K trajectories of a prompt's group that are trained on (all G, an OVF subset, or
Pro-GRPO's survivors), the paper's objective is

    J = E_c [ 1/K sum_g 1/T sum_t min(r_t A_g, clip(r_t, 1 - eps, 1 + eps) A_g) ] - beta KL(pi_theta || pi_ref)
    r_t = pi_theta(x_{t+1} | x_t, c) / pi_old(x_{t+1} | x_t, c)
    A_g = (R_g - mean(R)) / (std(R) + eps_adv),     clipped to [-A_max, A_max]

``grpo_objective`` returns the loss -J for a batch of trajectories: the clipped term summed over
trajectories and trained steps, plus beta times the per-step KL summed the same way, divided by one
count (default: trajectories x trained steps, i.e. the average).

KL: a step of the policy and of the reference are Gaussians with the same std s_t (the sampler's),
so per element KL = (mu_theta - mu_ref)^2 / (2 s_t^2), averaged over C, H, W like the log-prob.
For the flow SDE s_t = g sqrt(-dt): Flow-GRPO's code divides by 2 g^2 instead (it leaves dt out of
the denominator, as its maintainers recommend); ours is the exact KL of the step, i.e. Flow-GRPO's
value divided by -dt. With 10 uniform steps (-dt = 0.1) our KL is 10x Flow-GRPO's: a beta here acts
like a Flow-GRPO beta 10 times as large (Flow-GRPO's 0.01 is 0.001 here). Derivation: docs/derivations.md.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from .samplers import Sampler, SamplerStep


def group_std(rewards: torch.Tensor) -> torch.Tensor:
    """std(R) of each prompt's group ``[P, K]`` -> ``[P]``: the population std (divisor K), the one the advantage
    divides by (as Flow-GRPO's ``np.std``). Every "group reward std" the package logs or analyses is this one."""
    return rewards.std(dim=1, unbiased=False)


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, global_std: bool = False, clip: float = 5.0) -> torch.Tensor:
    """A = (R - mean_group(R)) / (std + eps), clipped to +-clip. rewards ``[P, K]`` -> ``[P, K]``.

    std is ``group_std`` of each prompt's group (default) or the population std of the whole batch
    (``global_std``); ``clip=math.inf`` gives the unclipped standardised rewards that the clustering analyses use.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, K] with K >= 2, got shape {tuple(getattr(rewards, 'shape', ()))}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards contain {int((~torch.isfinite(rewards)).sum())} non-finite values")
    if not eps > 0 or not clip > 0:
        raise ValueError(f"eps={eps} and clip={clip} must be > 0 (eps = 0 divides a zero-std group by 0)")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(unbiased=False) if global_std else group_std(rewards)[:, None]
    return (centred / (std + eps)).clamp(-clip, clip)


def step_log_prob(model: Callable, sampler: Sampler, latents: torch.Tensor, prompts: torch.Tensor, t: int) -> SamplerStep:
    """Re-score step t of stored trajectories under ``model``: the sampler's step with ``prev_sample``.

    latents ``[B, T + 1, C, H, W]``, prompts ``[B]``; uses x_t -> x_{t+1} and the model's output at
    (x_t, model_time(t), c). Returns the ``SamplerStep`` (log_prob ``[B]``, mean, std).
    """
    x = latents[:, t]
    out = model(x, sampler.model_time(t).to(x.device).expand(len(x)), prompts)
    return sampler.step(out, x, t, prev_sample=latents[:, t + 1])


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """-min(r A, clip(r, 1 - eps, 1 + eps) A), per trajectory ``[B]``, and whether the clip was active."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (ratio - 1.0).abs() > clip_range


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, s^2) || N(ref_mean, s^2)) per element, averaged over C, H, W -> ``[B]``."""
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.dim())))


class Objective(NamedTuple):
    loss: torch.Tensor  # -J (differentiable unless backward=True, then detached)
    policy_loss: float  # the clipped term's part of the loss, -(1/count) sum min(r A, clip(r) A)
    kl: float  # (1/count) sum KL, before beta
    clipped: int  # how many (trajectory, step) terms had a ratio outside [1 - eps, 1 + eps]
    max_abs_log_ratio: float  # max |log r| over the batch (0 when on-policy)


def grpo_objective(
    policy: Callable,
    sampler: Sampler,
    latents: torch.Tensor,
    prompts: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    steps: Sequence[int],
    clip_range: float,
    beta: float = 0.0,
    reference: Callable | None = None,
    count: int | None = None,
    backward: bool = False,
) -> Objective:
    r"""The loss -J of the module docstring for B trajectories over the trained ``steps``:

        loss = ( sum_{b, t} -min(r_bt A_b, clip(r_bt, 1 - eps, 1 + eps) A_b) + beta sum_{b, t} KL_bt ) / count

    latents ``[B, T + 1, C, H, W]``, prompts ``[B]``, old_log_probs ``[B, T]`` (log pi_old of the
    rollout), advantages ``[B]``. ``count`` defaults to B x len(steps) (the average); a trainer that
    splits a batch over mini-batches or processes may pass the global count instead. ``reference``
    is any callable with the policy's signature (a frozen copy; a policy with its adapter disabled);
    it is required when beta > 0. ``backward=True`` back-propagates each step's share as soon as it
    is computed (memory of one step's graph, the same gradient) and returns the loss detached.
    """
    B = latents.shape[0]
    if not (old_log_probs.dim() == 2 and old_log_probs.shape[0] == B and advantages.shape == (B,) and len(prompts) == B):
        raise ValueError(f"shapes disagree: latents {tuple(latents.shape)}, prompts {tuple(prompts.shape)}, "
                         f"old_log_probs {tuple(old_log_probs.shape)} (expected [B, T]), advantages {tuple(advantages.shape)}")
    steps = list(steps)
    if not steps or any(not 0 <= t < old_log_probs.shape[1] for t in steps):
        raise ValueError(f"steps={steps} must be a non-empty subset of 0..{old_log_probs.shape[1] - 1}")
    if max(steps) >= sampler.trainable_steps:
        raise ValueError(f"steps={steps} include a step of {sampler!r} that is deterministic and has no log-prob; "
                         f"train only on steps < sampler.trainable_steps = {sampler.trainable_steps}")
    if beta > 0 and reference is None:
        raise ValueError(f"beta={beta} > 0 needs a reference policy")
    count = count if count is not None else B * len(steps)
    if count < 1:
        raise ValueError(f"count={count} must be >= 1")

    zero = latents.new_zeros((), dtype=torch.float32)
    total, policy_sum, kl_sum, clipped_sum, max_log_ratio = zero, zero, zero, zero, zero  # summed on the device
    for t in steps:
        step = step_log_prob(policy, sampler, latents, prompts, t)
        pg, clipped = clipped_policy_loss(step.log_prob, old_log_probs[:, t], advantages, clip_range)
        term = pg.sum()
        policy_sum = policy_sum + term.detach()
        if beta > 0:
            with torch.no_grad():
                ref_mean = step_log_prob(reference, sampler, latents, prompts, t).mean
            kl = gaussian_kl(step.mean, ref_mean, step.std).sum()
            kl_sum = kl_sum + kl.detach()
            term = term + beta * kl
        if backward:
            (term / count).backward()
            term = term.detach()
        total = total + term
        clipped_sum = clipped_sum + clipped.sum()
        max_log_ratio = torch.maximum(max_log_ratio, (step.log_prob.detach() - old_log_probs[:, t]).abs().max())
    finite = torch.isfinite(old_log_probs[:, steps]).all().float()
    policy, kl, clipped, max_log_ratio, all_finite = torch.stack(
        [policy_sum / count, kl_sum / count, clipped_sum, max_log_ratio, finite]).tolist()  # one sync
    if all_finite != 1.0:  # raised before the caller's optimizer step can use the (NaN) gradient
        raise ValueError(f"old_log_probs are not finite at the trained steps {steps} (a deterministic step's NaN?)")
    return Objective(total / count, policy, kl, int(clipped), max_log_ratio)

