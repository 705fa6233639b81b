"""The training loop: every arm of the study from one config, so two runs differ in one field.

    arm          sampling                           trained on
    flow_grpo    G = 24                             all 24
    g12          G = 12                             all 12
    ovf          G = 24                             OVF 12 of the final rewards (static OVF)
    random       G = 24                             uniform random 12
    split, top   G = 24                             the 6 lowest + 6 highest / the 12 highest
    standard     48 -> 24 -> 12 pruned at (5, 7)    the 12 survivors (Pro-GRPO Standard)
    flash        24 -> 16 -> 12 pruned at (5, 7)    the 12 survivors (Pro-GRPO Flash)

Per update: P random prompts, a rollout (``rollout`` or ``expand_and_prune``), final rewards, an
optional static selection (``select_subset``), group advantages over the trained group, then
``num_minibatches`` optimizer steps of the clipped loss (+ beta KL), each averaging over all
trained steps and the mini-batch's trajectories. Evaluation every ``eval_every`` updates is
independent of selection: fixed-seed ODE samples on fixed prompts, and a fresh, unselected SDE group.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .grpo import clipped_policy_loss, gaussian_kl, group_advantages, step_log_prob
from .model import load_flow_model, sigma_schedule
from .ovf import STRATEGIES, select_subset
from .pro_grpo import PRESETS, PruneSchedule, expand_and_prune
from .rewards import HEADLINE_REWARD, get_reward
from .rollout import NFECounter, rollout, sample

TIMING_KEYS = ("sampling_s", "optimisation_s", "eval_s")


@dataclass
class TrainConfig:
    """One GRPO run. Defaults: Flow-GRPO (G = 24) on the headline reward, sized for a laptop CPU."""

    arm: str = "flow_grpo"
    """a label for logs and plots"""
    schedule: PruneSchedule = field(default_factory=lambda: PRESETS["flow_grpo"])
    """group sizes and prune steps; a single size means plain GRPO sampling"""
    prune_strategy: str = "ovf"
    """how Expand-and-Prune picks survivors from the preview rewards"""
    selection: str = "all"
    """static selection after the final reward: "all" or one of ovf, random, top, bottom, split"""
    select_k: int = 12
    """how many trajectories per prompt the static selection keeps"""
    num_updates: int = 60
    """rollout + optimisation rounds"""
    prompts_per_update: int = 4
    """P: prompts (digits drawn uniformly) per rollout"""
    noise_level: float = 0.7
    """a: Flow-GRPO's SDE noise level"""
    reward: str = HEADLINE_REWARD
    """the training reward (also scores previews)"""
    lr: float = 1e-4
    """Adam learning rate"""
    clip_range: float = 1e-3
    """PPO clip eps. Our log-probs average over 64 elements, SD3.5's at 512 px over 65,536; the
    per-element log-ratios are noise-driven and of random sign, so their average shrinks like
    1/sqrt(elements), and ours deviates from 0 about sqrt(1024) = 32x more than Flow-GRPO's for the same
    policy change: its 1e-4 corresponds to roughly 3e-3 here. 1e-3 was measured to let the second
    mini-batch learn (1e-4 clipped about 75% of it; 0.2 at a higher lr was unstable)"""
    adv_clip: float = 5.0
    """advantages are clipped to +-adv_clip (Flow-GRPO)"""
    adv_eps: float = 1e-4
    """eps in A = (R - mean) / (std + eps)"""
    global_std: bool = False
    """normalise advantages by one std over the whole batch instead of per group"""
    beta: float = 0.0
    """KL weight to the frozen pretrained policy (exact per-step KL; see grpo.py for the dt convention)"""
    num_minibatches: int = 2
    """optimizer steps per rollout; the first is on-policy (ratio 1), the clip acts from the second"""
    train_steps_fraction: float = 1.0
    """fraction of the T sampling steps trained on: the first int(fraction * T), as Flow-GRPO counts
    (its 0.99 trains 9 of 10, skipping the nearly noise-free last step)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    eval_every: int = 10
    """evaluate before the first update and after every eval_every updates (and at the end)"""
    eval_per_class: int = 4
    """fixed-seed ODE samples per digit in the evaluation"""
    eval_group: int = 24
    """size of the fresh, unselected SDE group per digit in the evaluation"""
    eval_rewards: tuple[str, ...] = ("margin_heldout",)
    """extra (out-of-domain) rewards scored on the evaluation's ODE samples"""
    cluster_delta: float = 0.5
    """delta of the clustering region |A| <= delta"""
    seed: int = 0
    """seed of prompts, noise and mini-batch order (the evaluation has its own fixed seed)"""
    eval_seed: int = 1234
    """seed of the evaluation's noise: the same for every arm and run"""
    device: str = "cpu"
    """torch device"""
    latent_shape: tuple[int, ...] = (1, 8, 8)
    """[C, H, W] of the model's latents (SD3.5-M at 512 px: (16, 64, 64)). ``sample_group`` and
    ``optimise`` honour it; ``train``'s evaluation uses the digit rewards, so ``train`` itself is for
    the digit model (drive another model with ``sample_group`` + ``optimise``, as ``bench.py`` does)"""
    checkpoint_path: str | None = None
    """save model, optimizer, RNG and history here (resume with train(config, resume=True))"""
    checkpoint_every: int = 0
    """also save every this many updates (0: only at the end)"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self):
        if self.selection != "all" and self.selection not in STRATEGIES:
            raise ValueError(f"selection={self.selection!r} must be 'all' or one of {STRATEGIES}")
        if self.selection != "all" and not 2 <= self.select_k <= self.schedule.final_size:
            raise ValueError(f"select_k={self.select_k} must be in [2, {self.schedule.final_size}]")
        if self.num_minibatches < 1:
            raise ValueError(f"num_minibatches={self.num_minibatches} must be >= 1")

    @property
    def trained_steps(self) -> int:
        """How many of the T steps are trained on: int(train_steps_fraction * T), at least 1."""
        return max(1, int(self.train_steps_fraction * self.schedule.num_steps))

    @property
    def trained_group_size(self) -> int:
        return self.schedule.final_size if self.selection == "all" else self.select_k


ARMS = {
    "flow_grpo": dict(schedule=PRESETS["flow_grpo"]),
    "g12": dict(schedule=PruneSchedule((12,), (), 10)),
    "ovf": dict(schedule=PRESETS["flow_grpo"], selection="ovf", select_k=12),
    "random": dict(schedule=PRESETS["flow_grpo"], selection="random", select_k=12),
    "split": dict(schedule=PRESETS["flow_grpo"], selection="split", select_k=12),
    "top": dict(schedule=PRESETS["flow_grpo"], selection="top", select_k=12),
    "standard": dict(schedule=PRESETS["standard"]),
    "flash": dict(schedule=PRESETS["flash"]),
}


def arm_config(name: str, **overrides) -> TrainConfig:
    """The config of a named arm of the study (table in the module docstring), with overrides
    (``arm=`` relabels it)."""
    if name not in ARMS:
        raise ValueError(f"arm={name!r} must be one of {sorted(ARMS)}")
    return TrainConfig(**{"arm": name, **ARMS[name], **overrides})


# ---------------------------------------------------------------- evaluation (independent of selection)
@torch.no_grad()
def evaluate(model, config: TrainConfig, rewards: dict, sigmas: torch.Tensor) -> dict:
    """Fixed-seed ODE samples on fixed prompts + one fresh unselected SDE group per digit."""
    dev = config.device
    g = torch.Generator().manual_seed(config.eval_seed)
    prompts = torch.arange(10, device=dev).repeat_interleave(config.eval_per_class)
    images = sample(model, prompts, sigmas, 0.0, g)
    scores = {name: fn(images, prompts) for name, fn in rewards.items()}
    out = {f"eval_{name}": r.mean().item() for name, r in scores.items()}
    # margin > 0 <=> the reward classifier's top class is the requested digit
    out["eval_accuracy"] = (scores["margin"] > 0).float().mean().item()
    per_prompt = images.view(10, config.eval_per_class, -1)
    out["eval_diversity"] = torch.cdist(per_prompt, per_prompt).sum().item() / (10 * config.eval_per_class * max(config.eval_per_class - 1, 1))
    fresh = rollout(model, torch.arange(10, device=dev), config.eval_group, sigmas, config.noise_level, g)
    R = fresh.final_rewards(rewards[config.reward])
    A = (R - R.mean(1, keepdim=True)) / (R.std(1, unbiased=False, keepdim=True) + config.adv_eps)
    out["fresh_reward_mean"] = R.mean().item()
    out["fresh_reward_std"] = R.std(1, unbiased=False).mean().item()
    out["fresh_cluster_frac"] = (A.abs() <= config.cluster_delta).float().mean().item()
    return out


# ---------------------------------------------------------------- one GRPO optimisation round
def optimise(model, ref_model, optimizer, ro, advantages, config: TrainConfig, generator) -> dict:
    """``num_minibatches`` optimizer steps over the trained trajectories; returns loss statistics."""
    P, K, T = ro.log_probs.shape
    latents, prompts = ro.latents.flatten(0, 1), ro.prompts.flatten()  # [N, T + 1, C, H, W], [N]
    old_lp, adv = ro.log_probs.flatten(0, 1), advantages.flatten()  # [N, T], [N]
    steps = range(config.trained_steps)
    perm = torch.randperm(P * K, generator=generator).to(latents.device)
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_dev_first": 0.0}
    for i, mb in enumerate(perm.chunk(config.num_minibatches)):
        optimizer.zero_grad(set_to_none=True)
        for t in steps:
            lp, mean, std = step_log_prob(model, latents[mb], prompts[mb], ro.sigmas, t, config.noise_level)
            pg, clipped = clipped_policy_loss(lp, old_lp[mb, t], adv[mb], config.clip_range)
            loss = pg.mean()
            if config.beta > 0:
                with torch.no_grad():
                    _, ref_mean, _ = step_log_prob(ref_model, latents[mb], prompts[mb], ro.sigmas, t, config.noise_level)
                kl = gaussian_kl(mean, ref_mean, std).mean()
                loss = loss + config.beta * kl
                stats["kl"] += kl.item() / (len(steps) * config.num_minibatches)
            (loss / len(steps)).backward()
            stats["loss"] += loss.item() / (len(steps) * config.num_minibatches)
            stats["clip_frac"] += clipped.float().mean().item() / (len(steps) * config.num_minibatches)
            if i == 0:
                dev = (lp.detach() - old_lp[mb, t]).abs().max().item()
                stats["ratio_dev_first"] = max(stats["ratio_dev_first"], dev)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
    return stats


def sample_group(model, config: TrainConfig, reward_fn, sigmas, generator):
    """One update's rollout, final rewards and static selection: (trained rollout, R ``[P, K]``)."""
    prompts = torch.randint(10, (config.prompts_per_update,), generator=generator).to(config.device)
    if len(config.schedule.group_sizes) > 1:
        ro = expand_and_prune(model, prompts, config.schedule, reward_fn, sigmas, config.noise_level, generator,
                              config.prune_strategy, config.latent_shape)
    else:
        ro = rollout(model, prompts, config.schedule.group_sizes[0], sigmas, config.noise_level, generator,
                     latent_shape=config.latent_shape)
    R = ro.final_rewards(reward_fn)
    if config.selection != "all":
        keep = select_subset(R, config.select_k, config.selection, generator)
        ro, R = ro.select(keep), R.gather(1, keep)
    return ro, R


