"""The scenes task: the method's ``Task`` for the text-to-image flow model on compositional scenes.

Prompts are ids into ``grammar.PROMPTS``, drawn from the training prompts with the six categories weighted alike
(a category uniformly, then one of its prompts). The policy is the committed pretrained ``SceneModel`` (or one built
from ``model_config`` with random weights, for tests), sampled by ``FlowSDE`` or ``FlowCPS`` in the autoencoder's
latent space; the KL reference a frozen copy of it. Rewards see pixels: the frozen autoencoder decodes final latents
and previews first, as SD3's VAE does before any reward. The training reward (``reward_name``) is the checker's
GenEval score ("geneval": partial credit, in [0, 1] for a scene with the right objects; a count far off can make it
negative, as GenEval's does) or the learned attribute model's prompt log-likelihood ("attributes", smooth, <= 0).

The evaluation never sees a selection step: fixed-seed ODE samples of fixed prompts, ``eval_per_category`` of each
category among the training prompts and among the held-out ones (combinations never seen in pretraining or GRPO),
``eval_per_prompt`` samples each; the checker's strict accuracy and score per category and overall, and the learned
reward's independently trained twin on the same samples (``eval_twin``, ``eval_heldout_twin``: the out-of-domain
reward, which no training step sees; with the committed models only); and one fresh, unselected SDE group of
``eval_group`` per training category's first prompt, for the training reward's spread and clustering.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import torch

from ..algorithm.grpo import group_advantages, group_std
from ..algorithm.noise import TrajectoryNoise
from ..algorithm.rollout import rollout, sample
from ..algorithm.samplers import FlowCPS, FlowSDE, Sampler
from .checker import geneval_scores
from .grammar import CATEGORIES, HELD_OUT, SPECS, TRAIN
from .attributes import load_attribute_reward
from .autoencoder import AUTOENCODER_CHECKPOINT, AutoencoderConfig, SceneAutoencoder
from .model import CHECKPOINT, SceneModel, SceneModelConfig, check_prompt_ids

TRAIN_BY_CATEGORY = {c: [i for i in TRAIN if SPECS[i].category == c] for c in CATEGORIES}
HELD_OUT_BY_CATEGORY = {c: [i for i in HELD_OUT if SPECS[i].category == c] for c in CATEGORIES}


def fixed_prompts(per_category: int, seed: int, held_out: bool) -> dict[str, list[int]]:
    """``per_category`` prompt ids of each category (that has any), drawn once with ``seed``."""
    g = torch.Generator().manual_seed(seed + held_out)
    pools = HELD_OUT_BY_CATEGORY if held_out else TRAIN_BY_CATEGORY
    return {c: [ids[k] for k in torch.randperm(len(ids), generator=g)[:per_category].tolist()]
            for c, ids in pools.items() if ids}


@dataclass
class ScenesTask:
    """Compositional scene prompts, the scenes' flow model as policy, the GenEval-style checker as reward."""

    eval_per_category: int = 8
    """fixed prompts per category in the evaluation (training and held-out prompts each)"""
    eval_per_prompt: int = 2
    """fixed-seed ODE samples per evaluation prompt"""
    eval_group: int = 24
    """size of the fresh, unselected SDE group per training category in the evaluation"""
    eval_seed: int = 1234
    """seed of the evaluation's prompts and noise: the same for every arm and run"""
    cluster_delta: float = 0.5
    """delta of the clustering region |A| <= delta in the evaluation's fresh groups"""
    adv_eps: float = 1e-4
    """eps of the advantages in the evaluation's clustering fraction"""
    reward_name: str = "geneval"
    """the training reward: "geneval" (the checker's score) or "attributes" (the learned reward)"""
    guidance_scale: float = 1.0
    """classifier-free guidance of the policy (and its reference) in sampling and training; 1: none"""
    model_config: dict | None = None
    """None: the committed pretrained model; else a ``SceneModelConfig``'s fields, random weights (tests)"""
    costs: dict = field(default_factory=lambda: {"reward_images": 0.0}, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name, lo in (("eval_per_category", 1), ("eval_per_prompt", 1), ("eval_group", 2), ("eval_seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}={v!r} must be an integer >= {lo}")
        if self.reward_name not in ("geneval", "attributes"):
            raise ValueError(f"reward_name={self.reward_name!r} must be 'geneval' or 'attributes'")
        if not (isinstance(self.guidance_scale, (int, float)) and math.isfinite(self.guidance_scale)
                and self.guidance_scale >= 1):
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be a finite number >= 1 (1: no guidance)")
        for name in ("cluster_delta", "adv_eps"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}={v!r} must be a finite number > 0")
        if self.model_config is not None:  # random weights, the same every time, the global RNG untouched
            config = SceneModelConfig(**self.model_config)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                self.autoencoder = SceneAutoencoder(AutoencoderConfig(4 * config.latent_size, config.latent_channels,
                                                                      8)).eval()
            self.twin = None
        else:
            config = _committed_config()
            self.autoencoder = load_autoencoder()
            self.twin = load_attribute_reward("heldout")
        self.attributes = load_attribute_reward("reward") if self.reward_name == "attributes" else None
        self.autoencoder.requires_grad_(False)
        self.latent_shape = (config.latent_channels, config.latent_size, config.latent_size)
        if self.autoencoder.latent_shape != self.latent_shape:
            raise ValueError(f"the flow model's latents {self.latent_shape} are not the autoencoder's "
                             f"{self.autoencoder.latent_shape}; regenerate both with `{REGENERATE}`")

    def describe(self) -> dict:
        return {"name": "scenes", **{f.name: getattr(self, f.name) for f in fields(self) if f.init}}

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        cats = [c for c, ids in TRAIN_BY_CATEGORY.items() if ids]
        pick = torch.randint(len(cats), (n,), generator=generator).tolist()
        return torch.tensor([TRAIN_BY_CATEGORY[cats[c]][int(torch.randint(len(TRAIN_BY_CATEGORY[cats[c]]), (),
                                                                             generator=generator))] for c in pick])

    def policy(self, device="cpu") -> torch.nn.Module:
        if self.model_config is not None:
            with torch.random.fork_rng(devices=[]):  # the same random weights every time, the global RNG untouched
                torch.manual_seed(0)
                model = SceneModel(SceneModelConfig(**self.model_config)).to(device)
        else:
            model = load_scene_model(device=device)
        model.guidance_scale = float(self.guidance_scale)
        return model

    def reference(self, policy, device="cpu"):
        """A frozen copy of the starting policy (the pretrained model, not ``policy``, which may be trained)."""
        return self.policy(device).requires_grad_(False)

    def check_sampler(self, sampler: Sampler) -> None:
        if not isinstance(sampler, (FlowSDE, FlowCPS)):
            raise ValueError(f"the scenes' flow model needs FlowSDE or FlowCPS, got {sampler!r}")

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoded pixels ``[B, 3, 24, 24]`` in [-1, 1] (on the CPU) of latents ``[B, C, 6, 6]``."""
        return self.autoencoder.decode(latents.detach().float().cpu()).clamp(-1, 1)

    def reward(self, latents: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        check_prompt_ids(prompts)
        self.costs["reward_images"] += len(latents)
        images = self.images(latents)
        if self.attributes is not None:
            return self.attributes(images, prompts.cpu()).to(latents.device)
        return geneval_scores(images, prompts.cpu())[0].to(latents.device)

    @torch.no_grad()
    def evaluate(self, policy, sampler: Sampler) -> dict:
        self.check_sampler(sampler)
        dev = next(policy.parameters()).device
        out, k = {}, 0
        for held_out in (False, True):
            prefix = "eval_heldout_" if held_out else "eval_"
            strict_all, score_all, twin_all = [], [], []
            for cat, ids in fixed_prompts(self.eval_per_category, self.eval_seed, held_out).items():
                p = torch.tensor(ids, device=dev).repeat_interleave(self.eval_per_prompt)
                latents = sample(policy, sampler.deterministic(), p,
                                 TrajectoryNoise(self.eval_seed + k, stream="eval_ode"), latent_shape=self.latent_shape)
                k += 1
                images = self.images(latents)
                score, strict = geneval_scores(images, p.cpu())
                if self.twin is not None:
                    twin_all.append(self.twin(images, p.cpu()))
                out[f"{prefix}accuracy_{cat}"] = strict.float().mean().item()
                strict_all.append(strict.float())
                score_all.append(score)
            out[f"{prefix}accuracy"] = torch.cat(strict_all).mean().item()
            out[f"{prefix}score"] = torch.cat(score_all).mean().item()
            if twin_all:
                out[f"{prefix}twin"] = torch.cat(twin_all).mean().item()
        firsts = torch.tensor([ids[0] for ids in fixed_prompts(1, self.eval_seed, False).values()], device=dev)
        fresh = rollout(policy, sampler, firsts, self.eval_group, TrajectoryNoise(self.eval_seed, stream="eval_group"),
                        latent_shape=self.latent_shape)
        R = fresh.final_rewards(self.reward)
        A = group_advantages(R, self.adv_eps, clip=math.inf)
        out["fresh_reward_mean"] = R.mean().item()
        out["fresh_reward_std"] = group_std(R).mean().item()
        out["fresh_cluster_frac"] = (A.abs() <= self.cluster_delta).float().mean().item()
        out["fresh_zero_std_frac"] = (group_std(R) == 0).float().mean().item()
        return out


def _committed_config() -> SceneModelConfig:
    import json

    from ..digits.serialization import checkpoint_metadata

    if not CHECKPOINT.is_file():
        return SceneModelConfig()
    return SceneModelConfig(**json.loads(checkpoint_metadata(CHECKPOINT)["config"]))


REGENERATE = "python -m progrpo_ref.scenes.pretrain"


def load_scene_model(path=None, device="cpu") -> SceneModel:
    """The committed pretrained scene model (EMA weights), in eval mode on ``device``."""
    from ..digits.serialization import load_module

    return load_module(SceneModel, SceneModelConfig, path or CHECKPOINT, device, REGENERATE)


def load_autoencoder(path=None, device="cpu") -> SceneAutoencoder:
    """The committed scenes autoencoder (EMA weights, latents normalised), in eval mode on ``device``."""
    from ..digits.serialization import load_module

    return load_module(SceneAutoencoder, AutoencoderConfig, path or AUTOENCODER_CHECKPOINT, device, REGENERATE)
