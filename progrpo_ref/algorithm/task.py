r"""The task seam: everything the trainer needs that is specific to a model and its data.

A task says what is being generated and how it is judged; the method (rollout, objective,
Expand-and-Prune, trainer) only calls these members:

    latent_shape                        [C, H, W] of the model's latents
    describe() -> dict                  a JSON-able identity, stored in histories and checkpoints
    sample_prompts(n, generator)        prompts [n] for one update (integer ids: classes, or indices
                                        into precomputed text embeddings)
    policy(device) -> nn.Module         a fresh trainable policy, model(x, t, prompts) -> output
    reference(policy, device)           a frozen reference with the policy's signature, for the KL
                                        (a frozen copy; or the policy with its LoRA adapter disabled)
    reward(images, prompts) -> [B]      the training reward (also scores previews)
    evaluate(policy, sampler) -> dict   an evaluation that no selection step has seen: fixed
                                        prompts, fixed noise, the same for every arm and run

Optional members, and the default the trainer uses when they are absent (``check_sampler``, ``task_costs``,
``passes_per_sample`` apply them):

    task.check_sampler(sampler)         refuse a sampler that does not fit the model       default: accept any
    task.costs: dict[str, float]        running counts of the task's own work (VAE decodes,   default: none
                                        reward images, their seconds), logged per update as
                                        ``task_<name>``, summed over processes
    policy.passes_per_sample: int       network passes per sample and call (2 with            default: 1
                                        classifier-free guidance), for the NFE count

``progrpo_ref.digits.DigitsTask`` (8x8 digits) and ``progrpo_ref.adapters`` (diffusers pipelines) implement
it; ``check_task`` says which members a candidate lacks.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from .samplers import Sampler


@runtime_checkable
class Task(Protocol):
    latent_shape: tuple[int, ...]

    def describe(self) -> dict: ...

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor: ...

    def policy(self, device: str | torch.device = "cpu") -> torch.nn.Module: ...

    def reference(self, policy: torch.nn.Module, device: str | torch.device = "cpu") -> Callable: ...

    def reward(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor: ...

    def evaluate(self, policy: Callable, sampler: Sampler) -> dict: ...


MEMBERS = ("latent_shape", "describe", "sample_prompts", "policy", "reference", "reward", "evaluate")


def check_task(task) -> None:
    """Raise ``ValueError`` naming the members a task lacks."""
    missing = [m for m in MEMBERS if not hasattr(task, m)]
    if missing:
        raise ValueError(f"task {type(task).__name__} lacks {missing}; a task implements {list(MEMBERS)} (see progrpo_ref.algorithm.task)")


def check_sampler(task, sampler: Sampler) -> None:
    """``task.check_sampler(sampler)`` if the task has one (it raises ``ValueError`` for a sampler its model cannot
    use), else nothing: any sampler is accepted."""
    if hasattr(task, "check_sampler"):
        task.check_sampler(sampler)


def task_costs(task) -> dict:
    """``task.costs`` (running counts of the task's own work), or ``{}`` for a task that keeps none."""
    return getattr(task, "costs", {})


def passes_per_sample(model) -> int:
    """``model.passes_per_sample`` (2 for a classifier-free-guided policy), or 1."""
    return getattr(model, "passes_per_sample", 1)
