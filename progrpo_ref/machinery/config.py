"""A run's configuration: ``TrainConfig`` (every field checked when it is built; the error names the value and
the rule) and the named arms of the study, so two runs differ in one field.

    arm          sampling                           trained on
    flow_grpo    G = 24                             all 24
    g12          G = 12                             all 12
    ovf          G = 24                             OVF 12 of the final rewards (static OVF)
    random       G = 24                             uniform random 12
    split, top   G = 24                             the 6 lowest + 6 highest / the 12 highest
    standard     48 -> 24 -> 12 pruned at (5, 7)    the 12 survivors (Pro-GRPO Standard)
    flash        24 -> 16 -> 12 pruned at (5, 7)    the 12 survivors (Pro-GRPO Flash)
    dance_grpo   G = 16, DDIM T = 20                all 16 (the diffusion baseline, SD-v1.4's shape)
    standard_sd14  48 -> 32 -> 8 at (12, 16), DDIM  the 8 survivors (Pro-GRPO on SD-v1.4, T = 50 -> 20)
    ovf_48       G = 48                             OVF 12 of the final rewards ("expand, then select": what pruning can keep at best)
    adaptive     48 -> 24 -> 12, prune points moved the 12 survivors, or OVF on final rewards where no call's previews
                 by an audit every 10 updates       are faithful enough (beyond_paper/adaptive.py)

The flow arms sample with ``FlowSDE``; the two diffusion arms with ``DDIM(20, eta=1)`` (DDPO's sampler)
on the default DDPM schedule, the one the digits' diffusion model was trained on.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields

import torch

from ..algorithm.ovf import STRATEGIES
from ..algorithm.pro_grpo import PRESETS, PruneSchedule
from ..algorithm.samplers import DDIM, FlowSDE, Sampler, sampler_from_dict, sampler_to_dict
from ..beyond_paper.adaptive import check_target

# fields added after checkpoints were first written, with the value that behaves as before they existed:
# a checkpoint without the field resumes when the field has that value
ADDED_FIELDS = {"audit_every": 0, "audit_prompts": 4, "adaptive": False, "fidelity_target": 0.5, "fidelity_z": 1.645}
# fields that may differ on resume: they change neither what is sampled nor what is trained (cluster_delta only
# changes a logged statistic)
RESUMABLE_CHANGES = ("num_updates", "progress", "checkpoint_path", "checkpoint_every", "device_batch", "device",
                     "cluster_delta")


@dataclass
class TrainConfig:
    """One GRPO run. Defaults: Flow-GRPO (G = 24, SDE a = 0.7, T = 10), sized for a laptop CPU."""

    arm: str = "flow_grpo"
    """a label for logs and plots"""
    schedule: PruneSchedule = field(default_factory=lambda: PRESETS["flow_grpo"])
    """group sizes and prune steps; a single size means plain GRPO sampling"""
    sampler: Sampler = field(default_factory=FlowSDE)
    """the stochastic sampler of the rollouts (its steps must equal the schedule's)"""
    prune_strategy: str = "ovf"
    """how Expand-and-Prune picks survivors from the preview rewards"""
    selection: str = "all"
    """static selection after the final reward: "all" or one of ovf, random, top, bottom, split"""
    select_k: int = 12
    """how many trajectories per prompt the static selection keeps"""
    num_updates: int = 60
    """rollout + optimisation rounds"""
    prompts_per_update: int = 4
    """P: prompts (drawn by the task) per rollout"""
    lr: float = 1e-4
    """Adam learning rate"""
    clip_range: float = 1e-3
    """PPO clip eps. Our log-probs average over 64 elements, SD3.5's at 512 px over 65,536; the
    per-element log-ratios are noise-driven and of random sign, so their average shrinks like
    1/sqrt(elements), and ours deviates from 0 about sqrt(1024) = 32x more than Flow-GRPO's for the same
    policy change: its 1e-4 corresponds to roughly 3e-3 here. 1e-3 was measured to let the second
    mini-batch learn (1e-4 clipped about 75% of it; 0.2 at a higher lr was unstable)"""
    adv_clip: float = 5.0
    """advantages are clipped to +-adv_clip (Flow-GRPO)"""
    adv_eps: float = 1e-4
    """eps in A = (R - mean) / (std + eps)"""
    global_std: bool = False
    """normalise advantages by one std over the whole batch instead of per group"""
    beta: float = 0.0
    """KL weight to the task's reference policy (exact per-step KL; see algorithm/grpo.py for the dt convention)"""
    num_minibatches: int = 2
    """optimizer steps per rollout; the first is on-policy (ratio 1), the clip acts from the second"""
    train_steps_fraction: float = 1.0
    """fraction of the T sampling steps trained on: the first int(fraction * T), as Flow-GRPO counts
    (its 0.99 trains 9 of 10, skipping the nearly noise-free last step)"""
    max_grad_norm: float = 1.0
    """gradient-norm clip"""
    device_batch: int = 0
    """at most this many trajectories per network or reward call in sampling and per forward/backward pass
    in the optimisation, per process (gradient accumulation: the mini-batches, the NFE and the gradient do
    not change); 0: no limit"""
    eval_every: int = 10
    """evaluate before the first update and after every eval_every updates (and at the end)"""
    audit_every: int = 0
    """every this many updates (0: never), before the update's sampling, audit the previews: finish an
    unpruned group of G_0 for ``audit_prompts`` prompts and measure at every call the preview-to-final
    Spearman, the OVF overlap and their standard errors (``fidelity.audit``). Never trained on; its own
    noise and prompts; its NFE, reward calls and seconds are logged apart (``audit`` in the history)"""
    audit_prompts: int = 4
    """prompts (groups) per audit: the standard errors shrink like 1 / sqrt(audit_prompts)"""
    adaptive: bool = False
    """after each audit, move the prune points by ``adaptive.decide`` (needs audit_every > 0, a pruned
    schedule and selection "all"); the placement is logged per update (``placement``)"""
    fidelity_target: float = 0.5
    """tau in [-1, 1]: the Spearman a call's previews must clear with their lower bound to be pruned on.
    0.5: the previews order a group at least halfway as the final rewards do (notebook 04 measured 0.51 and
    0.77 at the paper's calls 5 and 7 on the pretrained flow model)"""
    fidelity_z: float = 1.645
    """z of the one-sided bounds rho +- z se (1.645: 95%)"""
    cluster_delta: float = 0.5
    """delta of the clustering region |A| <= delta (logged per update)"""
    seed: int = 0
    """seed of prompts, noise and mini-batch order: each update's are a function of (seed, update)
    (see algorithm/noise.py); the task's evaluation has its own fixed seed"""
    device: str = "cpu"
    """torch device"""
    checkpoint_path: str | None = None
    """save policy, optimizer, RNG and history here (resume with train(config, task, resume=True))"""
    checkpoint_every: int = 0
    """also save every this many updates (0: only at the end)"""
    progress: bool = True
    """show a progress bar"""

    def __post_init__(self):
        if isinstance(self.schedule, dict):  # from a history's JSON
            self.schedule = PruneSchedule(**self.schedule)
        if isinstance(self.sampler, dict):
            self.sampler = sampler_from_dict(self.sampler)
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        if isinstance(self.checkpoint_path, os.PathLike):
            self.checkpoint_path = os.fspath(self.checkpoint_path)
        _validate(self)

    @property
    def trained_steps(self) -> int:
        """How many of the T steps are trained on: int(train_steps_fraction * T), at least 1."""
        return max(1, int(self.train_steps_fraction * self.schedule.num_steps))

    @property
    def trained_group_size(self) -> int:
        return self.schedule.final_size if self.selection == "all" else self.select_k

    def to_dict(self) -> dict:
        """JSON-able: the schedule as a dict, the sampler as its class name and fields;
        ``TrainConfig(**config.to_dict())`` rebuilds the config."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["schedule"] = asdict(self.schedule)
        d["sampler"] = sampler_to_dict(self.sampler)
        return d


def _validate(c: TrainConfig) -> None:
    """Every field against its rule; the error names the value and the rule."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    def integer(name, lo):
        v = getattr(c, name)
        need(isinstance(v, int) and not isinstance(v, bool) and v >= lo, f"{name}={v!r} must be an integer >= {lo}")

    def number(name, lo, hi=math.inf, lo_open=True):
        v = getattr(c, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and v <= hi
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi == math.inf else ']'}"
        need(ok, f"{name}={v!r} must be a finite number in {interval}")

    need(isinstance(c.arm, str) and c.arm, f"arm={c.arm!r} must be a non-empty label")
    need(isinstance(c.schedule, PruneSchedule), f"schedule={c.schedule!r} must be a PruneSchedule")
    need(isinstance(c.sampler, Sampler), f"sampler={c.sampler!r} must be a Sampler (e.g. FlowSDE())")
    need(c.sampler.stochastic, f"sampler={c.sampler!r} is deterministic: a trainable run needs a stochastic sampler "
                               f"(its steps need a log-probability), e.g. FlowSDE(noise_level=0.7)")
    need(c.sampler.num_steps == c.schedule.num_steps,
         f"the sampler has {c.sampler.num_steps} steps but the schedule {c.schedule.num_steps}")
    need(c.prune_strategy in STRATEGIES, f"prune_strategy={c.prune_strategy!r} must be one of {STRATEGIES}")
    need(c.selection == "all" or c.selection in STRATEGIES, f"selection={c.selection!r} must be 'all' or one of {STRATEGIES}")
    integer("select_k", 2)
    need(c.selection == "all" or c.select_k <= c.schedule.final_size,
         f"select_k={c.select_k} must be in [2, {c.schedule.final_size}] (the final group size)")
    integer("num_updates", 0)
    integer("prompts_per_update", 1)
    number("lr", 0, 1)
    number("clip_range", 0, 1)
    number("adv_clip", 0, math.inf)
    number("adv_eps", 0, 1)
    need(isinstance(c.global_std, bool), f"global_std={c.global_std!r} must be True or False")
    number("beta", 0, math.inf, lo_open=False)
    integer("num_minibatches", 1)
    trained = c.prompts_per_update * c.trained_group_size
    need(c.num_minibatches <= trained,
         f"num_minibatches={c.num_minibatches} must be <= the {trained} trajectories trained on per update")
    number("train_steps_fraction", 0, 1)
    need(c.trained_steps <= c.sampler.trainable_steps,
         f"train_steps_fraction={c.train_steps_fraction} trains on {c.trained_steps} steps but only the first "
         f"{c.sampler.trainable_steps} of {c.sampler!r} have a log-prob (e.g. 0.9 trains 9 of 10)")
    number("max_grad_norm", 0, math.inf)
    integer("device_batch", 0)
    integer("eval_every", 1)
    integer("audit_every", 0)
    integer("audit_prompts", 1)
    need(isinstance(c.adaptive, bool), f"adaptive={c.adaptive!r} must be True or False")
    check_target(c.fidelity_target, c.fidelity_z)
    need(not c.adaptive or (c.audit_every > 0 and c.audit_prompts >= 2 and c.schedule.prune_steps and c.selection == "all"),
         f"adaptive=True needs audit_every > 0 (got {c.audit_every}), audit_prompts >= 2 for a standard error (got "
         f"{c.audit_prompts}), a pruned schedule (got prune_steps={c.schedule.prune_steps}) and selection='all' "
         f"(got {c.selection!r})")
    number("cluster_delta", 0, math.inf)
    integer("seed", 0)
    try:
        torch.device(c.device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={c.device!r} is not a torch device ({e})") from None
    need(c.checkpoint_path is None or isinstance(c.checkpoint_path, str) and c.checkpoint_path,
         f"checkpoint_path={c.checkpoint_path!r} must be None or a path")
    need(isinstance(c.device, str), f"device={c.device!r} must be a device string such as 'cpu' or 'cuda:0'")
    integer("checkpoint_every", 0)
    need(isinstance(c.progress, bool), f"progress={c.progress!r} must be True or False")


ARMS = {
    "flow_grpo": dict(schedule=PRESETS["flow_grpo"]),
    "g12": dict(schedule=PruneSchedule((12,), (), 10)),
    "ovf": dict(schedule=PRESETS["flow_grpo"], selection="ovf", select_k=12),
    "random": dict(schedule=PRESETS["flow_grpo"], selection="random", select_k=12),
    "split": dict(schedule=PRESETS["flow_grpo"], selection="split", select_k=12),
    "top": dict(schedule=PRESETS["flow_grpo"], selection="top", select_k=12),
    "standard": dict(schedule=PRESETS["standard"]),
    "flash": dict(schedule=PRESETS["flash"]),
    "dance_grpo": dict(schedule=PRESETS["dance_grpo"], sampler=DDIM(20, eta=1.0)),
    "standard_sd14": dict(schedule=PRESETS["standard_sd14"], sampler=DDIM(20, eta=1.0)),
    "ovf_48": dict(schedule=PruneSchedule((48,), (), 10), selection="ovf", select_k=12),
    "adaptive": dict(schedule=PRESETS["standard"], audit_every=10, adaptive=True),
}


def arm_config(name: str, **overrides) -> TrainConfig:
    """The config of a named arm of the study (table in the module docstring), with overrides
    (``arm=`` relabels it)."""
    if name not in ARMS:
        raise ValueError(f"arm={name!r} must be one of {sorted(ARMS)}")
    return TrainConfig(**{"arm": name, **ARMS[name], **overrides})


def batch_arithmetic(config: TrainConfig, world: int) -> str:
    """The batch sizes of one update, as the trainer prints them at the start of a run."""
    s, P = config.schedule, config.prompts_per_update
    G0, K = s.group_sizes[0], config.trained_group_size
    per_rank = [P * G0 * (r + 1) // world - P * G0 * r // world for r in range(world)]
    mb = P * K / config.num_minibatches
    passes = (f"calls and passes of at most {config.device_batch} trajectories" if config.device_batch
              else "one pass per process")
    return (f"{P} prompts x G = {G0} = {P * G0} trajectories per update over {world} process(es) "
            f"({' / '.join(map(str, per_rank))} each); {P} x {K} = {P * K} trained, in {config.num_minibatches} "
            f"mini-batches of about {mb:.1f} (one global permutation; {passes}); "
            f"{s.nfe()} NFE per prompt, {config.trained_steps} of {s.num_steps} steps trained")
