"""Samplers: one class per family, each owning its schedule, step, log-prob, preview and ODE mode.

``base`` defines the seam (``Sampler``, ``SamplerStep``); ``flow_sde`` is Flow-GRPO's SDE sampler for
rectified flows; ``flow_cps`` its Coefficients-Preserving Sampler; ``ddim`` is DDPO's stochastic DDIM sampler for diffusion models. The rollout, the objective and Expand-and-Prune take any ``Sampler``.
"""
from dataclasses import asdict

from .base import Sampler, SamplerStep
from .ddim import DDIM, ddim_step_with_logprob
from .flow_cps import FlowCPS, cps_step_with_logprob
from .flow_sde import FlowSDE, SDEStep, flow_sigmas, sde_step_with_logprob

FAMILIES = {"FlowSDE": FlowSDE, "DDIM": DDIM, "FlowCPS": FlowCPS}  # class name -> class, for configs read back from JSON


def sampler_to_dict(sampler: Sampler) -> dict:
    """``{"family": class name, **fields}``: JSON-able, for histories and checkpoints."""
    return {"family": type(sampler).__name__, **asdict(sampler)}


def sampler_from_dict(d: dict) -> Sampler:
    """The inverse of ``sampler_to_dict``."""
    d = dict(d)
    family = d.pop("family", None)
    if family not in FAMILIES:
        raise ValueError(f"sampler family {family!r} is unknown; known: {sorted(FAMILIES)}")
    return FAMILIES[family](**d)


__all__ = ["Sampler", "SamplerStep", "FlowSDE", "DDIM", "ddim_step_with_logprob", "FlowCPS", "cps_step_with_logprob", "SDEStep", "flow_sigmas", "sde_step_with_logprob",
           "sampler_to_dict", "sampler_from_dict", "FAMILIES"]
