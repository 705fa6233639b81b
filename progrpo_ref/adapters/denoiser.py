r"""A diffusers network as the method's model ``model(x, t, prompts) -> out``, with classifier-free guidance.

Prompts are encoded once by the pipeline (``PipelineTask``); the method passes integer ids ``[B]``
into that table of embeddings ``{name: [N, ...]}``. For a guidance scale w > 1 the network sees the
unconditional and the conditional rows of the batch in one call of 2B rows and returns

    out = out_u + w (out_c - out_u)                 (Ho & Salimans; Flow-GRPO samples SD3.5 with w = 4.5)

Every call that samples, re-scores or evaluates the reference goes through this, so re-scoring and the
KL use the same guidance and both branches. NFE counting: ``passes_per_sample`` is 2 with guidance
(both branches are network passes, though they share one call), so ``NFECounter`` reports 2 per
trajectory-step; 1 without.

The table may live on another device than the network (the host, for a large prompt set): each call
gathers its B rows and moves only those. The unconditional branch is one row (the same negative
prompt for all), expanded. ``autocast_dtype=torch.bfloat16`` runs the network under autocast (bf16
matmuls); the output is cast back to fp32, so the sampler's step and log-prob are computed in fp32.
Shapes: x, out ``[B, C, h, w]``, t ``[B]``, prompts ``[B]`` long.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class Denoiser(nn.Module):
    """The shared part: embedding lookup, guidance, autocast. Subclasses say how the network is called."""

    def __init__(self, net: nn.Module, embeds: dict[str, torch.Tensor], negative: dict[str, torch.Tensor] | None = None,
                 guidance_scale: float = 1.0, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        if not guidance_scale >= 1.0:
            raise ValueError(f"guidance_scale={guidance_scale} must be >= 1 (1: no classifier-free guidance)")
        if guidance_scale > 1.0 and negative is None:
            raise ValueError(f"guidance_scale={guidance_scale} > 1 needs the negative (unconditional) embeddings")
        if negative is not None and any(v.shape[0] != 1 for v in negative.values()):
            raise ValueError("the negative embeddings must be one row each ([1, ...]), the same for every prompt")
        self.net = net
        self.table = dict(embeds)  # {name: [N, ...]}: not parameters, not saved with the policy
        self.negative = dict(negative) if negative is not None else None  # {name: [1, ...]}
        self.guidance_scale = float(guidance_scale)
        self.autocast_dtype = autocast_dtype

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0

    @property
    def passes_per_sample(self) -> int:
        """Network passes per trajectory-step (what ``NFECounter`` counts): 2 with guidance, else 1."""
        return 2 if self.guided else 1

    def embeds(self, prompts: torch.Tensor, device, negative: bool = False) -> dict[str, torch.Tensor]:
        """The rows of ``prompts`` (or the negative row, repeated), fp32 on ``device``."""
        if negative:
            return {k: v.to(device).float().expand(len(prompts), *v.shape[1:]) for k, v in self.negative.items()}
        return {k: v[prompts.to(v.device)].to(device).float() for k, v in self.table.items()}

    def call_net(self, x: torch.Tensor, t: torch.Tensor, embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - interface

    def forward(self, x: torch.Tensor, t: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        ctx = torch.autocast(x.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else contextlib.nullcontext()
        with ctx:
            cond = self.embeds(prompts, x.device)
            if not self.guided:
                return self.call_net(x, t, cond).float()
            uncond = self.embeds(prompts, x.device, negative=True)
            both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            out_u, out_c = self.call_net(torch.cat([x, x]), torch.cat([t, t]), both).float().chunk(2)
        return out_u + self.guidance_scale * (out_c - out_u)


class SD3Denoiser(Denoiser):
    """``SD3Transformer2DModel``: velocity = transformer(x, prompt_embeds, pooled, timestep = sigma x 1000),
    as ``StableDiffusion3Pipeline`` calls it (t is the flow sampler's sigma)."""

    def call_net(self, x, t, embeds):
        return self.net(hidden_states=x.to(self.net.dtype), encoder_hidden_states=embeds["prompt_embeds"],
                        pooled_projections=embeds["pooled_prompt_embeds"], timestep=t.float() * 1000.0, return_dict=False)[0]


class UNetDenoiser(Denoiser):
    """``UNet2DConditionModel`` (Stable Diffusion v1/v2): noise (or v) prediction at the integer DDIM
    timestep t, as ``StableDiffusionPipeline`` calls it."""

    def call_net(self, x, t, embeds):
        return self.net(x.to(self.net.dtype), t, encoder_hidden_states=embeds["prompt_embeds"], return_dict=False)[0]
