"""The small flow model: a class-conditional rectified flow on diffusers' ``SD3Transformer2DModel``.

Convention (diffusers, SD3): ``x_sigma = (1 - sigma) * x0 + sigma * eps``; sigma = 1 is noise, 0 is
data; the network predicts the velocity ``v = eps - x0``. The "prompt" is a digit class c in 0-9;
a small learned prompt encoder turns it into the transformer's ``encoder_hidden_states``
``[B, L, joint_dim]`` and ``pooled_projections`` ``[B, pooled_dim]``, the way SD3's text encoders
do, and the timestep fed to the transformer is ``sigma * 1000``, as in ``StableDiffusion3Pipeline``.

``FlowModel.forward(x, sigma, prompts) -> v`` is the only interface the method uses (the sampler
hands it sigma); ``progrpo_ref.adapters.sd3.SD3Adapter`` gives a real SD3 transformer the same one.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .data import IMAGE_SHAPE, NUM_CLASSES

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
FLOW_CHECKPOINT = CHECKPOINT_DIR / "flow_model.safetensors"


@dataclass
class FlowModelConfig:
    """Size of the tiny SD3 transformer (defaults: 2 layers, 2 heads x 32, patch 2 on 8x8)."""

    sample_size: int = 8
    """latent height and width"""
    in_channels: int = 1
    """latent channels"""
    patch_size: int = 2
    """transformer patch size: 8x8 latents give 16 image tokens"""
    num_layers: int = 2
    """joint (MMDiT) transformer blocks"""
    num_attention_heads: int = 2
    """attention heads per block"""
    attention_head_dim: int = 32
    """width of each head; the model width is heads x head_dim"""
    prompt_tokens: int = 4
    """length L of the learned "text" sequence per prompt"""
    joint_attention_dim: int = 32
    """width of each prompt token (SD3: 4096)"""
    pooled_projection_dim: int = 32
    """width of the pooled prompt embedding (SD3: 2048)"""


class FlowModel(nn.Module):
    """Velocity model ``v_theta(x, sigma, c)``: prompt encoder + tiny SD3 transformer."""

    def __init__(self, config: FlowModelConfig | None = None):
        super().__init__()
        from diffusers import SD3Transformer2DModel

        self.config = config = config or FlowModelConfig()
        width = config.num_attention_heads * config.attention_head_dim
        self.transformer = SD3Transformer2DModel(
            sample_size=config.sample_size,
            patch_size=config.patch_size,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            num_layers=config.num_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
            joint_attention_dim=config.joint_attention_dim,
            caption_projection_dim=width,
            pooled_projection_dim=config.pooled_projection_dim,
            pos_embed_max_size=config.sample_size // config.patch_size,
        )
        # the "text encoder": one learned token sequence and one pooled vector per class
        self.prompt_tokens = nn.Embedding(NUM_CLASSES, config.prompt_tokens * config.joint_attention_dim)
        self.prompt_pooled = nn.Embedding(NUM_CLASSES, config.pooled_projection_dim)
        nn.init.normal_(self.prompt_tokens.weight, std=0.02)
        nn.init.normal_(self.prompt_pooled.weight, std=0.02)

    def encode_prompts(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts ``[B]`` -> (encoder_hidden_states ``[B, L, D]``, pooled_projections ``[B, Dp]``)."""
        check_prompts(prompts)
        c = self.config
        tokens = self.prompt_tokens(prompts).view(-1, c.prompt_tokens, c.joint_attention_dim)
        return tokens, self.prompt_pooled(prompts)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, prompts: torch.Tensor) -> torch.Tensor:
        """Velocity ``v ~ eps - x0``. x ``[B, 1, 8, 8]``, sigma float or ``[B]``, prompts ``[B]``."""
        check_images(x, "x")
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        tokens, pooled = self.encode_prompts(prompts)
        out = self.transformer(
            hidden_states=x,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            timestep=sigma * 1000.0,  # as StableDiffusion3Pipeline feeds the scheduler's timesteps
            return_dict=False,
        )[0]
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_images(x: torch.Tensor, name: str = "images") -> None:
    """Raise ``ValueError`` unless x is a finite ``[B, 1, 8, 8]`` tensor."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} has shape {shape}; expected [B, {', '.join(map(str, IMAGE_SHAPE))}]")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains {int((~torch.isfinite(x)).sum())} non-finite values")


def check_prompts(prompts: torch.Tensor) -> None:
    """Raise ``ValueError`` unless prompts is an integer ``[B]`` tensor of digits 0-9."""
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 1 or prompts.is_floating_point():
        raise ValueError(f"prompts must be an integer tensor of shape [B], got {prompts!r:.80}")
    bad = prompts[(prompts < 0) | (prompts >= NUM_CLASSES)]
    if bad.numel():
        raise ValueError(f"prompt {int(bad[0])} is outside the digit classes 0-{NUM_CLASSES - 1}")


def load_flow_model(path: str | Path | None = None, device: str | torch.device = "cpu") -> FlowModel:
    """The committed pretrained flow model (EMA weights), in eval mode on ``device``."""
    from .serialization import load_module

    return load_module(FlowModel, FlowModelConfig, path or FLOW_CHECKPOINT, device)
