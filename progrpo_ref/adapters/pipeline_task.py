r"""A diffusers text-to-image pipeline as a ``Task``: ``train(config, SD3PipelineTask(pipe, prompts, reward))``.

What the trainer gets from a pipeline (see ``progrpo_ref.algorithm.task`` for the seam):

- prompts: the strings are encoded once, by the pipeline's own ``encode_prompt``, in chunks of
  ``encode_batch`` (and the negative prompt once, for guidance); the method passes integer ids into
  that table ``[N, ...]``, kept on the training device or, for a large prompt set, on the host
  (``embeddings_device="cpu"``: each network call moves only its rows);
- the policy: the pipeline's network wrapped as ``model(x, t, prompts)`` (``denoiser.py``), with
  classifier-free guidance (both branches in one call, counted as 2 NFE), optionally a LoRA adapter
  (``lora.py``: only its A, B are trainable; the reference is the same network with it disabled),
  bf16 (the frozen weights stored in bf16 and the network run under bf16 autocast; the sampler's
  math in fp32) and gradient checkpointing; a full fine-tune (``lora=None``) trains fp32 weights;
- the reward: latents (final samples and Expand-and-Prune's previews x0_hat) are decoded by the
  pipeline's VAE in micro-batches of ``decode_batch`` into RGB in [0, 1] and scored by
  ``reward_fn(images, prompt strings)`` (``image_rewards.py``); decodes, reward calls and their seconds
  are counted in ``costs`` (the trainer records them per update);
- the sampler: ``task.sampler(T)`` is the Flow-GRPO SDE on the pipeline scheduler's own sigma grid
  (SD3) or DDPO's DDIM on its betas (Stable Diffusion);
- the evaluation: fixed-seed deterministic samples (Euler ODE / DDIM eta = 0) of ``eval_prompts``,
  scored by the same reward; no selection step sees them.

The pipeline's network is modified in place (adapter added, weights cast): build the task on a
pipeline you use for training only.
"""
from __future__ import annotations

import copy
import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field

import torch

from ..algorithm.noise import TrajectoryNoise
from ..algorithm.rollout import sample
from ..algorithm.samplers import DDIM, FlowCPS, FlowSDE, Sampler
from .denoiser import Denoiser, SD3Denoiser, UNetDenoiser
from .lora import SD3_TARGETS, UNET_TARGETS, AdapterDisabled, LoRA, add_lora

COST_KEYS = ("vae_decodes", "reward_images", "decode_s", "reward_s")


