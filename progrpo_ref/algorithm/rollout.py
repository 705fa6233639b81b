r"""Rollout: sample trajectories with a stochastic sampler, keeping what GRPO trains on.

For each of the P prompts c, a group of G trajectories starts from x_0 ~ N(0, I) and takes the sampler's T
steps, x_{t+1} ~ pi_theta(. | x_t, c) (``sampler.step``), storing every state and log pi of every step. All
live trajectories share one batched network call per step (or calls of at most ``max_batch``: the same NFE).
Each trajectory's x_0 and step noise come from its own stream (``noise.TrajectoryNoise``): a function of
(seed, update, the prompt's position p, the trajectory's index g), not of the batch or of pruning. The model
is any callable ``model(x [B, C, H, W], t [B], prompts [B]) -> out``, t the sampler's ``model_time(i)``
(sigma for a flow), out what the sampler expects (a velocity for a flow); ``NFECounter`` wraps it so that
the number of network evaluations is measured, not derived.

The preview hook is what Expand-and-Prune uses (``pro_grpo.py``): right after network call ``call``, the
rollout forms the sampler's one-step clean estimate x0_hat of every live trajectory (``sampler.preview``: no
extra network call) and hands it to ``on_preview``. If that returns which trajectories of each group to keep,
only those go on, taking their step with the same model output.

Several processes can share one rollout (``machinery/parallel.py``): each samples its share of the P x G
trajectories (``processes.share``) and every decision on a group is taken on the whole group, gathered from
all of them (``processes.gather``). ``OneProcess`` is the default: it samples everything, and its gather is
the identity. ``Rollout`` holds the result: the trajectories this process holds, in canonical order (prompt by
prompt, each group in the order its last selection left it), and which ones each group kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .noise import TrajectoryNoise, as_noise
from .samplers import Sampler
from .task import passes_per_sample


class NFECounter(torch.nn.Module):
    """Wraps a model and counts network evaluations: one per sample per forward call, times the model's
    ``passes_per_sample`` (2 for a classifier-free-guided model, whose conditional and unconditional rows are
    both network passes, run as one batched call; see ``task.py``)."""

    def __init__(self, model: Callable):
        super().__init__()
        self.model = model
        self.nfe = 0  # samples evaluated
        self.calls = 0  # batched forward calls

    def forward(self, x, t, prompts):
        self.nfe += x.shape[0] * passes_per_sample(self.model)
        self.calls += 1
        return self.model(x, t, prompts)


def in_calls_of(reward_fn: Callable, max_batch: int) -> Callable:
    """``reward_fn(images [B, ...], prompts [B]) -> [B]`` called on at most ``max_batch`` images at a time
    (0: all at once), the results concatenated: a reward call bounded like the network's."""
    def bounded(images, prompts):
        if len(images) == 0:
            return images.new_zeros(0)
        n = max_batch or len(images)
        return torch.cat([reward_fn(images[i:i + n], prompts[i:i + n]) for i in range(0, len(images), n)])

    return bounded


def all_keys(prompts: int, group_size: int) -> torch.Tensor:
    """Every trajectory's key (prompt position p, index g), prompt by prompt: ``[P * G, 2]``."""
    return torch.stack(torch.meshgrid(torch.arange(prompts), torch.arange(group_size), indexing="ij"), -1).view(-1, 2)


class OneProcess:
    """The processes of a run when there is one: it samples every trajectory and its gather is the identity.
    ``machinery.parallel.Processes`` has the same two members over ``torch.distributed``."""

    world, rank = 1, 0

    def share(self, prompts: int, group_size: int) -> torch.Tensor:
        """The keys ``[n, 2]`` this process samples of the P x G: here all of them."""
        return all_keys(prompts, group_size)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every process's ``t`` ``[n_r, ...]`` concatenated in rank order: here ``t`` itself."""
        return t


