r"""LoRA through ``peft``: adapter on, the reference policy as the same network with it off, export in
diffusers' LoRA format.

A LoRA layer replaces a frozen linear map W by W + (alpha / r) B A, with A ``[r, in]``, B ``[out, r]``,
B = 0 at the start (so the policy starts equal to the reference). Only A and B are trained, kept in
fp32 even when the frozen network is bf16. The reference policy of the KL term is the same module
with the adapter disabled: no second copy of the network.

Export: ``export_lora`` writes ``pytorch_lora_weights.safetensors`` through the pipeline class's own
``save_lora_weights`` *with the adapter's metadata* (rank, alpha, target modules). Without the metadata
``load_lora_weights`` cannot know alpha and silently uses alpha = r, which rescales the update by
r / alpha: the reloaded policy is then not the trained one (the tests show both).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

ADAPTER = "progrpo"  # the adapter's name inside the network

# Flow-GRPO's SD3 targets: every attention projection of the joint blocks (image and text streams)
SD3_TARGETS = ("attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
               "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v")
# DDPO's / diffusers' SD-v1 LoRA targets: the UNet's attention projections
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoRA:
    """A LoRA adapter's shape. Flow-GRPO's SD3.5 default: r = 32, alpha = 64."""

    rank: int = 32
    """r: the adapter's rank"""
    alpha: float = 64.0
    """the update is scaled by alpha / r"""
    target_modules: tuple[str, ...] | None = None
    """module name suffixes to adapt; None: the task's default (SD3_TARGETS or UNET_TARGETS)"""
    seed: int = 0
    """seed of A's random init (B starts at 0)"""

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank!r} must be an integer >= 1")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise ValueError(f"LoRA alpha={self.alpha!r} must be > 0")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def to_dict(self) -> dict:
        return asdict(self)


def add_lora(net: torch.nn.Module, lora: LoRA, default_targets: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """Freeze ``net``, add a fresh adapter named ``ADAPTER`` (replacing an earlier one), make it active;
    returns its parameters (fp32, requires_grad). A's init is seeded by ``lora.seed``; B = 0."""
    from peft import LoraConfig

    targets = list(lora.target_modules or default_targets)
    if ADAPTER in (getattr(net, "peft_config", None) or {}):
        net.delete_adapters(ADAPTER)
    net.requires_grad_(False)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, init_lora_weights="gaussian", target_modules=targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(lora.seed)
        net.add_adapter(config, adapter_name=ADAPTER)
    net.set_adapter(ADAPTER)
    params = [p for name, p in net.named_parameters() if f".{ADAPTER}." in name]
    if not params:
        raise ValueError(f"LoRA target_modules={targets} matched no module of {type(net).__name__}")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


class AdapterDisabled:
    """The reference policy: calls ``policy`` (a ``Denoiser``) with its network's adapters disabled."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, x, t, prompts):
        net = self.policy.net
        net.disable_adapters()
        try:
            return self.policy(x, t, prompts)
        finally:
            net.enable_adapters()


def lora_metadata(net: torch.nn.Module) -> dict:
    """The adapter's peft config as a dict (what ``load_lora_weights`` needs to restore alpha)."""
    return net.peft_config[ADAPTER].to_dict()


def export_lora(pipeline, component: str, directory, metadata: bool = True) -> str:
    """Write the adapter of ``pipeline.<component>`` (``"transformer"`` or ``"unet"``) in diffusers' LoRA
    format; ``type(pipeline)(...).load_lora_weights(directory)`` restores it. ``metadata=False``
    reproduces the lossy export (alpha dropped) for comparison. Returns the file's path."""
    from peft.utils import get_peft_model_state_dict

    net = getattr(pipeline, component)
    layers = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(net, adapter_name=ADAPTER).items()}
    kwargs = {f"{component}_lora_layers": layers}
    if metadata:
        kwargs[f"{component}_lora_adapter_metadata"] = lora_metadata(net)
    type(pipeline).save_lora_weights(str(directory), safe_serialization=True, **kwargs)
    return f"{directory}/pytorch_lora_weights.safetensors"
