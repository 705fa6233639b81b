r"""Timing Pro-GRPO's arms through a real-size diffusers pipeline (for a GPU), and the adapter's overhead.

    python -m progrpo_ref.study.pipeline_bench run --device cuda --out DIR          # the GPU script
    python -m progrpo_ref.study.pipeline_bench run --device cpu --layers 1 --resolution 64 --small --out DIR  # its rehearsal
    python -m progrpo_ref.study.pipeline_bench overhead [--device cpu]            # Denoiser vs the bare network
    python -m progrpo_ref.study.pipeline_bench render DIR                          # DIR's JSON -> figures/gpu_pipeline.json

``run`` times, per arm (Flow-GRPO, Pro-GRPO Standard, Flash; ``adapters.presets.sd35_config``), one
warm-up and two measured updates of 2 prompts on an SD3.5-Medium-size random pipeline at 512 px:
LoRA r = 32, alpha = 64, bf16 network, guidance 4.5, a PickScore-size random CLIP reward. Weights
are built on the device, one model at a time. Each arm runs in its own subprocess with its own
timeout and writes ``DIR/<arm>.json`` as soon as it finishes (trajectory-steps per second in
sampling and in training, update seconds, peak memory), so a run cut short keeps what it finished.
Then the benchmark's ``--sd35`` path in its quick form (``bench_sd35.md``). The text encoders are
1-layer CLIPs of CLIP-L/G's widths and no T5 (zeros in its 256 token slots, as diffusers does without
T5): prompt embeddings have SD3.5's shapes; the encoders' cost (once per prompt) is not timed.

``render`` writes ``figures/gpu_pipeline.json``, from which ``study.results`` generates the GPU table of
``docs/pipelines.md`` next to the FLOP ratios counted by ``pipeline_costs`` (which need no GPU).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

from ..adapters.image_rewards import ClipReward
from ..adapters.lora import LoRA
from ..adapters.pipeline_task import SD3PipelineTask
from ..adapters.presets import sd35_config
from ..adapters.sd3 import SD3_VAE, SD35_MEDIUM
from ..adapters.tiny import clip_tokenizer
from ..algorithm.pro_grpo import PRESETS
from ..machinery.trainer import train
from .pipeline_costs import PAPER_RATIO, PICKSCORE_CLIP, epoch_costs
from .results import GPU as GPU_JSON  # the file study.results renders docs/pipelines.md's GPU table from

ARMS = ("flow_grpo", "standard", "flash")
PROMPTS = ["a photo of a cat on the grass", "a red bird in the sky", "a painting of a big dog", "a small blue fish",
           "a yellow table", "a drawing of a green bird", "a photo of a dog on a table", "a big red fish"]


def sd35_size_task(device: str, layers: int | None = None, resolution: int = 512, small: bool = False,
                   clip_tokens: int = 77, t5_tokens: int = 256) -> SD3PipelineTask:
    """SD3.5-Medium's transformer and VAE (random), 1-layer CLIP text encoders of CLIP-L/G's widths,
    a PickScore-size random CLIP reward (``small``: a 1-layer CLIP); LoRA 32/64, bf16, guidance 4.5.
    Prompts take clip_tokens + t5_tokens = 333 text tokens, as SD3.5's do (fewer: rehearsal only)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection

    tokenizer = clip_tokenizer(max_length=clip_tokens)
    over = {} if layers is None else dict(num_layers=layers, dual_attention_layers=tuple(range(min(layers, 13))))
    torch.manual_seed(0)
    with torch.device(device):  # built where it runs, one model at a time
        transformer = SD3Transformer2DModel(**{**SD35_MEDIUM, **over})
        vae = AutoencoderKL(**SD3_VAE)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=1,
            num_attention_heads=width // 64, projection_dim=width, bos_token_id=0, eos_token_id=1, pad_token_id=1))
            for width in (768, 1280)]
        clip_sizes = dict(PICKSCORE_CLIP) if not small else dict(
            text_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128),
            vision_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
                               patch_size=14, image_size=224), projection_dim=64)
        text = {**clip_sizes["text_config"], "vocab_size": len(tokenizer), "max_position_embeddings": 77,
                "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}
        clip = CLIPModel(CLIPConfig(text_config=text, vision_config=clip_sizes["vision_config"],
                                    projection_dim=clip_sizes["projection_dim"]))
    if device != "cpu":
        clip = clip.to(torch.bfloat16)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=encoders[0].eval(), tokenizer=tokenizer, text_encoder_2=encoders[1].eval(),
                                    tokenizer_2=clip_tokenizer(max_length=clip_tokens), text_encoder_3=None, tokenizer_3=None)
    return SD3PipelineTask(pipe, PROMPTS, ClipReward(clip, clip_tokenizer(max_length=77)), guidance_scale=4.5,
                           lora=LoRA(32, 64.0), bf16=True, resolution=resolution, decode_batch=8,
                           eval_prompts=PROMPTS[:1], max_sequence_length=t5_tokens)


