"""Command line: train an arm on a task, in one process or many.

    python -m progrpo_ref train --task digits --arm standard --updates 60
    torchrun --nproc_per_node 2 -m progrpo_ref train --task digits --arm standard --updates 60
    accelerate launch --multi_gpu --num_processes 8 -m progrpo_ref train --task digits --arm standard --device cuda
    python -m progrpo_ref arms

Under ``torchrun`` or ``accelerate launch`` (``WORLD_SIZE`` > 1 in the environment) every process joins one
``torch.distributed`` group (gloo on CPU, nccl on CUDA, one GPU per process by ``LOCAL_RANK``) and
``train`` spreads each update's groups over them (``progrpo_ref.machinery.parallel``). The first process writes the
history (``--history``) and the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields


def _task(name: str):
    if name == "digits":
        from .digits import DigitsTask

        return DigitsTask()
    if name == "diffusion":
        from .digits import DigitsTask

        return DigitsTask(model="diffusion")
    raise ValueError(f"--task {name!r} must be digits or diffusion")


def _init_distributed(device: str) -> str:
    """Join the process group the launcher describes; returns this process's device."""
    import torch
    import torch.distributed as dist

    from datetime import timedelta

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return device
    cuda = device.startswith("cuda")
    if cuda:  # one GPU per process; "cuda" then means this process's GPU, so every process logs the same config
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        device = "cuda"
    # a process that dies mid-update leaves the others in a collective: torchrun and accelerate stop them at
    # once; under other launchers this timeout ends the wait with an error
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    return device


def main(argv=None) -> int:
    from .algorithm.task import check_sampler
    from .machinery.config import ARMS, TrainConfig, arm_config
    from .machinery.trainer import train

    ap = argparse.ArgumentParser(prog="python -m progrpo_ref", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("arms", help="list the named arms")
    t = sub.add_parser("train", help="train one arm (any TrainConfig field can be set with --set name=value)")
    t.add_argument("--task", default="digits", choices=["digits", "diffusion"])
    t.add_argument("--arm", default="flow_grpo", choices=sorted(ARMS))
    t.add_argument("--updates", type=int, default=TrainConfig.num_updates)
    t.add_argument("--prompts", type=int, default=TrainConfig.prompts_per_update, help="prompts per update (all processes)")
    t.add_argument("--device-batch", type=int, default=0,
                   help="at most this many trajectories per network call, reward call and backward pass, per process (0: no limit)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu", help="cpu or cuda (each process takes cuda:LOCAL_RANK)")
    t.add_argument("--history", help="write the history here (JSON, first process only)")
    t.add_argument("--checkpoint", help="save the policy, optimizer and history here")
    t.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="another TrainConfig field, VALUE as JSON (e.g. --set beta=0.01 --set num_minibatches=4)")
    args = ap.parse_args(argv)

    if args.command == "arms":
        for name in ARMS:
            cfg = arm_config(name)
            print(f"{name:14s} {cfg.schedule.group_sizes} pruned at {cfg.schedule.prune_steps or '-'}, "
                  f"{type(cfg.sampler).__name__}, trains on {cfg.trained_group_size}, {cfg.schedule.nfe()} NFE per prompt")
        return 0

    known = {f.name for f in fields(TrainConfig)}
    extra = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        if name not in known or not eq:
            t.error(f"argument --set: {item!r} must be NAME=VALUE with NAME a TrainConfig field ({', '.join(sorted(known))})")
        try:
            extra[name] = json.loads(value)
        except json.JSONDecodeError:
            t.error(f"argument --set: {item!r}: VALUE must be JSON (e.g. --set lr=3e-4, --set arm='\"mine\"')")
    options = {"num_updates": "--updates", "prompts_per_update": "--prompts", "device_batch": "--device-batch",
               "seed": "--seed", "device": "--device", "checkpoint_path": "--checkpoint"}
    base = dict(num_updates=args.updates, prompts_per_update=args.prompts, device_batch=args.device_batch, seed=args.seed,
                device=args.device, checkpoint_path=args.checkpoint)
    task = _task(args.task)
    try:  # every field is checked here, before any process group is joined
        check_sampler(task, arm_config(args.arm, **{**base, **extra}).sampler)
    except (ValueError, TypeError) as e:  # TypeError: e.g. a --set schedule with a key PruneSchedule does not have
        field = next((f for f in known if str(e).startswith(f"{f}=")), None)
        where = (f"argument --set {field}" if field in extra else f"argument {options[field]}" if field in options
                 else f"argument --set {' / '.join(extra)}" if extra and isinstance(e, TypeError)
                 else f"argument --arm {args.arm} with --task {args.task}")
        t.error(f"{where}: {e}")
    device = _init_distributed(extra.get("device", args.device))
    config = arm_config(args.arm, **{**base, "device": device, **extra})
    history = train(config, task)
    import torch.distributed as dist

    first = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    if args.history and first:
        with open(args.history, "w") as f:
            json.dump(history, f, indent=1)
    if first:
        last = history["evals"][-1]
        print(f"{args.arm}: {len(history['updates'])} updates, eval margin {last.get('eval_margin', float('nan')):.3f}")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
