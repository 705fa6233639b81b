r"""Data parallelism: one update's groups spread over W processes, every decision taken on the whole group.

Layout. The P x G_0 trajectories of an update, listed prompt-major ((p, g) for p, then g), are cut into W
contiguous slices, one per process (``Shards.share``): balanced to one trajectory, and a group may span
processes. A trajectory's noise depends only on (seed, update, p, g) (``noise.py``), so it is the same
trajectory whichever process samples it.

Decisions. Preview rewards and final rewards are scalars: every process gathers all of them
(``Shards.gather``), so the OVF decision at each checkpoint, the static selection and the advantages are
computed on the whole group, identically everywhere. Every process tracks the same *canonical order* of
each group's live trajectories ``[P, g]`` (the order a single process would hold them in), and keeps its
own survivors where they are: no latent moves between processes. After pruning the processes may hold
unequal numbers of survivors; we do not rebalance them, because moving a survivor means moving its whole
history (T + 1 latents) for a gain of at most the imbalance of one update's optimisation, and the initial
split, which decides the larger sampling cost, is already balanced.

Optimisation. One global mini-batch permutation of the P x K trained trajectories (the same generator on
every process); each process computes the objective on its own members of a mini-batch, in passes of at
most ``device_batch`` trajectories (gradient accumulation; the sampling's network and reward calls are
split the same way), normalised by the *global* count of the
mini-batch, and the gradients are summed over processes (``all_reduce``) before the optimizer step. So the
gradient equals a single process's on the whole mini-batch, and every process takes the same step.

With one process (``torch.distributed`` not initialised) every collective is the identity, and the same
code is the single-process trainer. Only ``torch.distributed`` is used (gloo on CPU, nccl on GPU); start
processes with ``torchrun`` or ``accelerate launch`` (README).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import os

import torch
import torch.distributed as dist

from .grpo import grpo_objective
from .ovf import select_subset
from .rollout import FlatRollout, in_calls_of, rollout_flat


class Shards:
    """The processes of a run: world size W, this process's rank, and the collectives the method needs."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized()
        if not self.active and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group() (and torch.cuda.set_device) before train(), "
                               "as python -m progrpo_ref train does; otherwise every process would train alone")
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0

    def share(self, prompts: int, group_size: int) -> torch.Tensor:
        """The (p, g) keys ``[n, 2]`` this process samples: its slice of the prompt-major list of all P x G_0."""
        keys = torch.stack(torch.meshgrid(torch.arange(prompts), torch.arange(group_size), indexing="ij"), -1).view(-1, 2)
        n = len(keys)
        return keys[n * self.rank // self.world: n * (self.rank + 1) // self.world]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def same_start(self, model: torch.nn.Module) -> None:
        """Give every process rank 0's parameters and buffers (a policy built from an unseeded init would
        otherwise differ between processes)."""
        if self.world > 1:
            with torch.no_grad():
                for t in [*model.parameters(), *model.buffers()]:
                    dist.broadcast(t.data, src=0)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every process's ``t`` ``[n_r, ...]`` (n_r may differ, also be 0) in rank order."""
        if self.world == 1:
            return t
        n = torch.tensor([len(t)], device=t.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: len(t)] = t
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)])

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (a picklable object, e.g. an evaluation's dict)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def _table(keys: torch.Tensor, values: torch.Tensor, P: int, G: int) -> torch.Tensor:
    """values indexed by (p, g): ``[P, G]``, NaN where no trajectory has that key."""
    out = torch.full((P, G), float("nan"), dtype=torch.float64)
    out[keys[:, 0], keys[:, 1]] = values.double().cpu()
    return out


def _local_in_order(keys: torch.Tensor, order: torch.Tensor, G: int) -> torch.Tensor:
    """Indices of the local trajectories ``keys`` that appear in the canonical ``order`` ``[P, g]``, sorted by
    their canonical position (prompt-major, then order within the group)."""
    P, g = order.shape
    where = torch.full((P, G), -1, dtype=torch.long)
    where[torch.arange(P)[:, None].expand(P, g), order] = torch.arange(P * g).view(P, g)
    pos = where[keys[:, 0], keys[:, 1]]
    local = torch.nonzero(pos >= 0).flatten()
    return local[pos[local].argsort()]


@dataclass
class Shard:
    """This process's share of one update: its trained trajectories and where they sit in the global batch."""

    rollout: FlatRollout  # the local trained trajectories, in canonical order
    position: torch.Tensor  # [n] their index in the global flat batch of P x K trained trajectories
    rewards: torch.Tensor  # R [P, K], the whole groups' final rewards (the same on every process)
    nfe: int  # network evaluations of this process
    previews: list[dict]  # per prune step: {"step", "rewards" [P, G_i], "keep" [P, k]} (whole groups)


def collect_shard(model: Callable, task, config, update: int, generator: torch.Generator, shards: Shards) -> Shard:
    """One update's rollout on this process's share, Expand-and-Prune decided on the whole groups, the final
    rewards gathered, and the static selection. Every process draws the same prompts from ``generator``."""
    from .noise import TrajectoryNoise

    schedule, device = config.schedule, config.device
    prompts = task.sample_prompts(config.prompts_per_update, generator).to(device)
    P, G0 = len(prompts), schedule.group_sizes[0]
    keys = shards.share(P, G0)  # [n, 2]: this process's (prompt position, index) pairs
    order = torch.arange(G0).repeat(P, 1)  # canonical order of each group's live trajectories [P, g]
    records = []

    reward = in_calls_of(task.reward, config.device_batch)  # in calls of at most device_batch images, like the network

    def prune(c, x0_hat, c_prompts, live_keys):
        nonlocal order
        proxy = reward(x0_hat, c_prompts)
        table = _table(shards.gather(live_keys.to(device)).cpu(), shards.gather(proxy.float().to(device)), P, G0)
        R = table.gather(1, order).float()  # [P, G_i] in canonical order
        k = schedule.group_sizes[schedule.prune_steps.index(c) + 1]
        keep = select_subset(R, k, config.prune_strategy, generator)  # the same on every process
        records.append({"step": c, "rewards": R, "keep": keep})
        order = order.gather(1, keep)
        return _local_in_order(live_keys, order, G0)

    flat = rollout_flat(model, config.sampler, prompts[keys[:, 0]].to(device), keys, TrajectoryNoise(config.seed, update),
                        schedule.prune_steps, prune if len(schedule.group_sizes) > 1 else None, latent_shape=task.latent_shape,
                        max_batch=config.device_batch)
    local_R = reward(flat.latents[:, -1], flat.prompts)
    R = _table(shards.gather(flat.keys.to(device)).cpu(), shards.gather(local_R.float().to(device)), P, G0).gather(1, order).float()
    if config.selection != "all":
        keep = select_subset(R, config.select_k, config.selection, generator)
        order, R = order.gather(1, keep), R.gather(1, keep)
    local = _local_in_order(flat.keys, order, G0)
    K = order.shape[1]
    where = torch.full((P, G0), -1, dtype=torch.long)
    where[torch.arange(P)[:, None].expand(P, K), order] = torch.arange(P * K).view(P, K)
    sub = FlatRollout(flat.prompts[local.to(flat.prompts.device)], flat.keys[local], flat.latents[local.to(device)],
                      flat.log_probs[local.to(device)] if flat.log_probs is not None else None, flat.nfe)
    return Shard(sub, where[sub.keys[:, 0], sub.keys[:, 1]], R.to(device), flat.nfe, records)


def optimise_shard(model, reference, optimizer, shard: Shard, advantages: torch.Tensor, config, generator: torch.Generator,
                   shards: Shards) -> dict:
    """``num_minibatches`` optimizer steps over the global batch of P x K trained trajectories; see the module doc."""
    P, K = advantages.shape
    ro, device = shard.rollout, config.device
    adv = advantages.flatten()[shard.position.to(advantages.device)]  # [n] this process's advantages
    steps = range(config.trained_steps)
    perm = torch.randperm(P * K, generator=generator)  # the same global order on every process
    local_at = torch.full((P * K,), -1, dtype=torch.long)
    local_at[shard.position] = torch.arange(len(shard.position))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    stats = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "ratio_dev_first": 0.0}
    for i, mb in enumerate(torch.tensor_split(perm, config.num_minibatches)):
        optimizer.zero_grad(set_to_none=True)
        mine = local_at[mb]
        mine = mine[mine >= 0].to(device)  # this process's members of the mini-batch, in the permutation's order
        count = len(mb) * len(steps)  # the global count: the gradient is the whole mini-batch's average
        sums = torch.zeros(4, dtype=torch.float64)  # loss, kl (both already / count), clipped terms, max |log r|
        passes = torch.split(mine, config.device_batch) if config.device_batch else (mine,)
        for part in passes:
            if len(part) == 0:
                continue
            out = grpo_objective(model, config.sampler, ro.latents[part], ro.prompts[part], ro.log_probs[part], adv[part],
                                 steps, config.clip_range, config.beta, reference, count=count, backward=True)
            clipped = round(out.clip_frac * len(part) * len(steps))  # a count of (trajectory, step) terms
            sums += torch.tensor([out.loss.item(), out.kl, clipped, 0.0], dtype=torch.float64)
            sums[3] = max(sums[3].item(), out.max_abs_log_ratio)
        if shards.world > 1:  # one all_reduce of all gradients, flattened
            has = shards.max_(torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device))
            for p in params:  # a process with no member of this mini-batch adds zeros to the sum
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            flat = shards.sum_(torch.cat([p.grad.flatten() for p in params]))
            for p, g, any_grad in zip(params, flat.split([p.numel() for p in params]), has.tolist()):
                p.grad.copy_(g.view_as(p))
                if not any_grad:  # no process produced one: leave it out of the step, as a single process would
                    p.grad = None
        totals = shards.sum_(sums[:3].clone().to(device)).cpu()
        dev = shards.max_(sums[3:].clone().to(device)).cpu()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        stats["loss"] += totals[0].item() / config.num_minibatches
        stats["kl"] += totals[1].item() / config.num_minibatches
        stats["clip_frac"] += totals[2].item() / count / config.num_minibatches
        if i == 0:
            stats["ratio_dev_first"] = dev[0].item()
    return stats