@dataclass(eq=False)
class PipelineTask:
    """The shared part of ``SD3PipelineTask`` and ``SDPipelineTask`` (see the module docstring)."""

    pipeline: object
    """a diffusers pipeline (its network, VAE, text encoders and scheduler are used)"""
    prompts: list[str]
    """the training prompts; each update draws prompts_per_update of them uniformly"""
    reward_fn: object
    """reward_fn(images [B, 3, H, W] in [0, 1], prompts list[str]) -> [B] (image_rewards.py)"""
    guidance_scale: float = 1.0
    """classifier-free guidance w (1: none; Flow-GRPO samples SD3.5 with 4.5), in sampling, re-scoring and the KL"""
    negative_prompt: str = ""
    """the unconditional branch's prompt"""
    lora: LoRA | None = None
    """train a LoRA adapter (the reference: adapter disabled); None: train the whole network (reference: a frozen copy)"""
    bf16: bool = False
    """frozen weights in bf16 (with LoRA) and the network under bf16 autocast; sampler math in fp32"""
    gradient_checkpointing: bool = False
    """recompute the network's activations in the backward pass (less memory, about 1/3 more time)"""
    decode_batch: int = 8
    """VAE decodes and reward calls (and the evaluation's sampling) in micro-batches of at most this many images"""
    encode_batch: int = 64
    """prompts per ``encode_prompt`` call when the table is built"""
    embeddings_device: str | None = None
    """where the prompt table lives: None, the training device; "cpu" for a large prompt set"""
    offload_text_encoders: bool = False
    """move the text encoders to the CPU once the prompts are encoded (SD3.5's T5 is about 9.5 GB in bf16)"""
    resolution: int | None = None
    """image side in pixels; None: the pipeline's default (network sample_size x VAE factor)"""
    eval_prompts: list[str] | None = None
    """prompts of the evaluation (one fixed-seed deterministic sample each); None: the first 4 training prompts"""
    eval_seed: int = 1234
    """seed of the evaluation's noise"""
    costs: dict = field(default_factory=lambda: dict.fromkeys(COST_KEYS, 0), init=False, repr=False)
    """decodes, rewarded images and their seconds so far (counted, like Table 4's atomic operations)"""

    component = "network"  # the pipeline attribute holding the network: "transformer" or "unet"
    denoiser_class = Denoiser
    default_targets = ()  # LoRA target module suffixes when LoRA.target_modules is None

    def __post_init__(self):
        if isinstance(self.prompts, str) or not self.prompts or not all(isinstance(p, str) and p for p in self.prompts):
            raise ValueError(f"prompts must be a non-empty list of non-empty strings, got {self.prompts!r:.80}")
        self.prompts = list(self.prompts)
        self.eval_prompts = list(self.eval_prompts) if self.eval_prompts is not None else self.prompts[:4]
        if not self.eval_prompts or not all(isinstance(p, str) and p for p in self.eval_prompts):
            raise ValueError(f"eval_prompts must be a non-empty list of strings, got {self.eval_prompts!r:.80}")
        if not callable(self.reward_fn):
            raise ValueError(f"reward_fn must be callable (images, prompts) -> [B], got {type(self.reward_fn).__name__}")
        if not (isinstance(self.guidance_scale, (int, float)) and self.guidance_scale >= 1):
            raise ValueError(f"guidance_scale={self.guidance_scale!r} must be a number >= 1 (1: no guidance)")
        for name in ("decode_batch", "encode_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if self.lora is not None and not isinstance(self.lora, LoRA):
            raise ValueError(f"lora must be a LoRA(...) or None, got {type(self.lora).__name__}")
        if not hasattr(self.pipeline, self.component) or not hasattr(self.pipeline, "vae"):
            raise ValueError(f"{type(self).__name__} needs a pipeline with .{self.component} and .vae, "
                             f"got {type(self.pipeline).__name__}")
        factor = self.vae_factor * self.patch
        if self.resolution is None:
            self.resolution = int(self.network.config.sample_size) * self.vae_factor
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < factor or self.resolution % factor:
            raise ValueError(f"resolution={self.resolution!r} must be a positive multiple of {factor} "
                             f"(VAE factor {self.vae_factor} x patch {self.patch})")
        self._embeds = None  # (table, negative) on the host, in the text encoders' dtype
        self._weights_sha = _fingerprint(self.network)  # the starting weights, for describe()

    # ------------------------------------------------------------ what the subclasses say
    def encode(self, texts: list[str], device) -> dict:  # pragma: no cover - interface
        """``{name: [N, ...]}`` for ``texts``, through the pipeline's ``encode_prompt`` (conditional branch;
        the negative prompt is encoded the same way: encode_prompt treats both branches alike)."""
        raise NotImplementedError

    def to_vae_space(self, latents: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sampler(self, num_steps: int, **fields) -> Sampler:  # pragma: no cover - interface
        raise NotImplementedError

    def check_sampler(self, sampler: Sampler) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    # ------------------------------------------------------------ the Task seam
    @property
    def network(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.component)

    @property
    def vae_factor(self) -> int:
        return int(self.pipeline.vae_scale_factor)

    @property
    def patch(self) -> int:
        return int(getattr(self.network.config, "patch_size", None) or 1)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        side = self.resolution // self.vae_factor
        return (int(self.network.config.in_channels), side, side)

    def describe(self) -> dict:
        cfg = json.dumps({k: v for k, v in dict(self.network.config).items() if not k.startswith("_")}, sort_keys=True, default=str)
        return {"name": type(self).__name__, "network": type(self.network).__name__,
                "network_config_sha": hashlib.sha256(cfg.encode()).hexdigest()[:12], "network_weights_sha": self._weights_sha,
                "prompts": self.prompts, "eval_prompts": self.eval_prompts, "negative_prompt": self.negative_prompt,
                "reward": getattr(self.reward_fn, "name", type(self.reward_fn).__name__),
                "guidance_scale": self.guidance_scale, "lora": self.lora.to_dict() if self.lora else None,
                "bf16": self.bf16, "resolution": self.resolution, "decode_batch": self.decode_batch, "eval_seed": self.eval_seed}

    def sample_prompts(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(len(self.prompts), (n,), generator=generator)

    def policy(self, device="cpu") -> Denoiser:
        """The network wrapped as ``model(x, t, prompts)``, with a fresh LoRA adapter if configured
        (a second call replaces the adapter: every call starts from the same policy)."""
        net = self.network.to(device)
        net.eval()  # no dropout; gradients still flow
        if self.lora is not None:
            loaded = {p.dtype for name, p in net.named_parameters() if ".lora_" not in name}
            if not self.bf16 and loaded != {torch.float32}:
                raise ValueError(f"the network's weights are {sorted(map(str, loaded))} but bf16=False: pass bf16=True "
                                 f"(bf16 weights and autocast), or load the pipeline in float32")
            add_lora(net, self.lora, self.default_targets)
            if self.bf16:
                for p in net.parameters():
                    if not p.requires_grad:
                        p.data = p.data.to(torch.bfloat16)
        else:
            net.float().requires_grad_(True)  # a full fine-tune keeps fp32 weights for Adam (bf16: autocast only)
        if self.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        embeds, negative = self._encoded(device)
        return self.denoiser_class(net, embeds, negative, self.guidance_scale, torch.bfloat16 if self.bf16 else None)

    def reference(self, policy: Denoiser, device="cpu"):
        """With LoRA: the policy with its adapter disabled. Without: a frozen copy of the policy's network
        as it is now (``train`` asks for it before the first update, only when beta > 0; so a second
        ``train(model=policy)`` anchors the KL at the weights it starts from), sharing the prompt table."""
        if self.lora is not None:
            return AdapterDisabled(policy)
        frozen = copy.deepcopy(policy.net).requires_grad_(False).to(device)
        return type(policy)(frozen, policy.table, policy.negative, policy.guidance_scale, policy.autocast_dtype)

    def reward(self, latents: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Decode ``latents`` ``[B, C, h, w]`` with the VAE and score them with ``reward_fn`` -> ``[B]`` fp32."""
        texts = self.prompts + self.eval_prompts
        vae = self.pipeline.vae
        if next(vae.parameters()).device != latents.device:
            vae.to(latents.device)
        sync = (lambda: torch.cuda.synchronize(latents.device)) if latents.is_cuda else (lambda: None)
        out = []
        for start in range(0, len(latents), self.decode_batch):
            chunk, ids = latents[start:start + self.decode_batch], prompts[start:start + self.decode_batch].tolist()
            sync()
            t0 = time.perf_counter()
            images = self.decode(chunk)
            sync()
            t1 = time.perf_counter()
            r = torch.as_tensor(self.reward_fn(images, [texts[i] for i in ids]), dtype=torch.float32).flatten()
            sync()
            self.costs["decode_s"] += t1 - t0
            self.costs["reward_s"] += time.perf_counter() - t1
            self.costs["vae_decodes"] += len(chunk)
            self.costs["reward_images"] += len(chunk)
            if r.shape != (len(chunk),):
                raise ValueError(f"reward_fn returned shape {tuple(r.shape)} for {len(chunk)} images; expected [{len(chunk)}]")
            out.append(r.to(latents.device))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` -> RGB ``[B, 3, H, W]`` in [0, 1], fp32 (the pipeline's VAE, in its own
        dtype: Flow-GRPO keeps it in fp32 while the network runs in bf16)."""
        vae = self.pipeline.vae
        with torch.autocast(latents.device.type, enabled=False):
            pixels = vae.decode(self.to_vae_space(latents.float()).to(vae.dtype), return_dict=False)[0]
        return (pixels.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def evaluate(self, policy, sampler: Sampler) -> dict:
        """Mean reward of one deterministic sample per evaluation prompt; prompt j's noise is stream
        (eval_seed, "eval_ode", position j), whatever the micro-batching (``decode_batch``)."""
        device = next(policy.net.parameters()).device
        n = len(self.eval_prompts)
        ids = torch.arange(len(self.prompts), len(self.prompts) + n, device=device)
        images = sample(policy, sampler.deterministic(), ids, TrajectoryNoise(self.eval_seed, stream="eval_ode"),
                        latent_shape=self.latent_shape, max_batch=self.decode_batch)
        return {"eval_reward": self.reward(images, ids).mean().item()}

    def _encoded(self, device):
        """The table of prompts + eval_prompts (ids 0..N-1, then the evaluation's) and the negative row,
        encoded once in chunks of ``encode_batch``, moved to ``embeddings_device`` (default ``device``)."""
        if self._embeds is None:
            text_device, chunks = self._text_device(), []
            texts = self.prompts + self.eval_prompts
            with torch.no_grad():
                for start in range(0, len(texts), self.encode_batch):
                    chunks.append({k: v.cpu() for k, v in self.encode(texts[start:start + self.encode_batch], text_device).items()})
                negative = {k: v.cpu() for k, v in self.encode([self.negative_prompt], text_device).items()}
            self._embeds = ({k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}, negative)
            if self.offload_text_encoders:
                for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
                    if getattr(self.pipeline, name, None) is not None:
                        getattr(self.pipeline, name).to("cpu")
        table, negative = self._embeds
        where = self.embeddings_device or device
        return {k: v.to(where) for k, v in table.items()}, ({k: v.to(where) for k, v in negative.items()}
                                                            if self.guidance_scale > 1 else None)

    def _text_device(self):
        encoder = getattr(self.pipeline, "text_encoder", None)
        return next(encoder.parameters()).device if encoder is not None else torch.device("cpu")


@dataclass(eq=False)
class SD3PipelineTask(PipelineTask):
    """A ``StableDiffusion3Pipeline`` (SD3 / SD3.5, rectified flow) trained with Flow-GRPO's SDE sampler."""

    max_sequence_length: int = 256
    """T5 tokens per prompt (the pipeline's default; Flow-GRPO uses 128)"""

    component = "transformer"
    denoiser_class = SD3Denoiser
    default_targets = SD3_TARGETS

    def encode(self, texts, device):
        pe, _, pooled, _ = self.pipeline.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None, device=device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": pe, "pooled_prompt_embeds": pooled}

    def to_vae_space(self, latents):
        cfg = self.pipeline.vae.config
        return latents / cfg.scaling_factor + cfg.shift_factor

    def sampler(self, num_steps: int = 10, cps: bool = False, **fields) -> Sampler:
        """``FlowSDE`` (or ``FlowCPS``) on the sigmas this pipeline's scheduler samples with."""
        return (FlowCPS if cps else FlowSDE).from_scheduler(self.pipeline.scheduler, num_steps, **fields)

    def check_sampler(self, sampler):
        if not isinstance(sampler, (FlowSDE, FlowCPS)):
            raise ValueError(f"{type(self.network).__name__} is a rectified flow: it needs FlowSDE or FlowCPS "
                             f"(task.sampler(T)), got {type(sampler).__name__}")
        ours = self.sampler(sampler.num_steps).sigmas
        if not torch.allclose(sampler.sigmas, ours, atol=1e-6):
            warnings.warn(f"{sampler!r} does not sample on the pipeline scheduler's sigmas "
                          f"({', '.join(f'{s:.3f}' for s in ours.tolist())}); task.sampler(T) does", stacklevel=3)

    def describe(self) -> dict:
        return {**super().describe(), "max_sequence_length": self.max_sequence_length}


@dataclass(eq=False)
class SDPipelineTask(PipelineTask):
    """A ``StableDiffusionPipeline`` (SD v1/v2, a noise-predicting UNet) trained with DDPO's DDIM sampler."""

    component = "unet"
    denoiser_class = UNetDenoiser
    default_targets = UNET_TARGETS

    def encode(self, texts, device):
        return {"prompt_embeds": self.pipeline.encode_prompt(texts, device, 1, False)[0]}

    def to_vae_space(self, latents):
        return latents / self.pipeline.vae.config.scaling_factor

    def sampler(self, num_steps: int = 20, eta: float = 1.0) -> DDIM:
        """DDIM with eta on the betas, prediction type and timestep spacing of this pipeline's scheduler:
        SD-v1's config walks the "leading" timesteps 981, 961, ..., 1 in 50 steps, as DDPO and DanceGRPO do."""
        return DDIM.from_scheduler_config(dict(self.pipeline.scheduler.config), num_steps, eta, follow_spacing=True)

    def check_sampler(self, sampler):
        if not isinstance(sampler, DDIM):
            raise ValueError(f"{type(self.network).__name__} predicts noise: it needs DDIM (task.sampler(T)), "
                             f"got {type(sampler).__name__}")
        ours = self.sampler(sampler.num_steps, sampler.eta)
        if (ours.prediction_type != sampler.prediction_type or ours.alphas_cumprod.shape != sampler.alphas_cumprod.shape
                or not torch.allclose(ours.alphas_cumprod, sampler.alphas_cumprod)):
            raise ValueError(f"{sampler!r} does not match the pipeline's scheduler (betas or prediction type); "
                             f"use task.sampler({sampler.num_steps}, eta={sampler.eta})")
        if not torch.equal(ours.timesteps, sampler.timesteps):
            warnings.warn(f"{sampler!r} does not walk the pipeline scheduler's timesteps "
                          f"({ours.spacing}: {ours.timesteps[0].item()}, ..., {ours.timesteps[-1].item()}); "
                          f"task.sampler(T) does", stacklevel=3)


def _fingerprint(net: torch.nn.Module) -> str:
    """A short hash of the network's starting weights, so that a resume on other base weights with the same
    config is refused: shapes, float64 sums and first values of 16 parameters spread over the network (on the
    host; the dtype the pipeline was loaded in counts too)."""
    params = list(net.named_parameters())
    parts = []
    with torch.no_grad():
        for name, p in params[::max(1, -(-len(params) // 16))]:
            t = p.detach().cpu()
            parts.append(f"{name}:{tuple(t.shape)}:{t.dtype}:{t.double().sum().item():.10e}:{t.flatten()[:4].tolist()}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]
