"""The digits task: the method's ``Task`` for the small class-conditional models on 8x8 digits.

Prompts are digit classes 0-9 (drawn uniformly); the policy is a committed pretrained model, the flow
model (``model="flow"``, sampled by ``FlowSDE`` or ``FlowCPS``) or the diffusion model
(``model="diffusion"``, sampled by ``DDIM`` on its own training schedule), and the KL reference a
frozen copy of it; the training reward is one of ``rewards.REWARDS`` (the
logit margin by default). The evaluation never sees a selection step: ``eval_per_class``
fixed-seed samples of the sampler's deterministic (ODE) mode per digit, scored with the training
reward, the margin (whose sign gives the accuracy) and ``eval_rewards``; and one fresh, unselected
group of ``eval_group`` SDE samples per digit, for the reward spread and clustering. The same
``eval_seed`` for every arm and run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from ..algorithm.grpo import group_advantages, group_std
from ..algorithm.noise import TrajectoryNoise
from ..algorithm.rollout import rollout, sample
from ..algorithm.samplers import DDIM, FlowCPS, FlowSDE, Sampler
from .data import IMAGE_SHAPE, NUM_CLASSES
from .rewards import REWARDS, get_reward


@dataclass
class DigitsTask:
    """Digits 0-9 as prompts, the flow or the diffusion model as policy, classifier rewards."""

    model: str = "flow"
    """the pretrained policy: "flow" (tiny SD3 transformer) or "diffusion" (small UNet, DDPM)"""
    reward_name: str = "margin"
    """the training reward (also scores previews); one of rewards.REWARDS"""
    eval_per_class: int = 4
    """fixed-seed deterministic samples per digit in the evaluation"""
    eval_group: int = 24
    """size of the fresh, unselected SDE group per digit in the evaluation"""
    eval_rewards: tuple[str, ...] = ("margin_heldout",)
    """extra (out-of-domain) rewards scored on the evaluation's deterministic samples"""
    eval_seed: int = 1234
    """seed of the evaluation's noise: the same for every arm and run"""
    cluster_delta: float = 0.5
    """delta of the clustering region |A| <= delta in the evaluation's fresh groups"""
    adv_eps: float = 1e-4
    """eps of the advantages in the evaluation's clustering fraction"""
    _rewards: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    latent_shape = IMAGE_SHAPE  # [1, 8, 8]

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r} must be one of {sorted(MODELS)}")
        self.eval_rewards = tuple(self.eval_rewards)
        for name in (self.reward_name, *self.eval_rewards):
            if name not in REWARDS:
                raise ValueError(f"reward {name!r} is unknown; choose one of {sorted(REWARDS)}")
        for name, lo in (("eval_per_class", 1), ("eval_group", 2), ("eval_seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}={v!r} must be an integer >= {lo}")
        for name in ("cluster_delta", "adv_eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a finite number > 0")

    def describe(self) -> dict:
        """The task's settings, for histories and resume checks. ``model`` is listed only when it is not the
        flow model, so histories and checkpoints written before the diffusion model existed still match."""
        d = {"name": "digits", **{f.name: getattr(self, f.name) for f in fields(self) if f.init}}
        if d["model"] == "flow":
            del d["model"]
        return d

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(NUM_CLASSES, (n,), generator=generator)

    def policy(self, device="cpu") -> torch.nn.Module:
        return MODELS[self.model]()(device=device)

    def reference(self, policy, device="cpu"):
        """A frozen copy of the pretrained model (not of ``policy``, which may already be trained)."""
        return MODELS[self.model]()(device=device).requires_grad_(False)

    def check_sampler(self, sampler: Sampler) -> None:
        """Refuse a sampler that does not fit the model: the flow model needs a flow sampler, the
        diffusion model the DDIM sampler of its own training schedule."""
        if self.model == "flow" and not isinstance(sampler, (FlowSDE, FlowCPS)):
            raise ValueError(f"the flow model needs FlowSDE or FlowCPS, got {sampler!r}")
        if self.model == "diffusion":
            from .diffusion_model import DiffusionModelConfig

            want = DDIM.from_scheduler_config(DiffusionModelConfig().scheduler_config(), sampler.num_steps)
            if not isinstance(sampler, DDIM) or any(getattr(sampler, k) != getattr(want, k) for k in SCHEDULE_KEYS):
                raise ValueError(f"the diffusion model needs DDIM on its training schedule "
                                 f"({', '.join(f'{k}={getattr(want, k)!r}' for k in SCHEDULE_KEYS)}), got {sampler!r}")

    def scorer(self, name: str, device) -> callable:
        key = (name, str(device))
        if key not in self._rewards:
            self._rewards[key] = get_reward(name, device)
        return self._rewards[key]

    def reward(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return self.scorer(self.reward_name, images.device)(images, prompts)

    @torch.no_grad()
    def evaluate(self, policy, sampler: Sampler) -> dict:
        self.check_sampler(sampler)
        dev = _device(policy)
        prompts = torch.arange(NUM_CLASSES, device=dev).repeat_interleave(self.eval_per_class)
        images = sample(policy, sampler.deterministic(), prompts, TrajectoryNoise(self.eval_seed, stream="eval_ode"),
                        latent_shape=self.latent_shape)
        names = dict.fromkeys([self.reward_name, "margin", *self.eval_rewards])  # the margin gives the accuracy
        scores = {name: self.scorer(name, dev)(images, prompts) for name in names}
        out = {f"eval_{name}": r.mean().item() for name, r in scores.items()}
        out["eval_accuracy"] = (scores["margin"] > 0).float().mean().item()  # the top class is the requested digit
        n = self.eval_per_class
        per_prompt = images.view(NUM_CLASSES, n, -1)
        out["eval_diversity"] = torch.cdist(per_prompt, per_prompt).sum().item() / (NUM_CLASSES * n * max(n - 1, 1))
        fresh = rollout(policy, sampler, torch.arange(NUM_CLASSES, device=dev), self.eval_group,
                        TrajectoryNoise(self.eval_seed, stream="eval_group"), latent_shape=self.latent_shape)
        R = fresh.final_rewards(self.reward)
        A = group_advantages(R, self.adv_eps, clip=math.inf)
        out["fresh_reward_mean"] = R.mean().item()
        out["fresh_reward_std"] = group_std(R).mean().item()
        out["fresh_cluster_frac"] = (A.abs() <= self.cluster_delta).float().mean().item()
        return out


def _load_flow():
    from .model import load_flow_model

    return load_flow_model


def _load_diffusion():
    from .diffusion_model import load_diffusion_model

    return load_diffusion_model


MODELS = {"flow": _load_flow, "diffusion": _load_diffusion}  # name -> () -> loader(device=...)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def _device(model) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")
