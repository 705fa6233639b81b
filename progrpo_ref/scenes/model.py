"""The scenes' text-to-image flow model: a small text encoder and diffusers' ``SD3Transformer2DModel``.

The transformer is SD3.5's architecture (joint attention over image patches and the prompt's tokens, a pooled
prompt vector added to the timestep embedding), only small. The text encoder stands in for SD3's CLIP and T5: the
prompt's words (``grammar.VOCABULARY``) after a ``<bos>`` token, embedded with learned positions and passed through
a small transformer encoder; its output sequence is ``encoder_hidden_states [B, L, D]`` and its output at ``<bos>``,
projected, is ``pooled_projections [B, Dp]`` (CLIP pools at one token the same way). Padding is attended to, as SD3
attends to T5's padding. The prompt id ``NULL_PROMPT`` (``<bos>`` alone) is the empty prompt that pretraining drops
to with probability ``prompt_dropout``, for classifier-free guidance: with ``guidance_scale`` w > 1 the model returns
v_uncond + w (v_cond - v_uncond), both branches in one batch, and says ``passes_per_sample = 2`` for the NFE count
(SD3.5 and Flow-GRPO sample, and score log-probabilities, with guidance the same way).

Convention (as the digits' flow model): ``x_sigma = (1 - sigma) x0 + sigma eps``, the network predicts ``eps - x0``,
the transformer's timestep is ``sigma * 1000``. ``SceneModel.forward(x [B, 3, S, S], sigma, prompts [B]) -> v``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .grammar import PROMPTS, VOCABULARY

CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "scene_model.safetensors"
NULL_PROMPT = len(PROMPTS)  # the empty prompt: <bos> alone
PAD, BOS = 0, 1
WORD_IDS = {w: i + 2 for i, w in enumerate(VOCABULARY)}
MAX_WORDS = 8


def tokenize(prompt: str) -> list[int]:
    """``[<bos>, words..., <pad>...]`` of length ``1 + MAX_WORDS``."""
    ids = [BOS] + [WORD_IDS[w] for w in prompt.split()]
    if len(ids) > 1 + MAX_WORDS:
        raise ValueError(f"prompt {prompt!r} has more than {MAX_WORDS} words")
    return ids + [PAD] * (1 + MAX_WORDS - len(ids))


TOKENS = torch.tensor([tokenize(p) for p in PROMPTS] + [tokenize("")])  # [prompts + 1, 1 + MAX_WORDS]


@dataclass
class SceneModelConfig:
    """Sizes (defaults: 24 x 24 RGB in 6 x 6 patches of 4 pixels, 3 joint blocks of 4 heads x 16)."""

    latent_size: int = 6
    """latent height and width (the autoencoder's: 24 x 24 pixels, 4x down)"""
    latent_channels: int = 8
    """latent channels (the autoencoder's)"""
    patch_size: int = 1
    """transformer patch size: 6 x 6 latents give 36 image tokens"""
    num_layers: int = 3
    """joint (MMDiT) transformer blocks"""
    num_attention_heads: int = 4
    """attention heads per block"""
    attention_head_dim: int = 16
    """width of each head; the model width is heads x head_dim"""
    text_width: int = 64
    """width of the text encoder and of each prompt token (SD3: 4096)"""
    text_layers: int = 2
    """transformer-encoder layers of the text encoder"""
    pooled_projection_dim: int = 64
    """width of the pooled prompt vector (SD3: 2048)"""


class TextEncoder(nn.Module):
    """Prompt ids ``[B]`` -> (tokens ``[B, 1 + MAX_WORDS, D]``, pooled ``[B, Dp]``)."""

    def __init__(self, width: int, layers: int, pooled: int):
        super().__init__()
        self.embed = nn.Embedding(len(WORD_IDS) + 2, width)
        self.position = nn.Parameter(torch.zeros(1 + MAX_WORDS, width))
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=2 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.pool = nn.Linear(width, pooled)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        self.register_buffer("tokens", TOKENS.clone(), persistent=False)

    def forward(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.encoder(self.embed(self.tokens[prompts]) + self.position))
        return h, self.pool(h[:, 0])


class SceneModel(nn.Module):
    """Velocity model ``v_theta(x, sigma, prompt)``: text encoder + small SD3 transformer, guided by
    ``guidance_scale`` (1: no guidance)."""

    def __init__(self, config: SceneModelConfig | None = None, guidance_scale: float = 1.0):
        super().__init__()
        self.guidance_scale = guidance_scale
        from diffusers import SD3Transformer2DModel

        self.config = c = config or SceneModelConfig()
        self.text = TextEncoder(c.text_width, c.text_layers, c.pooled_projection_dim)
        self.transformer = SD3Transformer2DModel(
            sample_size=c.latent_size, patch_size=c.patch_size, in_channels=c.latent_channels,
            out_channels=c.latent_channels, num_layers=c.num_layers,
            attention_head_dim=c.attention_head_dim, num_attention_heads=c.num_attention_heads,
            joint_attention_dim=c.text_width, caption_projection_dim=c.num_attention_heads * c.attention_head_dim,
            pooled_projection_dim=c.pooled_projection_dim, pos_embed_max_size=c.latent_size // c.patch_size)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor | float, prompts: torch.Tensor) -> torch.Tensor:
        c, s = self.config.latent_channels, self.config.latent_size
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"x has shape {tuple(getattr(x, 'shape', ()))}; expected [B, {c}, {s}, {s}]")
        check_prompt_ids(prompts, allow_null=True)
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        w = self.guidance_scale
        if w != 1.0:  # [cond; uncond] in one batch
            v = self.velocity(torch.cat([x, x]), torch.cat([sigma, sigma]),
                              torch.cat([prompts, torch.full_like(prompts, NULL_PROMPT)]))
            cond, uncond = v.chunk(2)
            return uncond + w * (cond - uncond)
        return self.velocity(x, sigma, prompts)

    @property
    def passes_per_sample(self) -> int:
        return 1 if self.guidance_scale == 1.0 else 2

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """The unguided network: ``[B, C, s, s]`` latents, ``[B]`` noise levels and prompt ids."""
        tokens, pooled = self.text(prompts)
        return self.transformer(hidden_states=x, encoder_hidden_states=tokens, pooled_projections=pooled,
                                timestep=sigma * 1000.0, return_dict=False)[0]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_prompt_ids(prompts: torch.Tensor, allow_null: bool = False) -> None:
    """Raise ``ValueError`` unless prompts is an integer ``[B]`` tensor of prompt ids (``NULL_PROMPT`` too if
    ``allow_null``)."""
    if not isinstance(prompts, torch.Tensor) or prompts.ndim != 1 or prompts.is_floating_point():
        raise ValueError(f"prompts must be an integer tensor of shape [B], got {prompts!r:.80}")
    top = NULL_PROMPT if allow_null else NULL_PROMPT - 1
    bad = prompts[(prompts < 0) | (prompts > top)]
    if bad.numel():
        raise ValueError(f"prompt id {int(bad[0])} is not in 0..{top}")
