"""Adapter: drive a diffusers ``SD3Transformer2DModel`` (e.g. SD3.5-Medium) through the method's seams.

The method calls ``model(x [B, C, H, W], sigma [B], prompts [B]) -> v``. For a real text-to-image
model, encode your prompts once (SD3's three text encoders give ``prompt_embeds`` ``[N, 333, 4096]`` and
``pooled_prompt_embeds`` ``[N, 2048]``) and let ``prompts`` be indices into them: ``SD3Adapter`` does
that and feeds the transformer timestep = sigma x 1000, as ``StableDiffusion3Pipeline`` does.
``autocast_dtype=torch.bfloat16`` runs the transformer under autocast; the sampler's math and
log-probs stay in fp32 (the samplers cast).

``SD3Task`` is a ``Task`` (``progrpo_ref.algorithm.task``) around such a transformer, so ``train(config, task)``
drives it: prompts are indices into the embeddings, the reward decodes latents with a VAE and scores
the pixels, the reference policy is a frozen copy of the initial transformer. What it does *not* give
you yet: real weights, real text encoders, classifier-free guidance, LoRA, a real image reward
(``DecodeAndScore`` is a stand-in with the real cost shape: a VAE decode plus a linear score).
``SD3Task.tiny()`` is the random configuration the tests train; ``SD3Task.sd35_medium()`` has
SD3.5-Medium's size for benchmarks (random weights, nothing downloaded).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from ..algorithm.noise import TrajectoryNoise
from ..algorithm.rollout import sample
from ..algorithm.samplers import Sampler

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (2.5B parameters)
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# its VAE (AutoencoderKL, 16 latent channels, 8x downsampling)
SD3_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
)
TEXT_TOKENS = 333  # 77 CLIP + 256 T5 tokens

# a random configuration small enough for CPU tests: 16-channel 8x8 latents, one joint block
TINY_TRANSFORMER = dict(num_layers=1, dual_attention_layers=(0,), num_attention_heads=2, attention_head_dim=16,
                        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=16,
                        sample_size=8, pos_embed_max_size=8)
TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


class SD3Adapter(nn.Module):
    """``v = transformer(x, prompt_embeds[prompts], pooled[prompts], timestep = sigma * 1000)``."""

    def __init__(self, transformer, prompt_embeds: torch.Tensor, pooled_prompt_embeds: torch.Tensor, autocast_dtype=None):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)  # [N, L, D]
        self.register_buffer("pooled_prompt_embeds", pooled_prompt_embeds, persistent=False)  # [N, Dp]
        self.autocast_dtype = autocast_dtype

    def forward(self, x, sigma, prompts):
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).expand(x.shape[0])
        ctx = torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ctx:
            v = self.transformer(hidden_states=x.to(self.transformer.dtype), encoder_hidden_states=self.prompt_embeds[prompts],
                                 pooled_projections=self.pooled_prompt_embeds[prompts], timestep=sigma * 1000.0,
                                 return_dict=False)[0]
        return v.float()


def random_sd35_medium(device="cpu", num_prompts: int = 10, autocast_dtype=None, seed: int = 0,
                       text_tokens: int = TEXT_TOKENS, **config_overrides) -> SD3Adapter:
    """SD3.5-Medium's transformer (or ``config_overrides`` of it), randomly initialised from ``seed``,
    with random prompt embeddings ``[num_prompts, text_tokens, D]``."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**SD35_MEDIUM, **config_overrides}).to(device)
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(num_prompts, text_tokens, cfg.joint_attention_dim, generator=g).to(device)
    pooled = torch.randn(num_prompts, cfg.pooled_projection_dim, generator=g).to(device)
    return SD3Adapter(transformer, embeds, pooled, autocast_dtype)


