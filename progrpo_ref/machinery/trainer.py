"""The training loop: any arm of the study (``config.py``) on any task, in one process or several.

Per update u: P prompts from the task; Expand-and-Prune with the config's sampler (``algorithm.pro_grpo``; plain
GRPO sampling when the schedule has one group size) on this process's share of the groups; the final rewards
R [P, K] of the whole groups; an optional static selection on them (``select_subset``); group advantages over the
trained group; then ``num_minibatches`` optimizer steps of ``grpo_objective``. The task's evaluation (every
``eval_every`` updates) is independent of selection. ``train(config, task)`` runs it all; ``run.py`` holds the
bookkeeping (progress, history, resume, checkpoints, audits), ``parallel.py`` the processes (``torchrun`` /
``accelerate launch``: each samples its share of every group, decisions are taken on the whole groups, gradients
are summed). ``progrpo_ref/minimal.py`` is the same algorithm in one file, without any of this machinery.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..algorithm.grpo import group_advantages, grpo_objective
from ..algorithm.noise import TrajectoryNoise, per_update_generator
from ..algorithm.ovf import select_subset
from ..algorithm.pro_grpo import expand_and_prune
from ..algorithm.rollout import Rollout, in_calls_of
from .config import TrainConfig
from .parallel import Processes
from .run import Run


def collect(model: Callable, task, config: TrainConfig, update: int, generator: torch.Generator,
            processes: Processes | None = None) -> tuple[Rollout, torch.Tensor]:
    """One update's sampling: the prompts (drawn from ``generator``, the update's own), Expand-and-Prune with the
    trajectories' noise ``TrajectoryNoise(config.seed, update)``, the final rewards and the static selection.
    Returns this process's trained trajectories and R ``[P, K]`` of the whole groups. Network and reward calls
    hold at most ``config.device_batch`` trajectories."""
    processes = processes or Processes()  # one, unless torch.distributed is initialised
    prompts = task.sample_prompts(config.prompts_per_update, generator).to(config.device)
    ro = expand_and_prune(model, config.sampler, prompts, config.schedule, task.reward, TrajectoryNoise(config.seed, update),
                          config.prune_strategy, generator, latent_shape=task.latent_shape,
                          max_batch=config.device_batch, processes=processes)
    R = ro.final_rewards(in_calls_of(task.reward, config.device_batch))  # [P, K]
    if config.selection != "all":  # static selection on the final rewards (OVF, random, ...)
        keep = select_subset(R, config.select_k, config.selection, generator)
        ro, R = ro.select(keep), R.gather(1, keep)
    return ro, R


def optimise(model, reference, optimizer, ro: Rollout, advantages: torch.Tensor, config: TrainConfig,
             generator: torch.Generator, processes: Processes | None = None) -> dict:
    """``num_minibatches`` optimizer steps of ``grpo_objective`` over the P x K trained trajectories of all processes.

    One global permutation (the same ``generator`` state on every process) cuts the mini-batches; each process
    computes the objective on its own members of a mini-batch, in passes of at most ``device_batch`` (gradient
    accumulation), normalised by the mini-batch's global count, and the gradients are summed over processes before
    the step: the gradient of a single process holding the whole mini-batch."""
    processes = processes or Processes()
    P, K = advantages.shape
    steps, device = range(config.trained_steps), config.device
    position = ro.position  # [n] where each of this process's trajectories sits among the P x K
    adv = advantages.flatten()[position]  # [n]
    perm = torch.randperm(P * K, generator=generator)
    index_of = torch.full((P * K,), -1, dtype=torch.long)  # position in the batch -> index into this process's
    index_of[position] = torch.arange(len(position))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_dev_first": 0.0}
    for i, minibatch in enumerate(torch.tensor_split(perm, config.num_minibatches)):
        optimizer.zero_grad(set_to_none=True)
        mine = index_of[minibatch]
        mine = mine[mine >= 0]  # this process's members of the mini-batch, in the permutation's order
        count = len(minibatch) * len(steps)  # the global count: the gradient is the whole mini-batch's average
        loss = kl = clipped = max_log_ratio = 0.0
        for part in (mine.split(config.device_batch) if config.device_batch else (mine,)):
            if len(part) == 0:
                continue
            on = part.to(device)
            out = grpo_objective(model, config.sampler, ro.latents[on], ro.prompts[on], ro.log_probs[on],
                                 adv[part].to(device), steps, config.clip_range, config.beta, reference, count=count,
                                 backward=True)
            loss, kl, clipped = loss + out.loss.item(), kl + out.kl, clipped + out.clipped
            max_log_ratio = max(max_log_ratio, out.max_abs_log_ratio)
        processes.sum_gradients(params)
        loss, kl, clipped = processes.sum([loss, kl, clipped])
        (max_log_ratio,) = processes.max([max_log_ratio])
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        stats["loss"] += loss / config.num_minibatches
        stats["kl"] += kl / config.num_minibatches
        stats["clip_frac"] += clipped / count / config.num_minibatches
        if i == 0:
            stats["ratio_dev_first"] = max_log_ratio  # max |log r| of the on-policy first mini-batch: 0 up to batching
    return stats


def train(config: TrainConfig, task, resume: bool = False, model: torch.nn.Module | None = None) -> dict:
    """Run GRPO as configured on ``task`` (see ``algorithm/task.py``); returns
    ``{"config", "task", "updates": [per-update dict], "evals": [...]}``.

    ``model`` defaults to ``task.policy(device)``; it is trained in place. ``resume=True`` continues from
    ``config.checkpoint_path`` up to ``config.num_updates``; the history then equals an uninterrupted run's, timings
    aside (same thread count). A checkpoint whose config or task differs from this one (other than
    ``machinery.config.RESUMABLE_CHANGES``) is refused, naming the fields.
    """
    run = Run(config, task, model, resume)  # policy, reference, optimizer, processes, history; the first evaluation
    for u in run.updates():
        cfg = run.begin(u)  # the config, or the adaptive placement after an audit
        generator = per_update_generator(config.seed, u)  # the update's prompts, random subsets, mini-batch order
        with run.timed("sampling_s"):
            ro, R = collect(run.counter, task, cfg, u, generator, run.processes)  # Expand-and-Prune, R [P, K]
        with run.timed("optimisation_s"):
            A = group_advantages(R, config.adv_eps, config.global_std, config.adv_clip)  # over the trained group
            stats = optimise(run.model, run.reference, run.optimizer, ro, A, cfg, generator, run.processes)
        run.log(u, R, A, stats)
        run.evaluate_and_save(u)
    return run.history
