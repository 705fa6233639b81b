"""The scenes' autoencoder: SD3's VAE in miniature, 24 x 24 RGB pixels <-> 6 x 6 x C latents.

SD3 runs its transformer on a VAE's latents (8x smaller per side, 16 channels) and decodes the final latents to
pixels before any reward sees them. So do we: a 4x convolutional encoder/decoder, trained on rendered scenes before
the flow model, then frozen. Latents are normalised as SD3's are, ``z = (E(x) - shift) * scale``, so that they have
mean 0 and standard deviation 1 over the rendered data (the flow's noise has the same scale).

Training: reconstruction MSE of the decoder fed slightly noised latents, ``|| D(E(x) + 0.1 n) - x ||^2`` with
``n ~ N(0, I)``, plus ``1e-3 * mean E(x)^2``; the noise keeps the decoder sensible on latents near, not on, the data
(which is what a flow model's samples and previews are), the penalty keeps the latent scale from growing past it.
The small KL term of SD3's VAE plays both roles there.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

AUTOENCODER_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "scene_autoencoder.safetensors"


@dataclass
class AutoencoderConfig:
    """Sizes (defaults: 8 latent channels, convolutions of 32 and 64 channels)."""

    image_size: int = 24
    """image height and width"""
    latent_channels: int = 8
    """latent channels (SD3: 16)"""
    width: int = 64
    """channels of the inner convolutions"""


class SceneAutoencoder(nn.Module):
    """``encode(x [B, 3, S, S] in [-1, 1]) -> z [B, C, S/4, S/4]`` (normalised) and ``decode(z) -> x``."""

    def __init__(self, config: AutoencoderConfig | None = None):
        super().__init__()
        self.config = c = config or AutoencoderConfig()
        w = c.width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w // 2, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, c.latent_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(c.latent_channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(w, w // 2, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w // 2, 3, 3, padding=1))
        self.register_buffer("shift", torch.zeros(c.latent_channels, 1, 1))
        self.register_buffer("scale", torch.ones(c.latent_channels, 1, 1))

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.config.latent_channels, self.config.image_size // 4, self.config.image_size // 4)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"images have shape {tuple(getattr(x, 'shape', ()))}; expected [B, 3, {s}, {s}]")
        return (self.encoder(x) - self.shift) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"latents have shape {tuple(getattr(z, 'shape', ()))}; expected [B, "
                             f"{', '.join(map(str, self.latent_shape))}]")
        return self.decoder(z / self.scale + self.shift)

    def raw_loss(self, x: torch.Tensor, generator=None, noise: float = 0.1, penalty: float = 1e-3) -> torch.Tensor:
        """The training loss on images ``x`` (un-normalised latents)."""
        h = self.encoder(x)
        n = torch.randn(h.shape, generator=generator).to(h.device)
        return ((self.decoder(h + noise * n) - x) ** 2).mean() + penalty * (h ** 2).mean()

    @torch.no_grad()
    def set_normalisation(self, x: torch.Tensor) -> None:
        """shift and scale so that the latents of ``x`` have mean 0 and standard deviation 1 per channel."""
        h = self.encoder(x)
        self.shift.copy_(h.mean((0, 2, 3)).view(-1, 1, 1))
        self.scale.copy_(1 / h.std((0, 2, 3)).view(-1, 1, 1))
