"""Adapter: drive a diffusers ``SD3Transformer2DModel`` (e.g. SD3.5-Medium) through the core's interface.

The core calls ``model(x [B, C, H, W], sigma [B], prompts [B]) -> v``. For a real text-to-image
model, encode your prompts once (SD3's three text encoders give ``prompt_embeds`` ``[N, 333, 4096]`` and
``pooled_prompt_embeds`` ``[N, 2048]``) and let ``prompts`` be indices into them: the rollout, the
SDE step, OVF, the GRPO loss and Expand-and-Prune then run unchanged. ``autocast_dtype=torch.bfloat16``
runs the transformer under autocast; the SDE math and log-probs stay in fp32 (``sde.py`` casts).

``random_sd35_medium`` builds SD3.5-Medium's transformer from its configuration with random weights
(no download), for benchmarks that need a realistic model size rather than real images.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

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


def random_sd35_medium(device="cpu", num_prompts: int = 10, autocast_dtype=None, seed: int = 0, **config_overrides) -> SD3Adapter:
    """SD3.5-Medium's transformer, randomly initialised, with random prompt embeddings."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(**{**SD35_MEDIUM, **config_overrides}).to(device)
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(num_prompts, TEXT_TOKENS, cfg.joint_attention_dim, generator=g).to(device)
    pooled = torch.randn(num_prompts, cfg.pooled_projection_dim, generator=g).to(device)
    return SD3Adapter(transformer, embeds, pooled, autocast_dtype)


class DecodeAndScore:
    """A stand-in reward with the cost shape of the real one: VAE-decode the latent ``[B, 16, h, w]``
    to pixels ``[B, 3, 8h, 8w]`` with SD3's (random) VAE, then a fixed random linear score of the pooled
    pixels. For benchmarks only: it measures cost, not quality."""

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
