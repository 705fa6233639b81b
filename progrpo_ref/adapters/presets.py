r"""The paper's real-model settings as ``TrainConfig``s for a pipeline task.

``sd35_config(task, arm)``: SD3.5-Medium with Flow-GRPO's sampling (the pipeline scheduler's grid,
shift 3, T = 10, SDE noise level 0.7, the first 9 steps trained) and the arm's funnel:
``flow_grpo`` (24), ``standard`` (48 -> 24 -> 12 at calls 5, 7) or ``flash`` (24 -> 16 -> 12).
``sd14_config(task, arm)``: Stable Diffusion v1.4 with DanceGRPO's sampling (DDIM, eta 1, T = 50; on
the pipeline scheduler's timesteps: SD-v1's leading 981, 961, ..., 1):
``dance_grpo`` (16) or ``standard_sd14`` (48 -> 32 -> 8 at calls 30, 40, the paper's SD-v1.4 setting).

Flow-GRPO's other SD3.5 values carry over as they are, because its log-prob is also averaged over the
latent's elements: clip range 1e-4, lr 3e-4 for LoRA (r = 32, alpha = 64), global std. A task without
LoRA (a full fine-tune) gets DanceGRPO's full-fine-tuning lr 1e-5 instead, in both presets. The
device defaults to where the pipeline's network already is. Flow-GRPO's KL weight does not carry over: our per-step KL is Flow-GRPO's divided by -dt (``algorithm/grpo.py``), and on the shifted grid
-dt runs from 0.04 to 0.27 (mean 0.11 over the 9 trained steps), so its PickScore beta 0.01 is about
0.001 here. Every field can be overridden.
"""
from __future__ import annotations

from ..algorithm.pro_grpo import PRESETS, PruneSchedule
from ..algorithm.samplers import Sampler
from ..machinery.config import TrainConfig

SD35_ARMS = ("flow_grpo", "standard", "flash")
SD14_SCHEDULES = {"dance_grpo": PruneSchedule((16,), (), 50), "standard_sd14": PruneSchedule((48, 32, 8), (30, 40), 50)}


def sd35_config(task, arm: str = "standard", verbose: bool = True, **overrides) -> TrainConfig:
    """Flow-GRPO's SD3.5-Medium setting with the ``arm``'s schedule for an ``SD3PipelineTask``."""
    if arm not in SD35_ARMS:
        raise ValueError(f"arm={arm!r}: the SD3.5 arms are {SD35_ARMS}")
    fields = dict(arm=arm, schedule=PRESETS[arm], sampler=task.sampler(10, noise_level=0.7), train_steps_fraction=0.9,
                  clip_range=1e-4, lr=_lr(task), global_std=True, beta=0.001, device=_device(task))
    return _report(TrainConfig(**{**fields, **overrides}), verbose)


def sd14_config(task, arm: str = "standard_sd14", verbose: bool = True, **overrides) -> TrainConfig:
    """DanceGRPO's SD-v1.4 setting (DDIM eta 1, 50 steps, clip 1e-4) with the ``arm``'s schedule for an ``SDPipelineTask``."""
    if arm not in SD14_SCHEDULES:
        raise ValueError(f"arm={arm!r}: the SD-v1.4 arms are {tuple(SD14_SCHEDULES)}")
    schedule = SD14_SCHEDULES[arm]
    fields = dict(arm=arm, schedule=schedule, sampler=task.sampler(schedule.num_steps, eta=1.0), clip_range=1e-4,
                  lr=_lr(task), device=_device(task))
    return _report(TrainConfig(**{**fields, **overrides}), verbose)


def _lr(task) -> float:
    return 3e-4 if task.lora is not None else 1e-5  # Flow-GRPO's LoRA lr; DanceGRPO's full fine-tune


def _device(task) -> str:
    return str(next(task.network.parameters()).device)


def _report(config: TrainConfig, verbose: bool) -> TrainConfig:
    s = config.schedule
    unit = "sigma" if hasattr(config.sampler, "sigmas") else "timestep"
    where = ", ".join(f"call {c} ({unit} {t:.3f})" if unit == "sigma" else f"call {c} ({unit} {t:.0f})"
                      for c, t in preview_times(s, config.sampler))
    if verbose:
        print(f"{config.arm}: {' -> '.join(map(str, s.group_sizes))} over {s.num_steps} steps, "
              f"{config.trained_steps} trained; previews at {where or 'none (nothing pruned)'}")
    return config


def preview_times(schedule: PruneSchedule, sampler: Sampler) -> list[tuple[int, float]]:
    """``[(c, model_time(c - 1))]`` per prune point: the c-th network call is evaluated at the sampler's model time
    c - 1, so that is where the preview is taken (a sigma for a flow, a timestep for DDIM). SD3.5-Medium's grid
    (shift 3): sigma 0.790 and 0.602 at calls 5 and 7; the uniform toy grid: 0.6, 0.4."""
    if schedule.num_steps != sampler.num_steps:
        raise ValueError(f"the schedule has {schedule.num_steps} steps but the sampler {sampler.num_steps}")
    return [(c, float(sampler.model_time(c - 1))) for c in schedule.prune_steps]
