r"""Pro-GRPO in one file: the paper's whole algorithm, top to bottom. Read this first.

GRPO fine-tunes a generative model by reinforcement learning over its sampling chain. Flow-GRPO turns a
rectified flow's deterministic sampler into a stochastic one (an SDE), so that every denoising step is a
Gaussian policy pi_theta(x_{t+1} | x_t, c) with an exact log-probability (1). For each prompt c a group of
trajectories is sampled (3) and scored by a reward model R; the policy is pushed towards the above-average
ones by group-relative advantages (4) in a PPO-style clipped objective (5), a few optimizer steps per
rollout (6). Pro-GRPO ("Expand and Prune", Ge et al., CVPR 2026) starts a larger group (G_0 = 48 instead of
24) and, at a few prune points during sampling, scores each trajectory's one-step clean estimate x0_hat (its
preview: no extra network call, one reward call), keeping the subset of each group with the largest reward
variance by Optimal Variance Filtering (2). It trains on the K = 12 survivors and their true final rewards.

Notation: P prompts c per update; G_0 trajectories started per prompt, G_j after the j-th prune, K trained;
T steps t = 0 .. T - 1 on the grid sigma_0 = 1 > ... > sigma_T = 0, in diffusers' convention
x_sigma = (1 - sigma) x0 + sigma eps, with the network's velocity v ~ eps - x0. Careful: x0 and x0_hat (no
subscript) are the clean sample and its estimate, while x_0 ~ N(0, I) is the first state of a trajectory and
x_T its sample (states are indexed by step, from noise to clean, as in the paper). Shapes: [P, G] = prompts x
group, [B] = a flat batch of trajectories.

The package runs the same algorithm with more samplers, several processes, bounded batches, audits and
checkpoints (``progrpo_ref.algorithm``, ``progrpo_ref.machinery``). ``tests/test_minimal.py`` checks, on the CPU,
that a few updates of ``train`` here leave a model's parameters bit-identical to ``progrpo_ref.train``'s, for
Flow-GRPO, Pro-GRPO Standard and Flash, and static OVF, with and without the KL. Derivations:
``docs/derivations.md``.
"""
from __future__ import annotations

import math

import torch

from .algorithm.noise import TrajectoryNoise, per_update_generator  # each trajectory's own noise, as the package's


# ------------------------------------------------------------------ (1) the policy: one SDE step and its log-prob
def flow_sigmas(T: int, shift: float = 1.0) -> torch.Tensor:
    """sigma_i = shift u / (1 + (shift - 1) u) on u = 1, (T - 1) / T, ..., 1 / T, then 0: ``[T + 1]`` (SD3: shift 3)."""
    u = torch.linspace(1.0, 1.0 / T, T, dtype=torch.float64).float()
    return torch.cat([shift * u / (1 + (shift - 1) * u), torch.zeros(1)])


def sde_step(v, x, sigma, sigma_next, a, z=None, x_next=None):
    r"""Flow-GRPO's SDE step from x at sigma to sigma_next, with noise level a (0.7):

        gamma = a sqrt(sigma / (1 - sigma))      (at sigma = 1, sigma_next in the denominator: no 1 / 0)
        mu    = x + dt [v + gamma^2 / (2 sigma) (x + (1 - sigma) v)],        dt = sigma_next - sigma < 0
        s     = gamma sqrt(-dt),      x_next = mu + s z,      z ~ N(0, I)
        log pi(x_next | x, c) = mean over C, H, W of  -(x_next - mu)^2 / (2 s^2) - log s - log sqrt(2 pi)

    mu is the ODE's drift plus a score correction (x + (1 - sigma) v = eps_hat, and the score is -eps_hat / sigma),
    which keeps the ODE's marginals. The log-prob is averaged, not summed, over the latent's elements: that is why
    PPO clip ranges for it are tiny. v, x, z: [B, C, H, W]; sigma, sigma_next: [B, 1, 1, 1]. Takes the step with
    the noise z, or scores a given x_next. Returns (x_next, log_prob [B], mu, s)."""
    dt = sigma_next - sigma
    gamma = a * torch.sqrt(sigma / (1.0 - torch.where(sigma >= 1.0, sigma_next, sigma)))
    mu = x + dt * (v + gamma**2 / (2.0 * sigma) * (x + (1.0 - sigma) * v))
    s = gamma * torch.sqrt(-dt)
    if x_next is None:
        x_next = mu + s * z
    log_prob = -((x_next.detach() - mu) ** 2) / (2.0 * s**2) - torch.log(s) - math.log(math.sqrt(2 * math.pi))
    return x_next, log_prob.mean(dim=(1, 2, 3)), mu, s


def per_sample(sigma: torch.Tensor, B: int) -> torch.Tensor:
    """One sigma broadcast over a batch: ``[B, 1, 1, 1]``."""
    return sigma.expand(B, 1, 1, 1)


