"""Samplers: one class per family, each owning its schedule, step, log-prob, preview and ODE mode.

``base`` defines the seam (``Sampler``, ``SamplerStep``); ``flow_sde`` is Flow-GRPO's SDE sampler for
rectified flows. The rollout, the objective and Expand-and-Prune take any ``Sampler``.
"""
from .base import Sampler, SamplerStep
from .flow_sde import FlowSDE, SDEStep, flow_sigmas, sde_step_with_logprob

__all__ = ["Sampler", "SamplerStep", "FlowSDE", "SDEStep", "flow_sigmas", "sde_step_with_logprob"]
