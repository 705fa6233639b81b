"""The bookkeeping around the training loop, so that ``trainer.train`` reads as the algorithm.

``Run`` holds a run's state: the policy and its optimizer, the KL reference, the processes, the NFE counter and
the history. It starts a run or resumes one from a checkpoint (refusing one whose config or task differs), shows
the progress bar, audits the previews and moves the prune points when the config asks (``beyond_paper``), logs
each update's row (summed or maximised over processes), evaluates on the task's fixed evaluation and saves
checkpoints.
"""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from ..algorithm.grpo import group_std
from ..algorithm.noise import TrajectoryNoise, derive_seed
from ..algorithm.rollout import NFECounter
from ..algorithm.task import check_sampler, check_task, task_costs
from ..beyond_paper.adaptive import Placement, decide
from ..beyond_paper.fidelity import audit
from .checkpoint import load_policy_state, load_training_checkpoint, save_training_checkpoint
from .config import ADDED_FIELDS, RESUMABLE_CHANGES, TrainConfig, batch_arithmetic
from .parallel import Processes

TIMING_KEYS = ("sampling_s", "optimisation_s", "eval_s", "task_decode_s", "task_reward_s", "audit_s")


class Run:
    """One run of ``train``: what the loop reads (``model``, ``reference``, ``optimizer``, ``processes``,
    ``counter``) and what it writes (``history``)."""

    def __init__(self, config: TrainConfig, task, model: torch.nn.Module | None, resume: bool):
        if not isinstance(config, TrainConfig):
            raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
        check_task(task)
        check_sampler(task, config.sampler)
        if resume and not config.checkpoint_path:
            raise ValueError("resume=True needs config.checkpoint_path")
        self.config, self.task = config, task
        self.model = model if model is not None else task.policy(config.device)
        trainable = [p for p in self.model.parameters() if p.requires_grad]  # e.g. only a LoRA adapter's
        if not trainable:
            raise ValueError(f"the policy {type(self.model).__name__} has no parameter with requires_grad=True")
        self.processes = Processes()  # one unless torch.distributed is initialised
        self.processes.same_start(self.model)
        self.lead = self.processes.rank == 0  # evaluates, audits, saves checkpoints and shows progress
        self.reference = task.reference(self.model, config.device) if config.beta > 0 else None
        self.optimizer = torch.optim.Adam(trainable, lr=config.lr)
        self.counter = NFECounter(self.model)
        self.history = {"config": config.to_dict(), "task": task.describe(), "updates": [], "evals": []}
        self.placement = None  # the adaptive schedule's current placement (None: the config's schedule)
        self.start = self._resume() if resume else 0
        if config.progress and self.lead:
            print(batch_arithmetic(config, self.processes.world))
        if self.start == 0:
            self._evaluate(0)

    def _resume(self) -> int:
        config = self.config
        ckpt = load_training_checkpoint(config.checkpoint_path)
        _check_resumable(ckpt["state"], self.history, config.checkpoint_path)
        load_policy_state(self.model, ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.history["updates"], self.history["evals"] = ckpt["state"]["updates"], ckpt["state"]["evals"]
        start = self.processes.broadcast(len(self.history["updates"]))  # every process resumes where the first does
        if config.num_updates < start:
            raise ValueError(f"num_updates={config.num_updates} is fewer than the {start} updates in {config.checkpoint_path}")
        if start < config.num_updates and self.history["evals"] and self.history["evals"][-1]["update"] % config.eval_every:
            self.history["evals"].pop()  # an end-of-run evaluation off the eval_every grid: the longer run has none there
        last = self.history["updates"][-1] if self.history["updates"] else {}
        if config.adaptive and "placement" in last:
            self.placement = Placement.from_dict(last["placement"], config.schedule.num_steps)
        return start

    def updates(self):
        """The update numbers u = start + 1 .. num_updates, under a progress bar."""
        self.bar = tqdm(range(self.start + 1, self.config.num_updates + 1), desc=self.config.arm, initial=self.start,
                        total=self.config.num_updates, disable=not (self.config.progress and self.lead))
        return self.bar

    def begin(self, u: int) -> TrainConfig:
        """Start update u: audit the previews and move the prune points if due, reset the counters, and return the
        config this update samples and trains with (the config, or the adaptive placement's schedule)."""
        config = self.config
        self.audited = self._audit(u) if config.audit_every and (u - 1) % config.audit_every == 0 else None
        if self.audited is not None and config.adaptive:
            estimates = {int(c): e for c, e in self.audited["fidelity"].items()}
            current = self.placement.calls if self.placement is not None else config.schedule.prune_steps
            self.placement = decide(config.schedule, current, estimates, config.fidelity_target, config.fidelity_z)
        self.counter.nfe = 0
        self.costs_before = dict(task_costs(self.task))
        self.seconds = {}
        if self.placement is None:
            return config
        p = self.placement
        return replace(config, schedule=p.schedule, selection=p.selection, select_k=p.select_k, adaptive=False,
                       audit_every=0, progress=False)

    @contextmanager
    def timed(self, key: str):
        """Wall-clock seconds of the block, logged under ``key`` (the slowest process's)."""
        t = time.perf_counter()
        yield
        self.seconds[key] = time.perf_counter() - t

    def log(self, u: int, R: torch.Tensor, A: torch.Tensor, stats: dict) -> None:
        """The history row of update u: rewards R [P, K] of the trained trajectories, their spread and clustering,
        NFE and the task's costs summed over processes, the optimisation's statistics."""
        config, costs = self.config, task_costs(self.task)
        nfe, *cost_sums = self.processes.sum([self.counter.nfe, *(costs[k] - self.costs_before[k] for k in costs)])
        seconds = dict(zip(self.seconds, self.processes.max(list(self.seconds.values()))))
        spread = group_std(R)
        self.history["updates"].append({
            "update": u,
            "reward_mean": R.mean().item(),
            "reward_std": spread.mean().item(),
            "cluster_frac": (A.abs() <= config.cluster_delta).float().mean().item(),
            "zero_std_ratio": (spread == 0).float().mean().item(),
            "nfe_per_prompt": nfe / config.prompts_per_update,
            "trained_per_prompt": R.shape[1],
            **seconds,
            **stats,
            **{f"task_{k}": v for k, v in zip(costs, cost_sums)},  # e.g. decodes, reward calls, their seconds
            **({"audit": {k: v for k, v in self.audited.items() if k != "audit_s"}, "audit_s": self.audited["audit_s"]}
               if self.audited is not None else {}),
            **({"placement": self.placement.to_dict()} if self.placement is not None else {}),
        })
        self.bar.set_postfix(reward=f"{R.mean().item():.2f}")

    def evaluate_and_save(self, u: int) -> None:
        """Evaluate after every ``eval_every`` updates and at the end; save a checkpoint every ``checkpoint_every``
        updates and at the end."""
        config, last = self.config, u == self.config.num_updates
        if u % config.eval_every == 0 or last:
            self._evaluate(u)
        if config.checkpoint_path and ((config.checkpoint_every and u % config.checkpoint_every == 0) or last):
            if self.lead:  # the RNG state: every update's randomness is a function of (seed, update), see algorithm/noise.py
                rng = {"seed": config.seed, "next_update": u + 1, "scheme": "noise.derive_seed(stream, seed, update, ...)"}
                save_training_checkpoint(config.checkpoint_path, self.model, self.optimizer, {**self.history, "rng": rng})
            self.processes.barrier()  # no process reads or overwrites it before it is complete

    def _evaluate(self, u: int) -> None:
        """On the first process (all hold the same weights), shared with the others."""
        t = time.perf_counter()
        row = ({"update": u, **self.task.evaluate(self.model, self.config.sampler), "eval_s": time.perf_counter() - t}
               if self.lead else None)
        self.history["evals"].append(self.processes.broadcast(row))

    def _audit(self, u: int) -> dict:
        """On the first process, shared with the others; its own prompts and noise (``fidelity.audit``)."""
        config, t, row = self.config, time.perf_counter(), None
        if self.lead:
            g = torch.Generator().manual_seed(derive_seed("audit", config.seed, u))
            prompts = self.task.sample_prompts(config.audit_prompts, g).to(config.device)
            row = audit(self.model, config.sampler, self.task.reward, prompts, config.schedule.group_sizes[0],
                        config.trained_group_size, TrajectoryNoise(config.seed, u, stream="audit"),
                        latent_shape=self.task.latent_shape, max_batch=config.device_batch)
            row["audit_s"] = time.perf_counter() - t
        return self.processes.broadcast(row)


def _check_resumable(saved: dict, history: dict, path) -> None:
    """Refuse to resume a run whose config or task differs from the checkpoint's, naming the fields."""
    from ..algorithm.samplers import sampler_from_dict, sampler_to_dict

    def diff(a: dict, b: dict, prefix: str):
        keys = sorted(set(a) | set(b))
        return [f"{prefix}{k}: checkpoint {a.get(k)!r}, now {b.get(k)!r}" for k in keys
                if k not in RESUMABLE_CHANGES and _jsonable(a.get(k)) != _jsonable(b.get(k))
                and not (prefix == "" and k not in a and k in ADDED_FIELDS and b.get(k) == ADDED_FIELDS[k])]

    saved_config = dict(saved.get("config", {}))
    if isinstance(saved_config.get("sampler"), dict):  # a sampler field added since (e.g. FlowSDE.grid) takes its default
        try:
            saved_config["sampler"] = sampler_to_dict(sampler_from_dict(saved_config["sampler"]))
        except (TypeError, ValueError):
            pass  # left as saved: the comparison below names it
    differing = diff(saved_config, history["config"], "") + diff(saved.get("task", {}), history["task"], "task.")
    if differing:
        raise ValueError(f"cannot resume from {path}: the config differs from the checkpoint's in "
                         + "; ".join(differing) + f" (only {', '.join(RESUMABLE_CHANGES)} may change)")


def _jsonable(v):
    return json.loads(json.dumps(v))


def strip_timings(history: dict) -> dict:
    """The history without wall-clock fields (for comparing runs)."""
    drop = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]
    return {"updates": drop(history["updates"]), "evals": drop(history["evals"])}
