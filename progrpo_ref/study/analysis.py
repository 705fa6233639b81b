"""Measurements the notebooks report: clustering, proxy fidelity, selection bias, seed statistics.

Everything here reads rollouts and training histories; nothing here trains.
Shapes: ``[P, G]`` = prompts x group.
"""
from __future__ import annotations

import math

import torch

from ..algorithm.grpo import group_advantages, group_std, step_log_prob
from ..algorithm.pro_grpo import PruneSchedule, expand_and_prune
from ..algorithm.rollout import rollout
from ..beyond_paper.fidelity import record_previews, spearman
from ..digits.data import IMAGE_SHAPE


# ---------------------------------------------------------------- Observation 1: reward clustering
@torch.no_grad()
def group_rewards(model, sampler, reward_fn, prompts, group_size, seed=0) -> torch.Tensor:
    """Final rewards ``[P, G]`` of one fresh, unselected group per prompt ``[P]``."""
    ro = rollout(model, sampler, prompts, group_size, seed, latent_shape=IMAGE_SHAPE)
    return ro.final_rewards(reward_fn)


def clustering_fraction(rewards: torch.Tensor, delta: float) -> float:
    """Fraction of trajectories in the clustering region |A| <= delta (A standardised per group)."""
    return (group_advantages(rewards, clip=math.inf).abs() <= delta).float().mean().item()


def gaussian_clustering_fraction(delta: float) -> float:
    """P(|Z| <= delta) for Z ~ N(0, 1): what a Gaussian group would give (0.197 at 0.25, 0.383 at 0.5)."""
    return math.erf(delta / math.sqrt(2))


def compute_vs_gradient_share(rewards: torch.Tensor, delta: float) -> dict:
    """Clustered trajectories' share of the compute (every trajectory costs the same) against their
    share of the summed |A|, the weight they carry in the gradient sum_g A_g grad log pi."""
    A = group_advantages(rewards, clip=math.inf).abs()
    clustered = A <= delta
    return {"compute_share": clustered.float().mean().item(), "gradient_share": (A[clustered].sum() / A.sum()).item()}


