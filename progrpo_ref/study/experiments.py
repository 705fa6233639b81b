"""A notebook's experiments: its profile, the runs it trains (arms x seeds, in worker processes), and the results
it stores (``cache.Results``), so that a notebook opened in JupyterLab shows the committed study without retraining.

``Study(notebook)`` is the one object a study notebook sets up. ``study.runs(configs, task)`` trains what the
stored results do not answer; ``study.policy(config, task)`` gives a run's trained policy (trained now if this
session has not trained it); ``study.measure(kind, inputs, compute)`` stores any other expensive measurement;
``study.save(fig, name)`` and ``study.record(values)`` write the committed figures and results file, but only when
``make reproduce`` rebuilds them (a reader's run and nbval's quick run write to a temporary folder instead).

Workers run with ``threads_per_worker`` torch threads, so results are bit-identical to a serial run with the same
thread count; they are spawned (not forked) for safety with torch.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from types import SimpleNamespace

from tqdm import tqdm  # text progress (a notebook's widget would be saved as a stale '0%')

from ..machinery.config import TrainConfig
from ..machinery.trainer import train
from .cache import Results, key_of
from .plots import current_profile
from .profiles import SIZES


def _run(config: TrainConfig, task, threads: int, keep_weights: bool = False):
    import torch

    torch.set_num_threads(threads)
    model = task.policy(config.device)
    history = train(config, task, model=model)
    if not keep_weights:
        return history
    return history, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def run_many(configs: dict, task, workers: int | None = None, threads_per_worker: int = 1, desc: str = "runs",
             keep_weights: bool = False) -> dict:
    """Train every ``{name: TrainConfig}`` on ``task``; returns ``{name: history}`` (``{name: (history, weights)}``
    with ``keep_weights``). ``workers`` defaults to the number of CPU cores."""
    if not configs:
        return {}
    workers = workers or min(len(configs), os.cpu_count() or 1)
    configs = {k: replace(c, progress=False) for k, c in configs.items()}
    if workers <= 1:
        return {k: _run(c, task, threads_per_worker, keep_weights) for k, c in tqdm(configs.items(), desc=desc)}
    out = {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run, c, task, threads_per_worker, keep_weights): k for k, c in configs.items()}
        for f in tqdm(as_completed(futures), total=len(futures), desc=desc):
            out[futures[f]] = f.result()
    return {k: out[k] for k in configs}


def run_inputs(config: TrainConfig, task) -> dict:
    """What a training run depends on: its config (without where it would save) and its task."""
    return {"config": {**config.to_dict(), "progress": False, "checkpoint_path": None}, "task": task.describe()}


class Study:
    """One notebook's experiments (see the module docstring). ``profile``: "quick" (nbval: small sizes, nothing
    stored) or "full" (the study's sizes), from ``PROGRPO_PROFILE`` (default "full")."""

    def __init__(self, notebook: str, profile: str | None = None, workers: int = 2, results: Results | None = None,
                 threads: int = 2):
        import torch

        torch.set_num_threads(threads)  # the notebook's own computations: bit-identical for the same thread count
        self.notebook, self.t0 = notebook, time.perf_counter()
        self.profile = profile or current_profile()
        self.results = results or Results(notebook, mode="off" if self.profile == "quick" else None)
        self.workers = workers
        self.weights: dict[str, dict] = {}  # run key -> the trained policy's weights, for runs trained in this session
        self.size = SimpleNamespace(**SIZES.get(notebook, {}).get(self.profile, {}))  # this profile's sizes

    def __repr__(self) -> str:
        return f"{self.notebook}: {self.profile} profile (stored runs: figures/runs/{self.results.path.name}); sizes {vars(self.size)}"

    @property
    def writes(self) -> bool:
        """Whether this run rewrites the committed figures and results (``make reproduce``: full profile, rebuild)."""
        return self.profile == "full" and self.results.mode == "rebuild"

    def runs(self, configs: dict, task, desc: str = "runs") -> dict:
        """``{name: history}`` of every ``{name: TrainConfig}``: the stored history where one answers the config
        exactly, the others trained now (in ``workers`` processes, one torch thread each)."""
        inputs = {name: run_inputs(c, task) for name, c in configs.items()}
        todo = {name: configs[name] for name in self.results.missing("train", inputs)}
        trained = run_many(todo, task, workers=min(self.workers, max(len(todo), 1)), desc=desc, keep_weights=True)
        for name, (history, weights) in trained.items():
            self.weights[key_of("train", inputs[name])] = weights
            history["config"]["checkpoint_path"] = None
        return {name: self.results.get("train", inputs[name], lambda name=name: trained[name][0]) for name in configs}

    def policy(self, config: TrainConfig, task):
        """The policy ``config`` trains on ``task``: from this session's run, or trained now (one process)."""
        key = key_of("train", run_inputs(config, task))
        if key not in self.weights:
            _, self.weights[key] = _run(replace(config, progress=False), task, threads=2, keep_weights=True)
        model = task.policy(config.device)
        model.load_state_dict(self.weights[key])
        return model.eval()

    def measure(self, kind: str, inputs, compute):
        """A stored measurement (``cache.Results.get``): ``compute()`` runs only when no stored one answers ``inputs``."""
        return self.results.get(kind, inputs, compute)

    def on_trained(self, kind: str, config: TrainConfig, task, inputs: dict, fn):
        """``fn(policy)`` for the policy ``config`` trains on ``task``, stored under the run's inputs and ``inputs``:
        the policy is needed (and, if this session has not trained it, trained) only when nothing stored answers."""
        return self.measure(kind, {"run": run_inputs(config, task), **inputs}, lambda: fn(self.policy(config, task)))

    def save(self, fig, name: str):
        """Save a figure: to ``figures/`` when this run rebuilds the committed results, else to a temporary folder."""
        from .plots import save

        return save(fig, name, self.writes)

    def record(self, values: dict) -> None:
        """Store the notebook's numbers in ``figures/results.json`` (only when rebuilding; see ``results.record``)."""
        from .results import record

        record(self.notebook.split("_")[0], {**values, "seconds": time.perf_counter() - self.t0}, self.writes)

    def finish(self) -> str:
        """Write the stored results (when rebuilding) and say what this run read and computed."""
        self.results.save()
        return (f"notebook {self.notebook.split('_')[0]} ran in {time.perf_counter() - self.t0:.0f} s ({self.profile} "
                f"profile; {self.results.summary()})")


def seconds_per_update(config: TrainConfig, task, updates: int, warmup: int = 1, threads: int = 2) -> float:
    """Mean sampling + optimisation seconds of ``updates`` updates of ``config`` on ``task``, after ``warmup``
    (evaluations not counted), serially in this process with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    n = warmup + updates
    history = train(replace(config, num_updates=n, eval_every=n, progress=False), task)
    rows = history["updates"][warmup:]
    return sum(r["sampling_s"] + r["optimisation_s"] for r in rows) / len(rows)
