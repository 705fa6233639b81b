r"""FLOPs of one Pro-GRPO update (one epoch) per arm at SD3.5-Medium size, counted without a GPU.

    python -m progrpo_ref.study.pipeline_costs [--no-cfg] [--beta B] [--markdown PATH]

Nothing is typed in by hand: each network's FLOPs per sample are measured with
``torch.utils.flop_counter.FlopCounterMode`` on a model built on the ``meta`` device from its
configuration (no weights allocated, nothing downloaded), and multiplied by counts that follow from an
arm's ``PruneSchedule``. Per update, for P prompts, a schedule G_0 > ... > G_n (K = G_n the final size),
T sampling steps, S trained steps and rows r = 2 with classifier-free guidance (conditional and
unconditional in one batched call), else 1:

    sampling network forwards   P * nfe()                 nfe() = sum_i G_i (c_{i+1} - c_i)
    previews (decode + reward)  P * sum_{i<n} G_i          all live trajectories at each prune step
    final samples               P * K                      decoded and scored
    training forward + backward P * K * S                  every survivor on every trained step
    reference forwards          P * K * S if beta > 0
    FLOPs = (sampling + training + reference) * F_fwd(r) + training * F_bwd(r)
            + (previews + finals) * (F_vae + F_reward)

F_fwd(r), F_bwd(r): ``SD3Transformer2DModel(**SD35_MEDIUM)`` on latents [r, 16, 64, 64] (512 px),
encoder_hidden_states [r, 333, 4096], pooled [r, 2048], timestep [r]; the backward is a real
``.backward()`` on meta: by default with frozen weights, as LoRA trains (Flow-GRPO's SD3.5 setting and
``adapters.presets``; only activation gradients, about 1.1x the forward), or with every weight
trainable (``--full-finetune``; 2.0x the forward). F_vae:
``AutoencoderKL(**SD3_VAE).decode`` of [1, 16, 64, 64] to [1, 3, 512, 512]. F_reward: PickScore's size,
a transformers ``CLIPModel`` with ViT-H/14 sizes, on one 224 px image and one 77-token prompt (the text
tower is counted on every call, not cached per prompt).

What FlopCounterMode counts: matrix products, convolutions and attention (2 FLOPs per multiply-add;
on meta, scaled-dot-product attention runs its math decomposition, whose two bmm's are counted).
Not counted: element-wise work (norms, activations, the SDE step, the guidance mix, the loss), the text
encoders (once per prompt, alike for every arm), the optimizer step, and any recomputation from
gradient checkpointing.
"""
from __future__ import annotations

import argparse
import functools
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..adapters.sd3 import SD3_VAE, SD35_MEDIUM, TEXT_TOKENS
from ..algorithm.pro_grpo import PRESETS, PruneSchedule

LATENT = (16, 64, 64)  # SD3.5 at 512 px
# PickScore (CLIP ViT-H/14, laion/CLIP-ViT-H-14 sizes)
PICKSCORE_CLIP = dict(
    text_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                     max_position_embeddings=77),
    vision_config=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                       patch_size=14, image_size=224),
    projection_dim=1024,
)
PROMPT_TOKENS = 77
PAPER_RATIO = {"flow_grpo": 1.00, "standard": 0.74, "flash": 0.59}  # the paper's Table 4, FLOPs relative to Flow-GRPO


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """FLOPs of ``fn(*args, **kwargs)`` as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def network_flops(rows: int = 1, frozen: bool = False, **overrides) -> tuple[int, int]:
    """(forward, backward) FLOPs of the SD3 transformer (SD35_MEDIUM with ``overrides``) on ``rows`` samples.
    ``frozen``: the weights need no gradient (LoRA): the backward only carries activation gradients."""
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        net = SD3Transformer2DModel(**{**SD35_MEDIUM, **overrides})
        cfg = net.config
        size = cfg.sample_size if "sample_size" in overrides else LATENT[1]
        inputs = dict(hidden_states=torch.empty(rows, cfg.in_channels, size, size),
                      encoder_hidden_states=torch.empty(rows, TEXT_TOKENS, cfg.joint_attention_dim),
                      pooled_projections=torch.empty(rows, cfg.pooled_projection_dim),
                      timestep=torch.empty(rows))
    if frozen:
        net.requires_grad_(False)
        inputs["hidden_states"].requires_grad_(True)
    out = []
    forward = count_flops(lambda: out.append(net(**inputs, return_dict=False)[0]))
    backward = count_flops(lambda: out[0].sum().backward())
    return forward, backward


def vae_decode_flops() -> int:
    """FLOPs of ``AutoencoderKL(**SD3_VAE).decode`` on one latent [1, 16, 64, 64] -> pixels [1, 3, 512, 512]."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**SD3_VAE).requires_grad_(False)
        z = torch.empty(1, *LATENT)
    return count_flops(vae.decode, z, return_dict=False)


def reward_flops() -> int:
    """FLOPs of one PickScore-sized call: CLIP ViT-H/14 on one image [1, 3, 224, 224] and one prompt [1, 77]."""
    from transformers import CLIPConfig, CLIPModel

    with torch.device("meta"):
        clip = CLIPModel(CLIPConfig(**PICKSCORE_CLIP)).requires_grad_(False)
        pixels = torch.empty(1, 3, 224, 224)
        ids = torch.zeros(1, PROMPT_TOKENS, dtype=torch.long)
    return count_flops(clip, input_ids=ids, pixel_values=pixels)


