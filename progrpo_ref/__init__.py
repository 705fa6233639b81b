"""progrpo-ref: a reference implementation of Pro-GRPO (Expand and Prune) on a small flow model.

Core (depends on torch only): ``sde`` (Flow-GRPO's SDE step and log-prob), ``rollout``, ``ovf``
(Optimal Variance Filtering), ``grpo`` (advantages, the clipped loss, the KL), ``pro_grpo``
(Expand-and-Prune). Around it: ``data``, ``model``, ``classifier``, ``rewards``, ``pretrain``,
``trainer`` (the training loop and the arms of the study), ``analysis``, ``plots`` and ``bench``.
"""
from .grpo import clipped_policy_loss, gaussian_kl, group_advantages, step_log_prob
from .ovf import ovf_select, select_subset
from .pro_grpo import PRESETS, PruneSchedule, expand_and_prune, record_previews
from .rollout import NFECounter, Rollout, rollout, sample
from .sde import SDEStep, sde_step_with_logprob

__all__ = [
    "SDEStep", "sde_step_with_logprob", "NFECounter", "Rollout", "rollout", "sample",
    "ovf_select", "select_subset", "group_advantages", "clipped_policy_loss", "gaussian_kl",
    "step_log_prob", "PruneSchedule", "PRESETS", "expand_and_prune", "record_previews",
]
__version__ = "0.1.0"