def subset_rewards(rewards: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rewards of a subset ``keep`` ``[P, k]`` of each group ``[P, G]``."""
    return rewards.gather(1, keep)


# ---------------------------------------------------------------- proxy fidelity and selection bias
def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation of each row of a and b ``[P, G]`` -> ``[P]``: ``fidelity.spearman`` (ties
    averaged, as scipy does; without ties it equals the earlier ties-by-order version exactly)."""
    return spearman(a, b)


@torch.no_grad()
def proxy_fidelity(model, sampler, reward_fn, prompts, group_size, steps, seed=0) -> dict:
    """Mean and std over prompts of the within-group rank correlation between the preview reward at
    each step and the final reward: ``{step: (mean, std)}``. One unpruned rollout."""
    ro, proxies = record_previews(model, sampler, prompts, group_size, reward_fn, steps, seed, latent_shape=IMAGE_SHAPE)
    final = ro.final_rewards(reward_fn)
    out = {}
    for c, proxy in sorted(proxies.items()):
        rho = rank_correlation(proxy, final)
        out[c] = (rho.mean().item(), rho.std().item())
    return out


@torch.no_grad()
def selection_bias(model, sampler, reward_fn, prompts, schedule: PruneSchedule, seed=0) -> dict:
    """Final rewards ``[P, K]`` of Expand-and-Prune survivors against an unselected group of the same
    final size K from the same policy (different noise), to see what the selection does to the
    distribution GRPO trains on."""
    ro = expand_and_prune(model, sampler, prompts, schedule, reward_fn, seed, latent_shape=IMAGE_SHAPE)
    survivors = ro.final_rewards(reward_fn)
    plain = group_rewards(model, sampler, reward_fn, prompts, schedule.final_size, seed + 10_000)
    return {"survivors": survivors, "unselected": plain}


# ---------------------------------------------------------------- histories across seeds
def curve(histories: list[dict], key: str, x: str = "update", seconds_per_update: float | None = None):
    """(x ``[E]``, values ``[S, E]``) of an evaluation key across S seeded runs.

    ``x`` is ``"update"``, ``"nfe"`` (cumulative network evaluations per prompt, audits included) or ``"seconds"``
    (cumulative sampling + optimisation + audit seconds, averaged over seeds; with ``seconds_per_update`` the
    cost is that clean, separately measured figure times the update, instead of the runs' own timings,
    which are noisy when runs share the cores)."""
    vals = torch.tensor([[e[key] for e in h["evals"]] for h in histories])
    xs = torch.tensor([_cumulative(h, x, seconds_per_update)[0] for h in histories]).mean(0)
    return xs, vals


def final_value(histories: list[dict], key: str) -> torch.Tensor:
    """The last evaluation's ``key`` of each seed ``[S]``."""
    return torch.tensor([h["evals"][-1][key] for h in histories])


def paired_difference(a: list[dict], b: list[dict], key: str) -> dict:
    """Per-seed difference of final ``key`` between two arms, paired by seed over a's seeds (b must
    have them): mean, std over seeds, and whether |mean| exceeds 2 standard errors (a rough paired test)."""
    by_seed = {h["config"]["seed"]: h["evals"][-1][key] for h in b}
    return _paired_stats(torch.tensor([h["evals"][-1][key] - by_seed[h["config"]["seed"]] for h in a]))


def _paired_stats(d: torch.Tensor) -> dict:
    """Mean, std and standard error of per-seed differences ``[S]``, and whether |mean| > 2 se."""
    se = d.std() / math.sqrt(len(d)) if len(d) > 1 else torch.tensor(float("inf"))
    return {"mean": d.mean().item(), "std": d.std().item() if len(d) > 1 else float("nan"),
            "se": se.item(), "exceeds_2se": bool(d.mean().abs() > 2 * se), "n": len(d)}


def mean_cost(histories: list[dict]) -> dict:
    """Per update, averaged over runs: NFE per prompt, sampling and optimisation seconds, and the NFE per prompt
    and seconds with the audits included (``update_cost``; equal to the first ones for runs without audits)."""
    rows = [r for h in histories for r in h["updates"]]
    out = {k: sum(r[k] for r in rows) / len(rows) for k in ("nfe_per_prompt", "sampling_s", "optimisation_s")}
    for x in ("nfe", "seconds"):
        out[f"{x}_with_audits"] = sum(update_cost(h, r, x) for h in histories for r in h["updates"]) / len(rows)
    return out


def update_cost(h: dict, row: dict, x: str) -> float:
    """One update's cost in run ``h``: ``"nfe"`` per prompt or ``"seconds"`` (sampling + optimisation), each with
    the update's audit (adaptive schedule, fidelity monitor) included: its NFE per prompt of the update, its seconds."""
    if x == "nfe":
        return row["nfe_per_prompt"] + (row["audit"]["nfe"] / h["config"]["prompts_per_update"] if "audit" in row else 0.0)
    if x == "seconds":
        return row["sampling_s"] + row["optimisation_s"] + row.get("audit_s", 0.0)
    raise ValueError(f"x={x!r} must be 'nfe' or 'seconds'")


# ---------------------------------------------------------------- sanity checks readers should know
@torch.no_grad()
def preview_images(model, sampler, prompts, steps, seed=0, latent_shape=IMAGE_SHAPE) -> dict:
    """One trajectory per prompt ``[P]``: its preview x0_hat ``[P, *latent_shape]`` after each network
    call in ``steps``, and (key ``"final"``) the finished sample."""
    previews = {}

    def keep_preview(call, x0_hat, live):
        previews[call] = x0_hat.clone()

    ro = rollout(model, sampler, prompts, 1, seed, preview_steps=tuple(steps), on_preview=keep_preview, latent_shape=latent_shape)
    previews["final"] = ro.images
    return previews


@torch.no_grad()
def on_policy_log_ratio(model, sampler, prompts, group_size, seed=0, splits=3, latent_shape=IMAGE_SHAPE) -> dict:
    """Flow-GRPO's debugging check: re-score a rollout's steps with unchanged parameters.
    Returns the largest |log r| with the rollout's batch composition and with ``splits`` mini-batches."""
    g = torch.Generator().manual_seed(seed)
    ro = rollout(model, sampler, prompts, group_size, seed, latent_shape=latent_shape)
    lat, c, old = ro.latents, ro.prompts, ro.log_probs
    same, split = torch.zeros(()), torch.zeros(())
    for t in range(sampler.trainable_steps):  # CPS's last step has no log-prob
        same = torch.maximum(same, (step_log_prob(model, sampler, lat, c, t).log_prob - old[:, t]).abs().max())
        for mb in torch.randperm(len(c), generator=g).chunk(splits):
            split = torch.maximum(split, (step_log_prob(model, sampler, lat[mb], c[mb], t).log_prob - old[mb, t]).abs().max())
    return {"same_batch": same.item(), "other_splits": split.item()}  # NaN propagates (Python's max would hide it)


@torch.no_grad()
def reward_report(model, sampler, names, prompts, group_size, seed=0) -> list[dict]:
    """For each reward: its mean and mean within-group std over one fresh group per prompt, the
    clustering fractions at delta 0.25 / 0.5, and its value on held-out real digits, a blank image
    (all -1) and Gaussian noise. Also returns the pooled rewards (key ``"rewards"``, ``[P, G]``)."""
    from ..digits.data import load_split
    from ..digits.rewards import get_reward

    ro = rollout(model, sampler, prompts, group_size, seed, latent_shape=IMAGE_SHAPE)
    x, y = load_split("heldout")
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for name in names:
        fn = get_reward(name)
        R = ro.final_rewards(fn)
        rows.append({
            "reward": name, "mean": R.mean().item(), "within_std": group_std(R).mean().item(),
            "cluster_0.25": clustering_fraction(R, 0.25), "cluster_0.5": clustering_fraction(R, 0.5),
            "real": fn(x, y).mean().item(), "blank": fn(-torch.ones_like(x), y).mean().item(),
            "noise": fn(noise, y).mean().item(), "rewards": R,
        })
    return rows


def standardized_moments(rewards: torch.Tensor) -> dict:
    """Skewness and excess kurtosis of the per-group standardised rewards A, pooled (0 and 0 for a Gaussian)."""
    A = group_advantages(rewards, clip=math.inf).flatten().double()
    return {"skew": (A**3).mean().item(), "excess_kurtosis": (A**4).mean().item() - 3.0}


def seed_table(results: dict, names, base: str, keys=("eval_margin", "eval_margin_heldout", "fresh_reward_std", "eval_diversity")) -> str:
    """A text table: final value of each key (mean +- std over seeds) per arm, and the paired
    difference in ``keys[0]`` against ``base`` over the seeds both arms share. results: {arm: [history]}."""
    lines = [f"{'arm':12s} " + " ".join(f"{k:>22s}" for k in keys) + f"   diff in {keys[0]} vs {base} (paired)"]
    for n in names:
        cells = []
        for k in keys:
            v = final_value(results[n], k)
            cells.append(f"{v.mean():10.2f} +- {v.std() if len(v) > 1 else float('nan'):5.2f}    ")
        line = f"{n:12s} " + " ".join(f"{c:>22s}" for c in cells)
        if n != base:
            d = paired_difference(results[n], results[base], keys[0])
            line += f"   {d['mean']:+.2f} +- {d['std']:.2f} (se {d['se']:.2f}) {'> 2 se' if d['exceeds_2se'] else 'within 2 se'}"
        lines.append(line)
    return "\n".join(lines)


def verdict(diff: dict, paper_sign: int = 1) -> str:
    """Compare a paired difference (``paired_difference``) with the sign the paper reports."""
    same = (diff["mean"] > 0) == (paper_sign > 0)
    if diff["exceeds_2se"]:
        return "agrees" if same else "disagrees"
    return "same direction, within noise" if same else "opposite direction, within noise"


def _cumulative(h: dict, x: str, seconds_per_update: float | None = None) -> tuple[list[float], list[dict]]:
    """Cumulative cost at each evaluation of a run, and the evaluations."""
    if x == "update" or (x == "seconds" and seconds_per_update is not None):
        scale = 1.0 if x == "update" else seconds_per_update
        return [scale * e["update"] for e in h["evals"]], h["evals"]
    cum = [0.0]
    for r in h["updates"]:
        cum.append(cum[-1] + update_cost(h, r, x))
    return [cum[e["update"]] for e in h["evals"]], h["evals"]


def _interp(xs: list[float], ys: list[float], at: float) -> float:
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if x0 <= at <= x1:
            return y0 + (y1 - y0) * (at - x0) / (x1 - x0) if x1 > x0 else y1
    raise ValueError(f"budget {at} is outside the evaluated range [{xs[0]}, {xs[-1]}]")


def equal_compute_difference(a: list[dict], b: list[dict], key: str, x: str = "nfe", seconds_per_update=(None, None)) -> dict:
    """Paired difference a - b in ``key`` at equal compute: for each shared seed, both runs' evaluation
    curves are linearly interpolated at the smaller of their two final budgets (cumulative ``x``:
    ``"nfe"`` per prompt or ``"seconds"``, see ``curve``; ``seconds_per_update`` is a pair for a and b).
    Same fields as ``paired_difference``."""
    by_seed = {h["config"]["seed"]: h for h in b}
    diffs = []
    for ha in a:
        hb = by_seed[ha["config"]["seed"]]
        (xa, ea), (xb, eb) = _cumulative(ha, x, seconds_per_update[0]), _cumulative(hb, x, seconds_per_update[1])
        budget = min(xa[-1], xb[-1])
        diffs.append(_interp(xa, [e[key] for e in ea], budget) - _interp(xb, [e[key] for e in eb], budget))
    return _paired_stats(torch.tensor(diffs))
