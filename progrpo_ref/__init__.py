"""progrpo-ref: a reference implementation of Pro-GRPO (Expand and Prune) on a small flow model.

Core (depends on torch only): ``sde`` (Flow-GRPO's SDE step and log-prob), ``rollout``, ``ovf``
(Optimal Variance Filtering), ``grpo`` (advantages and the clipped loss), ``pro_grpo``
(Expand-and-Prune). Around it: ``data``, ``model``, ``classifier``, ``rewards``, ``pretrain``,
``trainer`` (the training loop), ``bench`` and ``plots``.
"""
from .sde import SDEStep, sde_step_with_logprob
from .rollout import NFECounter, Rollout, rollout, sample

__all__ = ["SDEStep", "sde_step_with_logprob", "NFECounter", "Rollout", "rollout", "sample"]
__version__ = "0.1.0"
