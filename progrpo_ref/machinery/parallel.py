r"""Data parallelism: one update's groups spread over W processes, every decision taken on the whole group.

The algorithm needs two things from the processes of a run (``algorithm.rollout.OneProcess``, where they are
trivial): which trajectories this process samples (``share``) and every process's values of a scalar per
trajectory (``gather``). ``Processes`` gives them over ``torch.distributed``, and the collectives the machinery
adds: sums and maxima of logged numbers, the gradient sum, the same start, a barrier and a broadcast.

Layout. The P x G_0 trajectories of an update, listed prompt-major ((p, g) for p, then g), are cut into W
contiguous slices, one per process (``share``): balanced to one trajectory, and a group may span processes. A
trajectory's noise depends only on (seed, update, p, g) (``algorithm/noise.py``), so it is the same trajectory
whichever process samples it.

Decisions. Preview rewards and final rewards are scalars: every process gathers all of them
(``Rollout.whole_groups``), so the OVF decision at each prune point, the static selection and the advantages are
computed on the whole group, identically everywhere. Every process tracks the same canonical order of each
group's kept trajectories (``Rollout.kept``) and keeps its own survivors where they are: no latent moves between
processes. After pruning the processes may hold unequal numbers of survivors; we do not rebalance them, because
moving a survivor means moving its whole history (T + 1 latents) for a gain of at most the imbalance of one
update's optimisation, and the initial split, which decides the larger sampling cost, is already balanced.

Optimisation (``trainer.optimise``). One global mini-batch permutation of the P x K trained trajectories (the
same generator on every process); each process computes the objective on its own members of a mini-batch,
normalised by the mini-batch's global count, and the gradients are summed over processes (``sum_gradients``,
bucketed) before the optimizer step. So the gradient equals a single process's on the whole mini-batch, and
every process takes the same step.

With one process (``torch.distributed`` not initialised) every collective is the identity. Only
``torch.distributed`` is used (gloo on CPU, nccl on GPU); start processes with ``torchrun`` or ``accelerate
launch`` (docs).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..algorithm.rollout import OneProcess

BUCKET_ELEMENTS = 1 << 23  # gradients summed in buckets of at most 8M elements (32 MB in fp32)


class Processes(OneProcess):
    """The processes of a run: world size W, this process's rank, and the collectives training needs."""

    def __init__(self):
        self.active = dist.is_available() and dist.is_initialized()
        if not self.active and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group() (and torch.cuda.set_device) before train(), "
                               "as python -m progrpo_ref train does; otherwise every process would train alone")
        self.world = dist.get_world_size() if self.active else 1
        self.rank = dist.get_rank() if self.active else 0
        # where collectives run: nccl needs CUDA tensors, gloo CPU ones (one process runs none)
        nccl = self.active and dist.get_backend() == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def share(self, prompts: int, group_size: int) -> torch.Tensor:
        """The (p, g) keys ``[n, 2]`` this process samples: its slice of the prompt-major list of all P x G_0."""
        keys = super().share(prompts, group_size)
        n = len(keys)
        return keys[n * self.rank // self.world: n * (self.rank + 1) // self.world]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t`` ``[n_r, ...]`` (n_r may differ, also be 0) concatenated in rank order, on t's device."""
        if self.world == 1:
            return t
        local = t.to(self.device)
        n = torch.tensor([len(t)], device=self.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[: len(t)] = local
        parts = [torch.zeros_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:s] for p, s in zip(parts, sizes)]).to(t.device)

    def sum(self, values: list[float]) -> list[float]:
        """Each number summed over processes (one process: the numbers as given, no tensor made)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float]) -> list[float]:
        """Each number's maximum over processes."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def _reduce(self, values, op):
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=op)
        return t.tolist()

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum every parameter's gradient over processes, in buckets of at most ``BUCKET_ELEMENTS`` (never a second
        copy of all gradients at once). A process without a gradient for a parameter adds zeros; a parameter no
        process has a gradient for is left without one, as a single process would leave it."""
        if self.world == 1:
            return
        anyone = self.max([float(p.grad is not None) for p in params])
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket, size = [], 0
        for p in [*params, None]:  # None closes the last bucket
            if bucket and (p is None or size + p.numel() > BUCKET_ELEMENTS):
                grads = torch.cat([q.grad.flatten() for q in bucket]).to(self.device)
                dist.all_reduce(grads, op=dist.ReduceOp.SUM)
                for q, g in zip(bucket, grads.split([q.numel() for q in bucket])):
                    q.grad.copy_(g.view_as(q))
                bucket, size = [], 0
            if p is not None:
                bucket.append(p)
                size += p.numel()
        for p, has in zip(params, anyone):
            if not has:
                p.grad = None

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

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process (a picklable object, e.g. an evaluation's dict)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
