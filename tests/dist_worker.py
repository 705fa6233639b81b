"""One update of data-parallel Pro-GRPO, run by tests/test_parallel.py in 1 process (plain python) or in
several (``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py ...``).

Writes (rank 0) what the equivalence test compares: every trajectory sampled (gathered from all processes,
by key), the pruning decisions, the advantages, the first mini-batch's max |log r| and the updated weights.

    dist_worker.py OUT.pt PROMPTS GROUP_SIZES PRUNE_STEPS SEED [--crash-rank R] [--device-batch B]
                   [--strategy ovf|random|...] [--selection all|ovf|random|...] [--bucket ELEMENTS]
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("prompts", type=int)
    ap.add_argument("group_sizes")  # e.g. 8,6,4
    ap.add_argument("prune_steps")  # e.g. 5,7 or "-"
    ap.add_argument("seed", type=int)
    ap.add_argument("--crash-rank", type=int, default=-1)
    ap.add_argument("--device-batch", type=int, default=0)
    ap.add_argument("--strategy", default="ovf", help="how Expand-and-Prune picks survivors")
    ap.add_argument("--selection", default="all", help="static selection after the final reward (select_k = 2)")
    ap.add_argument("--bucket", type=int, default=0, help="gradients summed in buckets of this many elements (0: default)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
        assert dist.get_world_size() == 2 and dist.get_backend() == "gloo", (dist.get_world_size(), dist.get_backend())

    from progrpo_ref.digits import DigitsTask
    from progrpo_ref.algorithm.grpo import group_advantages
    from progrpo_ref.algorithm.noise import per_update_generator
    from progrpo_ref.machinery import parallel
    from progrpo_ref.machinery.parallel import Processes
    from progrpo_ref.algorithm.pro_grpo import PruneSchedule
    from progrpo_ref.machinery.config import arm_config
    from progrpo_ref.machinery.trainer import collect, optimise

    processes = Processes()
    if args.bucket:
        parallel.BUCKET_ELEMENTS = args.bucket
    if processes.rank == args.crash_rank:
        raise RuntimeError(f"rank {processes.rank} crashes on purpose (test)")
    sizes = tuple(int(g) for g in args.group_sizes.split(","))
    steps = () if args.prune_steps == "-" else tuple(int(c) for c in args.prune_steps.split(","))
    cfg = arm_config("standard", schedule=PruneSchedule(sizes, steps, 10), prompts_per_update=args.prompts, seed=args.seed,
                     num_minibatches=2, beta=0.01, device_batch=args.device_batch, prune_strategy=args.strategy,
                     selection=args.selection, select_k=2, progress=False)
    task = DigitsTask(eval_per_class=1, eval_group=2)
    model = task.policy()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    reference = task.reference(model)
    grads = []  # the summed gradient of each mini-batch, as the optimizer sees it

    class Recording(torch.optim.Adam):
        def step(self, closure=None):
            grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]).clone())
            return super().step(closure)

    optimizer = Recording([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    gen = per_update_generator(cfg.seed, 1)
    ro, R = collect(model, task, cfg, 1, gen, processes)
    A = group_advantages(R, cfg.adv_eps, cfg.global_std, cfg.adv_clip)
    stats = optimise(model, reference, optimizer, ro, A, cfg, gen, processes)
    keys = processes.gather(ro.keys)
    latents = processes.gather(ro.latents.flatten(1))
    held = processes.gather(torch.tensor([len(ro.keys)]))
    if processes.rank == 0:
        order = (keys[:, 0] * 1000 + keys[:, 1]).argsort()
        torch.save({"keys": keys[order], "latents": latents[order], "advantages": A, "rewards": R,
                    "keep": [p["keep"] for p in ro.previews], "stats": stats, "held": held, "grads": grads,
                    "start": start, "weights": {k: v.detach().clone() for k, v in model.state_dict().items()}}, args.out)
    if processes.active:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