def measure(arm: str, device: str, layers, resolution: int, small: bool, device_batch: int, out: Path,
            prompts: int = 2, clip_tokens: int = 77, t5_tokens: int = 256) -> dict:
    """One warm-up and two measured updates of ``arm`` with ``prompts`` prompts; writes and returns ``out/<arm>.json``."""
    t0 = time.perf_counter()
    task = sd35_size_task(device, layers, resolution, small, clip_tokens, t5_tokens)
    build_s = time.perf_counter() - t0
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    config = sd35_config(task, arm, prompts_per_update=prompts, num_updates=3, eval_every=1000, device=device,
                         device_batch=device_batch, progress=False)
    history = train(config, task)
    rows = history["updates"][1:]  # the first update is the warm-up
    P, passes = config.prompts_per_update, 2  # guidance: 2 network passes per trajectory-step
    sampling = sum(r["sampling_s"] for r in rows) / len(rows)
    optimisation = sum(r["optimisation_s"] for r in rows) / len(rows)
    trained_steps = P * config.trained_group_size * config.trained_steps
    result = {
        "arm": arm, "device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
        "date": date.today().isoformat(), "torch": torch.__version__, "layers": layers or SD35_MEDIUM["num_layers"],
        "resolution": resolution, "prompts": P, "text_tokens": clip_tokens + t5_tokens, "measured_updates": len(rows), "build_s": build_s,
        "sampling_s": sampling, "optimisation_s": optimisation, "update_s": sampling + optimisation,
        "sampling_trajectory_steps_per_s": rows[0]["nfe_per_prompt"] * P / passes / sampling,
        "training_trajectory_steps_per_s": trained_steps / optimisation,
        "nfe_per_prompt": rows[0]["nfe_per_prompt"], "vae_decodes": rows[0]["task_vae_decodes"],
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{arm}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run(args) -> None:
    """Each arm in its own subprocess (own timeout, own memory), then the benchmark's quick --sd35 path."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "progrpo_ref.study.pipeline_bench", "measure", "--device", args.device,
            "--resolution", str(args.resolution), "--device-batch", str(args.device_batch), "--out", str(out)]
    base += (["--layers", str(args.layers)] if args.layers else []) + (["--small"] if args.small else [])
    base += ["--prompts", str(args.prompts), "--clip-tokens", str(args.clip_tokens), "--t5-tokens", str(args.t5_tokens)]
    for arm in ARMS:
        t = time.perf_counter()
        try:
            done = subprocess.run(base + ["--arm", arm], timeout=args.timeout, capture_output=True, text=True)
            status = "ok" if done.returncode == 0 else f"exit {done.returncode}: {done.stderr.strip()[-400:]}"
        except subprocess.TimeoutExpired:
            status = f"timed out after {args.timeout} s"
        print(f"{arm}: {status} ({time.perf_counter() - t:.0f} s)", flush=True)
    if args.bench:
        bench = [sys.executable, "-m", "progrpo_ref.study.bench", "--device", args.device, "--bf16", "--sd35", "--quick", "--prompts", "2",
                 "--markdown", str(out / "bench_sd35.md")] + (["--sd35-layers", str(args.layers)] if args.layers else [])
        try:
            done = subprocess.run(bench, timeout=args.timeout, capture_output=True, text=True)
            (out / "bench_sd35.log").write_text(done.stdout[-20000:] + done.stderr[-5000:])
            print(f"bench --sd35 --quick: exit {done.returncode}", flush=True)
        except subprocess.TimeoutExpired:
            print(f"bench --sd35 --quick: timed out after {args.timeout} s", flush=True)
    print(table(load(out)))


def load(directory: Path) -> list[dict]:
    return [json.loads((Path(directory) / f"{arm}.json").read_text()) for arm in ARMS
            if (Path(directory) / f"{arm}.json").exists()]


def table(rows: list[dict]) -> str:
    """The measured table: wall ratio to Flow-GRPO next to the counted FLOP ratio and the paper's."""
    if not rows:
        return "(no arm finished)"
    base = {r["arm"]: r for r in rows}.get("flow_grpo")
    flops = {arm: epoch_costs(PRESETS[arm], beta=0.001)["total_flops"] for arm in ARMS}  # the preset's beta
    lines = [f"{rows[0]['device']}, {rows[0]['date']}, torch {rows[0]['torch']}, {rows[0]['layers']} layers at "
             f"{rows[0]['resolution']} px, {rows[0]['prompts']} prompts, mean of {rows[0]['measured_updates']} updates after a warm-up",
             "", "| arm | update s | sampling traj-steps/s | training traj-steps/s | peak GiB | wall ratio | FLOP ratio (counted) | paper |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['update_s'] / base['update_s']:.2f}x" if base else "-"
        mem = f"{r['peak_memory_gb']:.1f}" if r.get("peak_memory_gb") is not None else "-"
        lines.append(f"| {r['arm']} | {r['update_s']:.2f} | {r['sampling_trajectory_steps_per_s']:.1f} | "
                     f"{r['training_trajectory_steps_per_s']:.1f} | {mem} | {ratio} | "
                     f"{flops[r['arm']] / flops['flow_grpo']:.2f}x | {PAPER_RATIO[r['arm']]:.2f}x |")
    return "\n".join(lines)


def overhead(device: str = "cpu", reps: int = 20, layers: int = 2, side: int = 32) -> dict:
    """Seconds per call of the ``Denoiser`` (embedding lookup, guidance batching, autocast, dtype casts)
    against the transformer called directly on the same 2B rows, interleaved; returns the medians."""
    from diffusers import SD3Transformer2DModel

    from ..adapters.denoiser import SD3Denoiser

    over = dict(num_layers=layers, dual_attention_layers=tuple(range(layers)), sample_size=side)
    torch.manual_seed(0)
    with torch.device(device):
        net = SD3Transformer2DModel(**{**SD35_MEDIUM, **over}).eval()
        B = 4
        embeds = {"prompt_embeds": torch.randn(8, 333, 4096), "pooled_prompt_embeds": torch.randn(8, 2048)}
        negative = {k: torch.randn_like(v[:1]) for k, v in embeds.items()}  # one row, as the task encodes it
        den = SD3Denoiser(net, embeds, negative, guidance_scale=4.5)
        x, ids, sigma = torch.randn(B, 16, side, side), torch.arange(B), torch.full((B,), 0.7)
        x2 = torch.cat([x, x])
        e2 = {k: torch.cat([negative[k].expand(B, *negative[k].shape[1:]), embeds[k][ids]]) for k in embeds}
    direct = lambda: net(hidden_states=x2, encoder_hidden_states=e2["prompt_embeds"],
                         pooled_projections=e2["pooled_prompt_embeds"], timestep=torch.cat([sigma, sigma]) * 1000, return_dict=False)[0]
    adapted = lambda: den(x, sigma, ids)
    times = {"direct": [], "adapter": []}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        for fn in (direct, adapted):
            fn()  # warm-up
        for _ in range(reps):
            for name, fn in (("direct", direct), ("adapter", adapted)):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {"device": device, "layers": layers, "latent_side": side, "rows": 2 * B, "reps": reps, **med,
            "overhead": med["adapter"] / med["direct"] - 1}


def render(directory: Path) -> None:
    rows = load(directory)
    if not rows:
        raise SystemExit(f"no <arm>.json in {directory}")
    GPU_JSON.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {GPU_JSON}; now run python -m progrpo_ref.study.results")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("run", "measure"):
        p = sub.add_parser(name)
        p.add_argument("--device", default="cuda")
        p.add_argument("--layers", type=int, default=None, help="fewer transformer layers (rehearsal only)")
        p.add_argument("--resolution", type=int, default=512)
        p.add_argument("--small", action="store_true", help="a 1-layer CLIP reward instead of PickScore's size (rehearsal)")
        p.add_argument("--device-batch", type=int, default=8, help="trajectories per network call (TrainConfig.device_batch)")
        p.add_argument("--prompts", type=int, default=2, help="prompts per update")
        p.add_argument("--clip-tokens", type=int, default=77, help="CLIP tokens per prompt (fewer: rehearsal only)")
        p.add_argument("--t5-tokens", type=int, default=256, help="T5 token slots per prompt (fewer: rehearsal only)")
        p.add_argument("--out", required=True)
        if name == "run":
            p.add_argument("--timeout", type=int, default=150, help="seconds per arm's subprocess (and for the bench)")
            p.add_argument("--no-bench", dest="bench", action="store_false", help="skip the benchmark's --sd35 --quick path")
        else:
            p.add_argument("--arm", choices=ARMS, required=True)
    p = sub.add_parser("overhead")
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--side", type=int, default=32, help="latent side (64 = 512 px)")
    p.add_argument("--reps", type=int, default=20)
    p = sub.add_parser("render")
    p.add_argument("directory")
    args = ap.parse_args(argv)
    if args.command == "run":
        run(args)
    elif args.command == "measure":
        print(json.dumps(measure(args.arm, args.device, args.layers, args.resolution, args.small, args.device_batch,
                                 Path(args.out), args.prompts, args.clip_tokens, args.t5_tokens)))
    elif args.command == "overhead":
        print(json.dumps(overhead(args.device, args.reps, args.layers, args.side)))
    else:
        render(Path(args.directory))


if __name__ == "__main__":
    main()