# ------------------------------------------------------------------ (2) Optimal Variance Filtering
def ovf(R: torch.Tensor, k: int) -> torch.Tensor:
    r"""I* = argmax_{|I| = k} var(R_I) in each group: R [P, G] -> indices [P, k], in ascending reward order.

    Some optimal subset is always the j lowest plus the k - j highest rewards, for some j in 0..k (a kept reward
    between two dropped ones can be swapped for one of them without lowering the variance; docs/derivations.md,
    section 5): the k + 1 "two tails" candidates are all there is to try. Discrete rewards can make several of them
    optimal: ties (within 1e-9 x max R^2, far above rounding) go to the smallest j, as in the package."""
    (P, G), R = R.shape, R.cpu().double()  # float64, on the CPU (some devices have none)
    order = R.sort(dim=1, stable=True).indices  # [P, G], ascending; equal rewards by index
    tails = torch.stack([torch.cat([order[:, :j], order[:, G - k + j:]], 1) for j in range(k + 1)], 1)  # [P, k + 1, k]
    var = R[torch.arange(P)[:, None, None], tails].var(dim=2, unbiased=False)  # [P, k + 1]
    best = (var >= var.amax(dim=1, keepdim=True) - 1e-9 * R.pow(2).amax(dim=1, keepdim=True)).double().argmax(dim=1)
    return tails[torch.arange(P), best]  # [P, k]


# ------------------------------------------------------------------ (3) the rollout, expanded and pruned
@torch.no_grad()
def expand_and_prune(model, prompts, sizes, prune_at, sigmas, a, reward, noise, latent_shape):
    r"""Sample G_0 = sizes[0] trajectories for each prompt c of ``prompts`` [P]; the j-th prune point t_j =
    prune_at[j - 1] leaves G_j = sizes[j] of each group (Flow-GRPO's plain group: one size, no prune point).

    Step t is the network call t + 1: every live trajectory is evaluated once, v = v_theta(x_t, sigma_t, c). Right
    after call t_j, the preview x0_hat = x_t - sigma_t v (where the ODE would land in one step) is scored with the
    training reward: the proxy rewards p [P, G_{j-1}]. OVF keeps G_j of each group, and the survivors take their step
    with the same v, so previews cost no network call: NFE = sum_j G_j (t_{j+1} - t_j) per prompt, with t_0 = 0 and
    a last t = T (324 for 48 -> 24 -> 12 at calls 5 and 7 of T = 10; Flow-GRPO's 24 x 10 = 240).
    Returns latents [P, K, T + 1, C, H, W], log-probs [P, K, T], prompts [P, K] and, per prune point, (p, kept)."""
    P, T = len(prompts), len(sigmas) - 1
    z = noise.draws(P, sizes[0], T + 1, latent_shape).to(prompts.device)  # [P, G_0, T + 1, C, H, W]: x_0, each step's z
    c = prompts[:, None].expand(P, sizes[0])  # [P, G_0]
    x = z[:, :, 0]  # x_0 ~ N(0, I)
    states, log_probs, pruned = [x], [], []
    for t in range(T):
        v = model(x.flatten(0, 1), sigmas[t].expand(c.numel()), c.flatten()).view_as(x)  # one call for all live [P, G]
        if t + 1 in prune_at:  # a prune point: right after call t_j = t + 1
            x0_hat = x - sigmas[t] * v  # the preview
            p = reward(x0_hat.flatten(0, 1), c.flatten()).view(P, -1)  # proxy rewards [P, G_{j-1}]
            keep = ovf(p, sizes[prune_at.index(t + 1) + 1])  # [P, G_j]
            pruned.append((p, keep))
            take = lambda y: y[torch.arange(P)[:, None], keep]  # noqa: E731  [P, G_{j-1}, ...] -> [P, G_j, ...]
            x, v, c, z = take(x), take(v), take(c), take(z)
            states, log_probs = [take(y) for y in states], [take(y) for y in log_probs]
        B = c.numel()
        x_next, log_prob, _, _ = sde_step(v.flatten(0, 1), x.flatten(0, 1), per_sample(sigmas[t], B),
                                          per_sample(sigmas[t + 1], B), a, z=z[:, :, t + 1].flatten(0, 1))
        x = x_next.view_as(x)
        states.append(x)
        log_probs.append(log_prob.view(P, -1))
    return torch.stack(states, 2), torch.stack(log_probs, 2), c, pruned


# ------------------------------------------------------------------ (4) group-relative advantages
def advantages(R: torch.Tensor, eps_adv: float = 1e-4, adv_clip: float = 5.0, global_std: bool = False) -> torch.Tensor:
    r"""A_g = (R_g - mean(R)) / (std(R) + eps_adv) over each prompt's trained group [P, K] (one population std over
    the whole batch with ``global_std``), clipped to +-adv_clip. Survivors are normalised among themselves."""
    std = R.std(unbiased=False) if global_std else R.std(dim=1, unbiased=False)[:, None]
    return ((R - R.mean(dim=1, keepdim=True)) / (std + eps_adv)).clamp(-adv_clip, adv_clip)


