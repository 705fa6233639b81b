r"""GRPO for flow models: group advantages, re-scored log-probs, the clipped loss and the KL.

Over the K trajectories of a prompt's group that are trained on (all G, an OVF subset, or
Pro-GRPO's survivors), with the paper's objective

    J = E_c [ 1/K sum_g 1/T sum_t min(r_t A_g, clip(r_t, 1 - eps, 1 + eps) A_g) ] - beta KL(pi_theta || pi_ref)
    r_t = pi_theta(x_{t+1} | x_t, c) / pi_old(x_{t+1} | x_t, c)
    A_g = (R_g - mean(R)) / (std(R) + eps_adv),     clipped to [-A_max, A_max]

We *minimise* -J, averaged (not summed) over trained steps and trajectories.

KL: both policies are Gaussians with the same std s_t = g sqrt(-dt) at a step, so per element
KL = (mu_theta - mu_ref)^2 / (2 s_t^2), averaged over C, H, W like the log-prob. Flow-GRPO's code
divides by 2 g^2 instead (it leaves dt out of the denominator, as its maintainers recommend); ours is
the exact KL of the step, i.e. Flow-GRPO's value divided by -dt. With 10 steps (-dt = 0.1) our KL is
10x Flow-GRPO's, so our beta plays the role of 10x a Flow-GRPO beta.
"""
from __future__ import annotations

import torch

from .sde import sde_step_with_logprob


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, global_std: bool = False, clip: float = 5.0) -> torch.Tensor:
    """A = (R - mean_group(R)) / (std + eps), clipped to +-clip. rewards ``[P, K]`` -> ``[P, K]``.

    std is the population std of each prompt's group (default) or of the whole batch (``global_std``).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [P, K] with K >= 2, got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards contain {int((~torch.isfinite(rewards)).sum())} non-finite values")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    std = rewards.std(unbiased=False) if global_std else rewards.std(dim=1, unbiased=False, keepdim=True)
    return (centred / (std + eps)).clamp(-clip, clip)


def step_log_prob(model, latents: torch.Tensor, prompts: torch.Tensor, sigmas: torch.Tensor, t: int, noise_level: float):
    """Re-score step t of stored trajectories under ``model``: (log_prob ``[B]``, mean, std).

    latents ``[B, T + 1, C, H, W]``, prompts ``[B]``; uses x_t -> x_{t+1} and v_theta(x_t, sigma_t, c).
    """
    x = latents[:, t]
    v = model(x, sigmas[t].to(x.device).expand(len(x)), prompts)
    step = sde_step_with_logprob(v, x, sigmas[t], sigmas[t + 1], noise_level, prev_sample=latents[:, t + 1])
    return step.log_prob, step.mean, step.std


def clipped_policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float):
    """-min(r A, clip(r, 1 - eps, 1 + eps) A), per trajectory ``[B]``, and whether the clip was active."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), (ratio - 1.0).abs() > clip_range


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, s^2) || N(ref_mean, s^2)) per element, averaged over C, H, W -> ``[B]``."""
    return ((mean - ref_mean) ** 2 / (2 * std**2)).mean(dim=tuple(range(1, mean.dim())))
