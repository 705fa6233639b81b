"""Run many training configs (arms x seeds) on one task, in parallel worker processes, with a progress bar.

Each worker runs with ``threads_per_worker`` torch threads, so results are bit-identical to a
serial run with the same thread count. Workers are spawned (not forked) for safety with torch.
"""
from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace

from tqdm.auto import tqdm

from ..machinery.config import TrainConfig
from ..machinery.trainer import train


def _run(config: TrainConfig, task, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    return train(config, task)


def run_many(configs: dict, task, workers: int | None = None, threads_per_worker: int = 1, desc: str = "runs") -> dict:
    """Train every ``{name: TrainConfig}`` on ``task``; returns ``{name: history}``. ``workers``
    defaults to the number of CPU cores."""
    workers = workers or min(len(configs), os.cpu_count() or 1)
    configs = {k: replace(c, progress=False) for k, c in configs.items()}
    if workers <= 1:
        return {k: _run(c, task, threads_per_worker) for k, c in tqdm(configs.items(), desc=desc)}
    out = {}
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_run, c, task, threads_per_worker): k for k, c in configs.items()}
        for f in tqdm(as_completed(futures), total=len(futures), desc=desc):
            out[futures[f]] = f.result()
    return {k: out[k] for k in configs}


def trained_policy(task, checkpoint_path, device: str = "cpu"):
    """The task's policy with the weights a run saved at ``checkpoint_path`` (``TrainConfig.checkpoint_path``),
    for analyses of a trained policy without training it again."""
    from ..machinery.checkpoint import load_training_checkpoint

    model = task.policy(device)
    model.load_state_dict(load_training_checkpoint(checkpoint_path)["model"])
    return model.eval()