@functools.lru_cache(maxsize=None)
def per_pass_flops(cfg: bool = True, lora: bool = True) -> dict:
    """FLOPs for one sample: the network's forward and backward (on 2 rows with guidance, else 1; with
    ``lora`` the backward of frozen weights, whose adapter's own FLOPs are negligible and not counted,
    else a full fine-tune's), one VAE decode and one reward call. Measured once and cached."""
    forward, backward = network_flops(2 if cfg else 1, frozen=lora)
    return {"network_forward": forward, "network_backward": backward,
            "vae_decode": vae_decode_flops(), "reward": reward_flops()}


def epoch_costs(schedule: PruneSchedule, prompts: int = 1, trained_steps: int = 9, cfg: bool = True,
                beta: float = 0.0, per_pass: dict | None = None, lora: bool = True) -> dict:
    """Counts and FLOPs of one update (formulas in the module docstring). ``trained_steps`` = 9 is
    Flow-GRPO's 0.99 x T = 10 (``TrainConfig.trained_steps``); ``per_pass`` defaults to
    ``per_pass_flops(cfg)``. Returns the counts (``*_rows`` are network batch rows, x2 with guidance)
    and FLOPs per category (``*_flops``) and in all (``total_flops``)."""
    pp = per_pass_flops(cfg, lora) if per_pass is None else per_pass
    rows = 2 if cfg else 1
    sampling = prompts * schedule.nfe()
    trained = prompts * schedule.final_size * trained_steps
    reference = trained if beta > 0 else 0
    scored = prompts * (sum(schedule.group_sizes[:-1]) + schedule.final_size)  # previews + final samples
    flops = {
        "sampling_flops": sampling * pp["network_forward"],
        "training_forward_flops": trained * pp["network_forward"],
        "training_backward_flops": trained * pp["network_backward"],
        "reference_forward_flops": reference * pp["network_forward"],
        "vae_decode_flops": scored * pp["vae_decode"],
        "reward_flops": scored * pp["reward"],
    }
    return {
        "sampling_nfe": sampling, "trained_trajectory_steps": trained,
        "network_forward_rows": rows * (sampling + trained + reference), "network_backward_rows": rows * trained,
        "vae_decodes": scored, "reward_calls": scored,
        **flops, "total_flops": sum(flops.values()),
    }


def flop_table(arms=("flow_grpo", "standard", "flash"), trained_steps: int = 9, cfg: bool = True, beta: float = 0.0,
               per_pass: dict | None = None, lora: bool = True) -> str:
    """A Markdown table of one update per prompt for each arm of ``PRESETS``, with its FLOP ratio to flow_grpo."""
    costs = {arm: epoch_costs(PRESETS[arm], 1, trained_steps, cfg, beta, per_pass, lora) for arm in arms}
    base = epoch_costs(PRESETS["flow_grpo"], 1, trained_steps, cfg, beta, per_pass, lora)["total_flops"]
    lines = ["| arm | sampling trajectory-steps / prompt | VAE decodes | reward calls | trained trajectory-steps | TFLOPs / prompt "
             "| ratio to flow_grpo | paper's ratio |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, c in costs.items():
        paper = f"{PAPER_RATIO[arm]:.2f}x" if arm in PAPER_RATIO else "-"
        lines.append(f"| {arm} | {c['sampling_nfe']} | {c['vae_decodes']} | {c['reward_calls']} | "
                     f"{c['trained_trajectory_steps']} | {c['total_flops'] / 1e12:.0f} | "
                     f"{c['total_flops'] / base:.2f}x | {paper} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-cfg", action="store_true", help="no classifier-free guidance (1 row per network call, not 2)")
    ap.add_argument("--beta", type=float, default=0.0, help="KL weight: > 0 adds a reference forward per trained step")
    ap.add_argument("--trained-steps", type=int, default=9, help="trained steps of the T = 10 (Flow-GRPO: 9)")
    ap.add_argument("--full-finetune", action="store_true", help="count weight gradients (default: LoRA, frozen weights)")
    ap.add_argument("--markdown", help="also write the table here")
    args = ap.parse_args(argv)
    cfg = not args.no_cfg
    lora = not args.full_finetune
    pp = per_pass_flops(cfg, lora)
    table = flop_table(trained_steps=args.trained_steps, cfg=cfg, beta=args.beta, per_pass=pp, lora=lora)
    note = (f"\nPer sample (TFLOPs, measured on meta): network forward {pp['network_forward'] / 1e12:.3f}, "
            f"backward {pp['network_backward'] / 1e12:.3f} ({'CFG, 2 rows' if cfg else '1 row'}; "
            f"{'LoRA: frozen weights' if lora else 'full fine-tune'}); "
            f"VAE decode {pp['vae_decode'] / 1e12:.3f}; reward (CLIP ViT-H/14) {pp['reward'] / 1e12:.3f}. "
            f"SD3.5-Medium at 512 px, T = 10, {args.trained_steps} trained steps, beta = {args.beta:g}.\n")
    print(table + "\n" + note)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n" + note)


if __name__ == "__main__":
    main()