class DecodeAndScore:
    """A stand-in reward with the cost shape of the real one: VAE-decode the latent ``[B, 16, h, w]``
    to pixels ``[B, 3, 8h, 8w]`` with SD3's (random) VAE, then a fixed random linear score of the pooled
    pixels. For benchmarks and seam tests only: it measures cost, not quality."""

    name = "decode_and_score"

    def __init__(self, device="cpu", autocast_dtype=None, seed: int = 0, **vae_overrides):
        from diffusers import AutoencoderKL

        torch.manual_seed(seed)
        self.vae = AutoencoderKL(**{**SD3_VAE, **vae_overrides}).to(device).requires_grad_(False).eval()
        self.autocast_dtype = autocast_dtype
        self.weights = torch.randn(3 * 16 * 16, generator=torch.Generator().manual_seed(seed)).to(device)

    @torch.no_grad()
    def __call__(self, latents, prompts):
        cfg = self.vae.config
        ctx = torch.autocast(latents.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ctx:
            pixels = self.vae.decode(latents / cfg.scaling_factor + cfg.shift_factor, return_dict=False)[0]
        pooled = nn.functional.adaptive_avg_pool2d(pixels.float().clamp(-1, 1), 16).flatten(1)
        return pooled @ self.weights / pooled.shape[1]


@dataclass
class SD3Task:
    """A ``Task`` around a random-weight SD3 transformer with precomputed prompt embeddings."""

    transformer_overrides: dict = field(default_factory=dict)
    """SD3.5-Medium's transformer config, with these fields replaced"""
    vae_overrides: dict = field(default_factory=dict)
    """SD3's VAE config, with these fields replaced"""
    num_prompts: int = 10
    """N: prompts are indices 0..N-1 into random embeddings"""
    text_tokens: int = TEXT_TOKENS
    """L: tokens per prompt embedding"""
    bf16: bool = False
    """run the transformer and the VAE under bf16 autocast (sampler math stays fp32)"""
    eval_prompts: int = 4
    """prompts 0..eval_prompts-1 are evaluated with one fixed-seed deterministic sample each"""
    eval_seed: int = 1234
    """seed of the evaluation's noise"""
    seed: int = 0
    """seed of the random weights and embeddings"""
    _reward: object = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def tiny(cls, **kw) -> "SD3Task":
        """16-channel 8x8 latents, one joint block, a tiny VAE: trains on a CPU in seconds."""
        return cls(transformer_overrides=dict(TINY_TRANSFORMER), vae_overrides=dict(TINY_VAE), text_tokens=8, **kw)

    @classmethod
    def sd35_medium(cls, num_layers: int | None = None, **kw) -> "SD3Task":
        """SD3.5-Medium's size at 512 px (latents [16, 64, 64]); ``num_layers`` shrinks it for smoke tests."""
        over = {} if num_layers is None else dict(num_layers=num_layers, dual_attention_layers=tuple(range(min(num_layers, 13))))
        return cls(transformer_overrides=over, **kw)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        size = self.transformer_overrides.get("sample_size", 64)  # SD3.5 at 512 px: 64x64 latents
        return (self.transformer_overrides.get("in_channels", SD35_MEDIUM["in_channels"]), size, size)

    def describe(self) -> dict:
        return {"name": "sd3_random", **{f.name: getattr(self, f.name) for f in fields(self) if f.init}}

    def _dtype(self):
        return torch.bfloat16 if self.bf16 else None

    def sample_prompts(self, n, generator):
        return torch.randint(self.num_prompts, (n,), generator=generator)

    def policy(self, device="cpu"):
        return random_sd35_medium(device, self.num_prompts, self._dtype(), self.seed, self.text_tokens, **self.transformer_overrides)

    def reference(self, policy, device="cpu"):
        """A frozen copy of the initial transformer and embeddings, rebuilt from the seed."""
        return self.policy(device).requires_grad_(False)

    def reward(self, images, prompts):
        if self._reward is None:
            self._reward = DecodeAndScore(images.device, self._dtype(), self.seed, **self.vae_overrides)
        return self._reward(images, prompts)

    @torch.no_grad()
    def evaluate(self, policy, sampler: Sampler) -> dict:
        device = policy.prompt_embeds.device
        prompts = torch.arange(self.eval_prompts, device=device) % self.num_prompts
        images = sample(policy, sampler.deterministic(), prompts, TrajectoryNoise(self.eval_seed, stream="eval_ode"),
                        latent_shape=self.latent_shape)
        return {"eval_reward": self.reward(images, prompts).mean().item()}
