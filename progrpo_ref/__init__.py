"""progrpo-ref: a reference implementation of Pro-GRPO (Expand and Prune).

Read ``minimal.py`` first: the paper's whole algorithm in one file. The package around it, in three layers:

- ``algorithm/``: the paper's algorithm, depending on torch only: ``samplers`` (Flow-GRPO's SDE and CPS samplers,
  DDPO's DDIM sampler), ``noise`` (one noise stream per trajectory), ``rollout``, ``ovf`` (Optimal Variance
  Filtering), ``grpo`` (advantages and the objective J), ``pro_grpo`` (Expand-and-Prune), ``task`` (the task seam);
- ``machinery/``: what scales it and keeps it safe: ``config`` (TrainConfig, its validation, the named arms),
  ``trainer`` (the training loop), ``run`` (its bookkeeping), ``checkpoint``, ``parallel`` (data parallelism);
- ``beyond_paper/``: what the paper does not have: ``fidelity`` (proxy fidelity and its audit), ``adaptive`` (an
  adaptive prune schedule).

The algorithm imports neither of the others; the machinery imports both. Around them, importing them and never
imported by them: ``digits`` (the 8x8 digits task), ``adapters`` (real diffusers pipelines), ``study`` (analysis,
plots, experiments, benchmark, results).
"""
from .algorithm.grpo import clipped_policy_loss, gaussian_kl, group_advantages, group_std, grpo_objective, step_log_prob
from .algorithm.ovf import ovf_select, select_subset
from .algorithm.pro_grpo import PRESETS, PruneSchedule, expand_and_prune
from .algorithm.rollout import NFECounter, Rollout, rollout, sample
from .algorithm.samplers import (DDIM, FlowCPS, FlowSDE, Sampler, SamplerStep, SDEStep, cps_step_with_logprob,
                                 ddim_step_with_logprob, flow_sigmas, sde_step_with_logprob)
from .algorithm.task import Task
from .beyond_paper.fidelity import record_previews
from .machinery.config import ARMS, TrainConfig, arm_config
from .machinery.trainer import train

__all__ = [
    "Sampler", "SamplerStep", "FlowSDE", "flow_sigmas", "SDEStep", "sde_step_with_logprob",
    "FlowCPS", "cps_step_with_logprob", "DDIM", "ddim_step_with_logprob",
    "NFECounter", "Rollout", "rollout", "sample", "ovf_select", "select_subset",
    "group_advantages", "group_std", "clipped_policy_loss", "gaussian_kl", "step_log_prob", "grpo_objective",
    "PruneSchedule", "PRESETS", "expand_and_prune", "record_previews",
    "Task", "TrainConfig", "ARMS", "arm_config", "train",
]
__version__ = "0.4.0"