# ------------------------------------------------------------------ (5) the clipped objective and the exact KL
def loss_at_step(model, reference, latents, prompts, old_log_probs, A, t, sigmas, a, clip_range, beta):
    r"""Step t's part of the loss -J, summed over a batch of B stored trajectories (latents [B, T + 1, C, H, W]):

        J = E_c [ 1/K sum_g 1/|S| sum_{t in S} ( min(r_t A_g, clip(r_t, 1 - eps, 1 + eps) A_g) - beta KL_t ) ]
        r_t = pi_theta(x_{t+1} | x_t, c) / pi_old(x_{t+1} | x_t, c),        eps = clip_range

    over the trained steps S (the first int(f T)). pi_old is the rollout's policy, so in the first mini-batch of an
    update r = 1 up to the rounding of differently batched network calls; the clip acts from the second. Policy and
    reference steps share their std s, so the step's KL is (mu - mu_ref)^2 / (2 s^2) per element, averaged like the
    log-prob (Flow-GRPO's code leaves -dt out of s^2, so our beta is -dt times its beta: its 0.01 is 0.001 here)."""
    x, B = latents[:, t], len(latents)
    sigma, sigma_next = per_sample(sigmas[t], B), per_sample(sigmas[t + 1], B)
    v = model(x, sigmas[t].expand(B), prompts)
    _, log_prob, mu, s = sde_step(v, x, sigma, sigma_next, a, x_next=latents[:, t + 1])
    r = torch.exp(log_prob - old_log_probs[:, t])
    term = torch.maximum(-A * r, -A * r.clamp(1 - clip_range, 1 + clip_range)).sum()
    if beta > 0:
        with torch.no_grad():
            mu_ref = sde_step(reference(x, sigmas[t].expand(B), prompts), x, sigma, sigma_next, a, x_next=latents[:, t + 1])[2]
        term = term + beta * ((mu - mu_ref) ** 2 / (2 * s**2)).mean(dim=(1, 2, 3)).sum()
    return term


# ------------------------------------------------------------------ (6) the update loop
def train(config, task, model) -> list[float]:
    """Train ``model`` in place with GRPO as ``config`` (a ``progrpo_ref.TrainConfig``) says, on ``task`` (its
    ``sample_prompts``, ``reward``, ``reference`` and ``latent_shape``); returns the mean final reward of the trained
    trajectories, per update. What it does not implement (another sampler, audits, the adaptive schedule,
    ``device_batch``, checkpoints, several processes) it refuses, naming the field. Runs on any device; equal to
    the package's bit for bit on the CPU."""
    _refuse_what_is_not_here(config)
    device, T = config.device, config.schedule.num_steps
    sigmas, a = flow_sigmas(T, config.sampler.shift).to(device), config.sampler.noise_level
    sizes, prune_at = config.schedule.group_sizes, config.schedule.prune_steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.lr)
    reference = task.reference(model, device) if config.beta > 0 else None
    steps = range(max(1, int(config.train_steps_fraction * T)))  # the first int(f T) steps (Flow-GRPO: 0.99 T)
    mean_rewards = []
    for u in range(1, config.num_updates + 1):
        generator = per_update_generator(config.seed, u)  # this update's prompts and mini-batch order
        prompts = task.sample_prompts(config.prompts_per_update, generator).to(device)  # c [P]
        latents, log_probs, c, _ = expand_and_prune(model, prompts, sizes, prune_at, sigmas, a, task.reward,
                                                    TrajectoryNoise(config.seed, u), task.latent_shape)
        R = task.reward(latents[:, :, -1].flatten(0, 1), c.flatten()).view(len(prompts), -1)  # true final rewards [P, K]
        if config.selection == "ovf":  # static OVF: select on the final rewards instead of pruning
            keep = ovf(R, config.select_k)
            R, latents, log_probs, c = (y[torch.arange(len(R))[:, None], keep] for y in (R, latents, log_probs, c))
        A = advantages(R, config.adv_eps, config.adv_clip, config.global_std).flatten()  # [P K]
        latents, log_probs, c = latents.flatten(0, 1), log_probs.flatten(0, 1), c.flatten()
        for batch in torch.tensor_split(torch.randperm(len(A), generator=generator), config.num_minibatches):
            optimizer.zero_grad(set_to_none=True)
            for t in steps:  # one step's graph at a time, as Flow-GRPO does; -J averaged over (trajectory, step)
                term = loss_at_step(model, reference, latents[batch], c[batch], log_probs[batch], A[batch], t,
                                    sigmas, a, config.clip_range, config.beta)
                (term / (len(batch) * len(steps))).backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
        mean_rewards.append(R.mean().item())
    return mean_rewards


def _refuse_what_is_not_here(config) -> None:
    not_here = {"sampler": type(config.sampler).__name__ != "FlowSDE" or getattr(config.sampler, "grid", None) is not None,
                "prune_strategy": config.prune_strategy != "ovf", "selection": config.selection not in ("all", "ovf"),
                "device_batch": config.device_batch != 0, "audit_every": config.audit_every != 0,
                "adaptive": config.adaptive, "checkpoint_path": config.checkpoint_path is not None}
    for name, refused in not_here.items():
        if refused:
            raise ValueError(f"{name}={getattr(config, name)!r}: minimal.train does not implement it; use progrpo_ref.train")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise ValueError("several processes (torch.distributed is initialised): minimal.train runs in one; use progrpo_ref.train")