# ---------------------------------------------------------------- the loop
def train(config: TrainConfig, resume: bool = False, model=None) -> dict:
    """Run GRPO as configured; returns ``{"config", "updates": [per-update dict], "evals": [...]}``.

    ``resume=True`` continues from ``config.checkpoint_path`` up to ``config.num_updates``; the
    history then equals an uninterrupted run's, timings aside (same thread count).
    """
    dev = config.device
    model = model if model is not None else load_flow_model(device=dev)
    model.requires_grad_(True)
    ref_model = load_flow_model(device=dev).requires_grad_(False) if config.beta > 0 else None
    names = dict.fromkeys([config.reward, "margin", *config.eval_rewards])  # margin gives the accuracy
    rewards = {n: get_reward(n, dev) for n in names}
    reward_fn = rewards[config.reward]
    sigmas = sigma_schedule(config.schedule.num_steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    counter = NFECounter(model)
    history = {"config": _config_dict(config), "updates": [], "evals": []}
    start = 0

    if resume:
        state = torch.load(config.checkpoint_path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        history["updates"], history["evals"] = state["updates"], state["evals"]
        start = len(history["updates"])
        if history["evals"] and history["evals"][-1]["update"] % config.eval_every:
            history["evals"].pop()  # an end-of-run evaluation off the eval_every grid

    def run_eval(u):
        t = time.perf_counter()
        history["evals"].append({"update": u, **evaluate(model, config, rewards, sigmas), "eval_s": time.perf_counter() - t})

    if start == 0:
        run_eval(0)
    bar = tqdm(range(start, config.num_updates), desc=config.arm, disable=not config.progress, initial=start, total=config.num_updates)
    for u in bar:
        t0 = time.perf_counter()
        counter.nfe = 0
        ro, R = sample_group(counter, config, reward_fn, sigmas, generator)
        t1 = time.perf_counter()
        A = group_advantages(R, config.adv_eps, config.global_std, config.adv_clip)
        stats = optimise(model, ref_model, optimizer, ro, A, config, generator)
        t2 = time.perf_counter()
        within_std = R.std(1, unbiased=False)
        history["updates"].append({
            "update": u + 1,
            "reward_mean": R.mean().item(),
            "reward_std": within_std.mean().item(),
            "cluster_frac": (A.abs() <= config.cluster_delta).float().mean().item(),
            "zero_std_ratio": (within_std == 0).float().mean().item(),
            "nfe_per_prompt": counter.nfe / config.prompts_per_update,
            "trained_per_prompt": R.shape[1],
            "sampling_s": t1 - t0,
            "optimisation_s": t2 - t1,
            **stats,
        })
        if (u + 1) % config.eval_every == 0 or u + 1 == config.num_updates:
            run_eval(u + 1)
        bar.set_postfix(reward=f"{history['updates'][-1]['reward_mean']:.2f}", eval=f"{history['evals'][-1]['eval_' + config.reward]:.2f}")
        if config.checkpoint_path and ((config.checkpoint_every and (u + 1) % config.checkpoint_every == 0) or u + 1 == config.num_updates):
            save_checkpoint(config.checkpoint_path, model, optimizer, generator, history)
    return history


def save_checkpoint(path, model, optimizer, generator, history) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "updates": history["updates"], "evals": history["evals"]}, path)


def _config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["schedule"] = asdict(config.schedule)
    return d


def strip_timings(history: dict) -> dict:
    """The history without wall-clock fields (for comparing runs)."""
    drop = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    return {"updates": drop(history["updates"]), "evals": drop(history["evals"])}
