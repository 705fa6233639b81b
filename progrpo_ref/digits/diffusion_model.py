"""The small diffusion model: a class-conditional DDPM noise predictor on diffusers' ``UNet2DModel``.

Convention (DDPM, Stable Diffusion v1): ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps``
with t = 0 (clean) .. N - 1 (noise) and alpha_bar from ``DDPMScheduler``'s linear betas; the network
predicts the noise eps (``prediction_type="epsilon"``). The "prompt" is a digit class c in 0-9, fed
through the UNet's class embedding (``num_class_embeds``), which is added to the timestep embedding.

``DiffusionModel.forward(x, t, prompts) -> eps_hat`` is the interface the method uses: the DDIM
sampler hands it the integer timestep t. ``DiffusionModel.sampler()`` builds the matching ``DDIM``
from the training schedule, so the sampler and the model cannot disagree on alpha_bar.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..algorithm.samplers import DDIM
from .data import NUM_CLASSES
from .model import CHECKPOINT_DIR, check_images, check_prompts

DIFFUSION_CHECKPOINT = CHECKPOINT_DIR / "diffusion_model.safetensors"


@dataclass
class DiffusionModelConfig:
    """Size of the small UNet and its training schedule (defaults: 2 resolutions, 16 and 32 channels, 165k parameters)."""

    sample_size: int = 8
    """image height and width"""
    in_channels: int = 1
    """image channels"""
    block_out_channels: tuple[int, ...] = (16, 32)
    """channels per resolution (8x8, 4x4)"""
    layers_per_block: int = 1
    """ResNet layers per down block"""
    norm_num_groups: int = 8
    """GroupNorm groups"""
    num_train_timesteps: int = 1000
    """N of the DDPM schedule"""
    beta_start: float = 1e-4
    """first beta (DDPM's linear schedule)"""
    beta_end: float = 0.02
    """last beta"""
    prediction_type: str = "epsilon"
    """what the UNet predicts"""

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if self.prediction_type != "epsilon":  # pretrain.ddpm_loss regresses the noise
            raise ValueError(f"prediction_type={self.prediction_type!r}: the digits' diffusion model is trained "
                             f"with DDPM's epsilon loss only")

    def scheduler_config(self) -> dict:
        """The ``DDPMScheduler`` / ``DDIMScheduler`` config keys of the training schedule."""
        return {"num_train_timesteps": self.num_train_timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "beta_schedule": "linear", "prediction_type": self.prediction_type}


class DiffusionModel(nn.Module):
    """Noise model ``eps_theta(x_t, t, c)``: a class-conditional ``UNet2DModel``."""

    def __init__(self, config: DiffusionModelConfig | None = None):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config = config or DiffusionModelConfig()
        n = len(config.block_out_channels)
        self.unet = UNet2DModel(
            sample_size=config.sample_size,
            in_channels=config.in_channels,
            out_channels=config.in_channels,
            layers_per_block=config.layers_per_block,
            block_out_channels=config.block_out_channels,
            down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n,
            norm_num_groups=config.norm_num_groups,
            num_class_embeds=NUM_CLASSES,
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor | int, prompts: torch.Tensor) -> torch.Tensor:
        """eps_hat. x ``[B, 1, 8, 8]``, t an integer timestep or ``[B]``, prompts ``[B]`` digits."""
        check_images(x, "x")
        check_prompts(prompts)
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        if t.is_floating_point():  # e.g. a flow sampler's sigma: refuse rather than misread it
            raise ValueError(f"t must be integer timesteps in [0, {self.config.num_train_timesteps}), got {t.dtype}; "
                             f"sample this model with DDIM (DiffusionModel.sampler())")
        return self.unet(x, t, class_labels=prompts, return_dict=False)[0]

    def sampler(self, num_steps: int = 20, eta: float = 1.0) -> DDIM:
        """The DDIM sampler on this model's training schedule (eta = 1: DDPO's stochastic sampler)."""
        return DDIM.from_scheduler_config(self.config.scheduler_config(), num_steps=num_steps, eta=eta)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def load_diffusion_model(path=None, device: str | torch.device = "cpu") -> DiffusionModel:
    """The committed pretrained diffusion model (EMA weights), in eval mode on ``device``."""
    from .serialization import load_module

    return load_module(DiffusionModel, DiffusionModelConfig, path or DIFFUSION_CHECKPOINT, device)


__all__ = ["DiffusionModel", "DiffusionModelConfig", "load_diffusion_model", "DIFFUSION_CHECKPOINT"]
