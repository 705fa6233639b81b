"""progrpo-ref: a reference implementation of Pro-GRPO (Expand and Prune).

The method (depends on torch, tqdm and safetensors only): ``samplers`` (the sampler seam; Flow-GRPO's
SDE and CPS samplers for flows, DDPO's DDIM sampler for diffusion models), ``rollout``, ``ovf`` (Optimal Variance Filtering), ``grpo`` (advantages and the
objective J), ``pro_grpo`` (Expand-and-Prune), ``task`` (the task seam), ``trainer``, ``checkpoint``.
Around it, importing it and never imported by it: ``digits`` (the 8x8 digits task), ``adapters``
(real diffusers models), ``study`` (analysis, plots, experiments, benchmark, results).
"""
from .grpo import clipped_policy_loss, gaussian_kl, group_advantages, grpo_objective, step_log_prob
from .ovf import ovf_select, select_subset
from .pro_grpo import PRESETS, PruneSchedule, expand_and_prune, record_previews
from .rollout import NFECounter, Rollout, rollout, sample
from .samplers import (DDIM, FlowCPS, FlowSDE, Sampler, SamplerStep, SDEStep, cps_step_with_logprob,
                       ddim_step_with_logprob, flow_sigmas, sde_step_with_logprob)
from .task import Task
from .trainer import ARMS, TrainConfig, arm_config, train

__all__ = [
    "Sampler", "SamplerStep", "FlowSDE", "flow_sigmas", "SDEStep", "sde_step_with_logprob",
    "FlowCPS", "cps_step_with_logprob", "DDIM", "ddim_step_with_logprob",
    "NFECounter", "Rollout", "rollout", "sample", "ovf_select", "select_subset",
    "group_advantages", "clipped_policy_loss", "gaussian_kl", "step_log_prob", "grpo_objective",
    "PruneSchedule", "PRESETS", "expand_and_prune", "record_previews",
    "Task", "TrainConfig", "ARMS", "arm_config", "train",
]
__version__ = "0.3.0"