@dataclass
class Rollout:
    """The trajectories this process holds after a rollout (all of them in one process), in canonical order.

    K = trajectories kept per prompt (G when nothing was pruned or selected); n = how many this process holds
    (P x K in one process, so ``grouped`` turns any ``[n, ...]`` field into ``[P, K, ...]``)."""

    prompts: torch.Tensor  # [n] prompt ids
    keys: torch.Tensor  # [n, 2] long, on the CPU: (prompt position p, trajectory index g among the started)
    latents: torch.Tensor | None  # [n, T + 1, C, H, W]: x_0 (noise) ... x_T (final sample); None while sampling
    log_probs: torch.Tensor | None  # [n, T] log pi_old(x_{t+1} | x_t, c); NaN at a deterministic step; None for a deterministic sampler
    nfe: int  # network evaluations measured in this process
    kept: torch.Tensor  # [P, K] long, on the CPU: the indices g each group keeps, in canonical order (the same on every process)
    started: int  # G_0: trajectories started per prompt
    previews: list[dict] = field(default_factory=list)  # per prune point: {"call", "rewards" [P, G_{j-1}], "keep" [P, G_j]}
    processes: OneProcess = field(default_factory=OneProcess, repr=False)

    @property
    def images(self) -> torch.Tensor:
        """Final samples x_T ``[n, C, H, W]``."""
        return self.latents[:, -1]

    def grouped(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` ``[n, ...]`` (a field of the held trajectories) as ``[P, K, ...]``: needs whole groups (one process)."""
        P, K = self.kept.shape
        if len(t) != P * K:
            raise ValueError(f"this process holds {len(t)} of the {P} x {K} trajectories; [P, K] views need all of them")
        return t.view(P, K, *t.shape[1:])

    @property
    def position(self) -> torch.Tensor:
        """Where each held trajectory sits in the flat batch of all P x K (prompt-major): ``[n]`` long, CPU."""
        return _positions(self.keys, self.kept, self.started)

    def whole_groups(self, values: torch.Tensor) -> torch.Tensor:
        """One scalar per held trajectory ``[n]`` -> the whole groups' ``[P, K]`` fp32 on the CPU, gathered from
        every process, in canonical order: what every decision on a group is taken on."""
        values = values.float()  # every process's in one dtype (an empty share's too)
        keys, values = self.processes.gather(self.keys.to(values.device)), self.processes.gather(values)
        P = len(self.kept)
        table = torch.full((P, self.started), float("nan"), dtype=torch.float64)
        table[keys[:, 0].cpu(), keys[:, 1].cpu()] = values.cpu().double()
        return table.gather(1, self.kept).float()

    def final_rewards(self, reward_fn: Callable) -> torch.Tensor:
        """R ``[P, K]`` (fp32, CPU): ``reward_fn(images [B, C, H, W], prompts [B])`` on the final samples."""
        return self.whole_groups(reward_fn(self.images, self.prompts))

    def select(self, keep: torch.Tensor) -> "Rollout":
        """The sub-groups ``keep`` ``[P, k]`` (indices into each group's K, e.g. an OVF subset of R)."""
        kept = self.kept.gather(1, keep.cpu())
        held = held_in_order(self.keys, kept, self.started)
        on = held.to(self.prompts.device)
        return replace(self, prompts=self.prompts[on], keys=self.keys[held], latents=self.latents[on],
                       log_probs=self.log_probs[on] if self.log_probs is not None else None, kept=kept)


def _positions(keys: torch.Tensor, kept: torch.Tensor, started: int) -> torch.Tensor:
    """Each key's index in the flat ``[P * K]`` batch of ``kept`` ``[P, K]``, or -1 where it is not kept."""
    P, K = kept.shape
    where = torch.full((P, started), -1, dtype=torch.long)
    where[torch.arange(P)[:, None], kept] = torch.arange(P * K).view(P, K)
    return where[keys[:, 0], keys[:, 1]]


def held_in_order(keys: torch.Tensor, kept: torch.Tensor, started: int) -> torch.Tensor:
    """Indices into ``keys`` ``[n, 2]`` of the trajectories ``kept`` ``[P, K]`` holds, in canonical order."""
    pos = _positions(keys, kept, started)
    held = torch.nonzero(pos >= 0).flatten()
    return held[pos[held].argsort()]


def _check(sampler, prompts, group_size, preview_steps, latent_shape):
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sampler must be a Sampler (e.g. FlowSDE()), got {type(sampler).__name__}")
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 1 or prompts.is_floating_point() or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty integer tensor [P], got {prompts!r:.80}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be an integer >= 1")
    bad = [c for c in preview_steps if not 1 <= c <= sampler.num_steps]
    if bad:
        raise ValueError(f"preview_steps={tuple(preview_steps)} must lie in [1, {sampler.num_steps}] (network calls)")
    if not (isinstance(latent_shape, (tuple, list)) and latent_shape and all(isinstance(d, int) and d > 0 for d in latent_shape)):
        raise ValueError(f"latent_shape={latent_shape!r} must be a tuple of positive ints, the task's [C, H, W]")


def _checked_keep(keep, kept: torch.Tensor) -> torch.Tensor:
    """``keep`` on the CPU, refused unless it is ``[P, k]`` of distinct indices into each group's live ones."""
    keep = keep.cpu() if isinstance(keep, torch.Tensor) else keep
    P, g = kept.shape
    if not (isinstance(keep, torch.Tensor) and keep.dim() == 2 and len(keep) == P and not keep.is_floating_point()
            and len(keep) and ((keep >= 0) & (keep < g)).all() and (keep.sort(dim=1).values.diff(dim=1) > 0).all()):
        raise ValueError(f"on_preview must return None or [P, k] = [{P}, k] distinct indices in 0..{g - 1} per group, "
                         f"got {keep!r:.120}")
    return keep


def _network(model, x, t, prompts, max_batch):
    """The model's output on every live trajectory, in calls of at most ``max_batch`` (0: one call)."""
    n = max_batch or len(x)
    return torch.cat([model(xs, t.expand(len(xs)), cs) for xs, cs in zip(x.split(n), prompts.split(n))])


@torch.no_grad()
def rollout(
    model: Callable,
    sampler: Sampler,
    prompts: torch.Tensor,
    group_size: int,
    noise: TrajectoryNoise | int | None = None,
    preview_steps: tuple[int, ...] = (),
    on_preview: Callable | None = None,
    *,
    latent_shape: tuple[int, ...],
    max_batch: int = 0,
    processes: OneProcess | None = None,
) -> Rollout:
    """Sample ``group_size`` trajectories for each of the P ``prompts`` ``[P]`` (this process's share of them); see
    the module doc. ``noise``: the update's ``TrajectoryNoise`` (an int is a seed); ``latent_shape``: the task's
    [C, H, W]; ``max_batch``: at most this many trajectories per network call (0: all at once).

    ``on_preview(call, x0_hat [n_live, C, H, W], live)`` runs right after each network call in ``preview_steps``;
    ``live`` is a ``Rollout`` of the live trajectories (prompts, keys, kept; no latents yet). It may return
    ``keep`` ``[P, k]``: which of each group's live trajectories go on (indices into ``live.kept``'s columns, the
    same decision on every process). A process with no live trajectory still calls it (a distributed prune is a
    collective call) but not the network."""
    _check(sampler, prompts, group_size, preview_steps, latent_shape)
    processes, noise = processes or OneProcess(), as_noise(noise)
    P, T, device = len(prompts), sampler.num_steps, prompts.device
    counter = model if isinstance(model, NFECounter) else NFECounter(model)
    nfe_before = counter.nfe
    keys = processes.share(P, group_size)  # [n, 2]: the (p, g) this process samples
    kept = torch.arange(group_size).repeat(P, 1)  # [P, g]: each group's live trajectories, in order
    c = prompts[keys[:, 0].to(device)]  # [n] prompt ids
    z = noise.draws_for(keys.tolist(), T + 1, latent_shape) if len(keys) else torch.zeros(0, T + 1, *latent_shape)
    x = z[:, 0].to(device)  # x_0 ~ N(0, I)
    states, log_probs = [x], []
    for i in range(T):
        out = _network(counter, x, sampler.model_time(i).to(device), c, max_batch) if len(x) else torch.zeros_like(x)
        if on_preview is not None and i + 1 in preview_steps:
            live = Rollout(c, keys, None, None, counter.nfe - nfe_before, kept, group_size, processes=processes)
            keep = on_preview(i + 1, sampler.preview(out, x, i), live)
            if keep is not None:  # prune: survivors keep their history and this step's model output
                kept = kept.gather(1, _checked_keep(keep, kept))
                held = held_in_order(keys, kept, group_size)
                on = held.to(device)
                x, out, c, z, keys = x[on], out[on], c[on], z[held], keys[held]
                states, log_probs = [s[on] for s in states], [lp[on] for lp in log_probs]
        step = sampler.step(out, x, i, noise=z[:, i + 1].to(device) if sampler.stochastic else None)
        x = step.prev_sample
        states.append(x)
        if sampler.stochastic:  # a deterministic step of a stochastic sampler (CPS's last) has no log-prob: NaN
            log_probs.append(step.log_prob if step.log_prob is not None else torch.full((len(x),), float("nan"), device=device))
    return Rollout(c, keys, torch.stack(states, 1), torch.stack(log_probs, 1) if log_probs else None,
                   counter.nfe - nfe_before, kept, group_size, processes=processes)


def sample(model, sampler: Sampler, prompts, noise=None, *, latent_shape: tuple[int, ...], max_batch: int = 0) -> torch.Tensor:
    """Final images ``[B, C, H, W]``, one per prompt ``[B]``, with ``sampler`` (its ``deterministic()``
    mode for evaluation)."""
    return rollout(model, sampler, prompts, 1, noise, latent_shape=latent_shape, max_batch=max_batch).images
