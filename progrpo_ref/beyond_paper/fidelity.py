r"""Proxy fidelity: how well the previews rank a group's trajectories the way their final rewards do.

Expand-and-Prune keeps trajectories by their preview rewards p (the reward of the one-step clean
estimate x0_hat at a prune point); GRPO then trains on their final rewards R. For one prompt's group
of G trajectories, ``p, R`` ``[G]``:

    rho = Spearman(p, R) = Pearson(rank(p), rank(R)),

with tied values given the average of the ranks they occupy (as ``scipy.stats.spearmanr`` does; a
constant row has no ranking and gives NaN). Over P independent groups ``[P, G]`` the estimate is the
mean of the rows' rho with standard error s / sqrt(P') (s: the rows' sample std, P' the rows that
are not NaN): ``summarize``.

What pruning actually keeps is an OVF subset, so fidelity is also measured where it matters: the
overlap |OVF_k(p) ∩ OVF_k(R)| / k of the subsets OVF picks on the previews and on the final rewards.
A preview unrelated to the final reward overlaps by k / G on average (a random k-subset holds each of
the k final-reward picks with probability k / G): ``overlap_chance``.
"""
from __future__ import annotations

import math

import torch

from ..algorithm.grpo import group_std
from ..algorithm.ovf import ovf_select
from ..algorithm.rollout import NFECounter, Rollout, in_calls_of, rollout


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks within each row of ``x`` ``[P, G]`` (or ``[G]``), ties averaged, float64.

    rank(x_i) = #{j: x_j < x_i} + (#{j: x_j = x_i} + 1) / 2."""
    rows = _rows(x, "x")
    less = (rows[:, None, :] < rows[:, :, None]).sum(-1)
    equal = (rows[:, None, :] == rows[:, :, None]).sum(-1)
    ranks = less.double() + (equal.double() + 1) / 2
    return ranks if x.dim() == 2 else ranks[0]


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman's rho of each row of ``a`` and ``b`` ``[P, G]`` -> ``[P]`` float64 (``[G]`` -> a scalar);
    NaN for a row in which a or b is constant."""
    if a.shape != b.shape:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must have the same shape")
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    denominator = ra.norm(dim=-1) * rb.norm(dim=-1)
    rho = (ra * rb).sum(-1) / denominator
    return torch.where(denominator > 0, rho, torch.full_like(rho, math.nan)).clamp(-1, 1)


def summarize(values: torch.Tensor) -> dict:
    """``{"mean", "se", "n"}`` of per-group values ``[P]`` (NaN rows left out); se is NaN below 2 rows."""
    v = values.double().flatten()
    v = v[~torch.isnan(v)]
    n = len(v)
    mean = v.mean().item() if n else math.nan
    se = (v.std().item() / math.sqrt(n)) if n > 1 else math.nan
    return {"mean": mean, "se": se, "n": n}


def ovf_overlap(preview: torch.Tensor, final: torch.Tensor, k: int) -> torch.Tensor:
    """|OVF_k(preview) ∩ OVF_k(final)| / k per group, ``[P, G]`` -> ``[P]`` float64."""
    if preview.shape != final.shape:
        raise ValueError(f"preview {tuple(preview.shape)} and final {tuple(final.shape)} must have the same shape")
    p, f = _rows(preview, "preview"), _rows(final, "final")
    keep_p, keep_f = ovf_select(p, k), ovf_select(f, k)
    common = (keep_p[:, :, None] == keep_f[:, None, :]).any(-1).sum(-1)
    out = common.double() / k
    return out if preview.dim() == 2 else out[0]


def overlap_chance(k: int, group_size: int) -> float:
    """The expected overlap fraction of a k-subset chosen without regard to the final reward: k / G."""
    if not 0 < k <= group_size:
        raise ValueError(f"k={k} must be in 1..group_size={group_size}")
    return k / group_size


def _rows(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2) or x.shape[-1] < 2:
        raise ValueError(f"{name} must be [G] or [P, G] with G >= 2, got shape {tuple(getattr(x, 'shape', ()))}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains {int((~torch.isfinite(x)).sum())} non-finite values")
    return x if x.dim() == 2 else x[None]


def record_previews(model, sampler, prompts, group_size, reward_fn, steps, noise=None, *, latent_shape,
                    max_batch: int = 0) -> tuple[Rollout, dict]:
    """An unpruned rollout that scores the preview x0_hat of every trajectory at each network call in ``steps``:
    returns (rollout, {call: preview rewards [P, G]}). Nothing is pruned; for measuring proxy fidelity."""
    proxies = {}

    def score(call, x0_hat, live):
        proxies[call] = live.whole_groups(reward_fn(x0_hat, live.prompts))

    out = rollout(model, sampler, prompts, group_size, noise, tuple(steps), score, latent_shape=latent_shape,
                  max_batch=max_batch)
    return out, proxies


@torch.no_grad()
def audit(model, sampler, reward_fn, prompts: torch.Tensor, group_size: int, k: int, noise, *, latent_shape,
          max_batch: int = 0) -> dict:
    """Finish an unpruned group of ``group_size`` for each of ``prompts`` ``[P]``, score the preview at every
    call 1..T-1 and the final samples, and return per call (JSON keys: the call as a string)

        {"fidelity": {c: summarize(rho_c)}, "overlap": {c: summarize(OVF_k overlap)}, "chance": k / G,
         "final_std": summarize(group_std(R)), "nfe": network evaluations, "reward_images": scored}

    Nothing here is trained on; the caller gives it its own noise stream. ``max_batch`` bounds every network and
    reward call (0: no bound). A NaN (a constant group; a standard error of fewer than 2 groups) is logged as None."""
    counter = NFECounter(model)
    steps = tuple(range(1, sampler.num_steps))
    scored = {"n": 0}

    bounded = in_calls_of(reward_fn, max_batch)

    def counted(images, p):
        scored["n"] += len(images)
        return bounded(images, p)

    ro, proxies = record_previews(counter, sampler, prompts, group_size, counted, steps, noise, latent_shape=latent_shape,
                                  max_batch=max_batch)
    final = ro.final_rewards(counted)
    safe = lambda s: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in s.items()}
    return {"fidelity": {str(c): safe(summarize(spearman(p, final))) for c, p in proxies.items()},
            "overlap": {str(c): safe(summarize(ovf_overlap(p, final, k))) for c, p in proxies.items()},
            "chance": overlap_chance(k, group_size), "final_std": safe(summarize(group_std(final))),
            "nfe": counter.nfe, "reward_images": scored["n"]}
