"""Benchmark: what one update of each arm costs, measured, next to what a cost model predicts.

    python -m progrpo_ref.study.bench                 # default: 30 interleaved rounds, medians (about 3 minutes)
    python -m progrpo_ref.study.bench --quick         # under a minute on 2 CPU cores
    python -m progrpo_ref.study.bench --json out.json --markdown out.md
    python -m progrpo_ref.study.bench --device cuda --bf16 [--sd35]    # on a GPU; --sd35: SD3.5-Medium size, 512 px

Arms (same prompts and seeds): Flow-GRPO G = 24, static OVF 24 -> 12, Pro-GRPO Standard 48 -> 24 -> 12,
Pro-GRPO Flash 24 -> 16 -> 12. Timing: all arms in one process, each with its own model copy,
one update per arm per round with the order rotating every round, so a slow spell of the shared
machine hits every arm alike; seconds per update are medians over rounds and ratios to Flow-GRPO are
medians of ratios paired by round (quartiles reported). Counts (NFE, previews) and peak memory come
from one short subprocess per arm, since a process's peak memory only grows. (Timing each arm in its
own subprocess was tried first: whole processes ran 20-30% slower or faster than others on this
shared virtual machine, which swamped the differences between arms.)

The cost model: a separate calibration pass times, at every batch size an arm actually uses, one
sampling step f(B) (denoiser forward + SDE step), one trained step g(B) (re-scored log-prob, clipped
loss, backward), one reward call r(B) (previews and final rewards), and one optimizer step o.
Predicted per update: sampling = sum over funnel segments of steps x f(P G_i) + sum over prune steps
r(P G_i) + r(P G_final); optimisation = minibatches x (trained steps x g(P K / minibatches) + o). Per-sample cost falls with batch size
on a CPU, so the model uses the measured f(B), not NFE alone. ``flop_ratio`` is the batch-size-blind count
(NFE + 3 x trained trajectory-steps, a backward costing about twice a forward), the paper's kind of ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ARMS = ["flow_grpo", "ovf", "standard", "flash"]
from ..algorithm.noise import per_update_generator

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- building the pieces for a device
def build(device: str, bf16: bool, sd35: bool, sd35_layers: int | None = None, model: str = "flow"):
    """(task, policy) for the digits task (``model``: its flow or diffusion model) or an
    SD3.5-Medium-size random model (``SD3Task``)."""
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if sd35:
        from ..adapters.sd3 import SD3Task

        task = SD3Task.sd35_medium(sd35_layers, bf16=bf16)
        return task, task.policy(device)
    from ..digits import DigitsTask

    task = DigitsTask(model=model)
    policy = task.policy(device)
    return task, (_Autocast(policy, torch.bfloat16) if bf16 else policy)


def model_of(arm: str) -> str:
    """Which digits model an arm samples: "diffusion" for the DDIM arms, else "flow"."""
    from ..algorithm.samplers import DDIM
    from ..machinery.config import ARMS

    return "diffusion" if isinstance(ARMS[arm].get("sampler"), DDIM) else "flow"


class _Autocast(torch.nn.Module):
    """Run a velocity model under autocast; return fp32 (the SDE math stays fp32)."""

    def __init__(self, model, dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x, t, prompts):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x, t, prompts).float()


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_mb(device) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class _CountingTask:
    """The task, with its reward calls counted (previews + final samples)."""

    def __init__(self, task):
        self.task, self.samples = task, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def reward(self, images, prompts):
        self.samples += len(images)
        return self.task.reward(images, prompts)


# ---------------------------------------------------------------- one epoch of one arm (subprocess)
def run_epoch(arm, device, bf16, sd35, sd35_layers, prompts, updates, warmup, seed) -> dict:
    from ..algorithm.grpo import group_advantages
    from ..algorithm.rollout import NFECounter
    from ..machinery.config import arm_config
    from ..machinery.trainer import collect, optimise

    task, model = build(device, bf16, sd35, sd35_layers, model_of(arm))
    cfg = arm_config(arm, prompts_per_update=prompts, device=device, seed=seed, progress=False)
    counter, reward = NFECounter(model), _CountingTask(task)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    times = {"sampling_s": [], "optimisation_s": []}
    final_samples = 0
    for u in range(warmup + updates):
        if u == warmup:
            counter.nfe, reward.samples = 0, 0
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
        _sync(device); t0 = time.perf_counter()
        gen = per_update_generator(seed, u + 1)
        ro, R = collect(counter, reward, cfg, u + 1, gen)
        _sync(device); t1 = time.perf_counter()
        optimise(model, None, optimizer, ro, group_advantages(R, cfg.adv_eps, cfg.global_std, cfg.adv_clip), cfg, gen)
        _sync(device); t2 = time.perf_counter()
        if u >= warmup:
            times["sampling_s"].append(t1 - t0)
            times["optimisation_s"].append(t2 - t1)
            final_samples += cfg.prompts_per_update * cfg.schedule.final_size
    n = prompts * updates
    # epoch seconds = updates x the median update: robust to a transient slow spell of a shared machine
    sampling, optimisation = (updates * statistics.median(times[k]) for k in ("sampling_s", "optimisation_s"))
    return {"method": arm, "nfe_per_prompt": counter.nfe / n,
            "preview_evals_per_prompt": (reward.samples - final_samples) / n,
            "trained_per_prompt": cfg.trained_group_size,
            "sampling_s": sampling, "optimisation_s": optimisation,
            "total_s": sampling + optimisation, "peak_mem_mb": _peak_mb(device)}


def run_interleaved(arms, device, bf16, sd35, sd35_layers, prompts, rounds, seed, progress=None) -> dict:
    """Time every arm in one process, one update per arm per round, the order rotating each round, so
    a slow spell of the shared machine hits all arms alike. Each arm trains its own copy of the model,
    except with ``sd35``: one SD3.5-Medium-size model (with its Adam state: about 40 GB in fp32) is all a
    GPU holds, so the arms take turns training the same one (a random model's weights do not change the
    cost of an update). Returns ``{arm: {"sampling_s": [per round], "optimisation_s": [per round]}}``
    (after one warm-up round)."""
    from ..algorithm.grpo import group_advantages
    from ..machinery.config import arm_config
    from ..machinery.trainer import collect, optimise

    state, shared = {}, None
    for arm in arms:
        cfg = arm_config(arm, prompts_per_update=prompts, device=device, seed=seed, progress=False)
        if shared is None:
            task, model = build(device, bf16, sd35, sd35_layers, model_of(arm))
            pieces = (model, task, torch.optim.Adam(model.parameters(), lr=cfg.lr))
            shared = pieces if sd35 else None  # one model at a time
        else:
            pieces = shared
        model, task, optimizer = pieces
        state[arm] = (model, task, cfg, optimizer)
    times = {arm: {"sampling_s": [], "optimisation_s": []} for arm in arms}
    for r in range(rounds + 1):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:
            model, task, cfg, optimizer = state[arm]
            gen = per_update_generator(seed, r + 1)
            _sync(device); t0 = time.perf_counter()
            ro, R = collect(model, task, cfg, r + 1, gen)
            _sync(device); t1 = time.perf_counter()
            optimise(model, None, optimizer, ro, group_advantages(R, cfg.adv_eps, cfg.global_std, cfg.adv_clip), cfg, gen)
            _sync(device); t2 = time.perf_counter()
            if r > 0:  # round 0 warms up
                times[arm]["sampling_s"].append(t1 - t0)
                times[arm]["optimisation_s"].append(t2 - t1)
        if progress is not None:
            progress.update()
    return times


# ---------------------------------------------------------------- calibration for the cost model (subprocess)
def _median_time(fn, device, reps):
    fn(); _sync(device)
    times = []
    for _ in range(reps):
        _sync(device); t = time.perf_counter(); fn(); _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def calibrate(device, bf16, sd35, sd35_layers, prompts, reps) -> dict:
    """Seconds, at each batch size B an arm uses: f(B) one sampling step (forward + SDE step),
    r(B) one reward call, g(B) one trained step (re-scored log-prob, clipped loss, backward); and o,
    one optimizer step (gradient clip + Adam step + zero_grad), which does not depend on B.
    All items are timed round-robin, ``reps`` rounds, medians: like the arms, they share slow spells."""
    from ..algorithm.grpo import clipped_policy_loss, step_log_prob
    from ..algorithm.samplers import FlowSDE
    from ..machinery.config import arm_config

    task, model = build(device, bf16, sd35, sd35_layers)
    reward_fn, shape, sampler = task.reward, task.latent_shape, FlowSDE(10, 0.7)
    plans = {arm: arm_config(arm, prompts_per_update=prompts) for arm in ARMS}
    fwd_sizes = sorted({prompts * g for c in plans.values() for g in c.schedule.group_sizes})
    opt_sizes = sorted({prompts * c.trained_group_size // c.num_minibatches for c in plans.values()})
    items = {}  # (table, batch size) -> a closure to time

    def sampling_step(x, c):
        with torch.no_grad():
            v = model(x, sampler.model_time(3).to(device).expand(len(x)), c)
            sampler.step(v, x, 3)

    def trained_step(lat, c, old, adv):
        lp = step_log_prob(model, sampler, lat, c, 3).log_prob
        clipped_policy_loss(lp, old, adv, 1e-3)[0].mean().backward()

    for B in fwd_sizes:
        x, c = torch.randn(B, *shape, device=device), torch.randint(10, (B,), device=device)
        items[("f", B)] = lambda x=x, c=c: sampling_step(x, c)
        items[("r", B)] = lambda x=x, c=c: reward_fn(x, c)
    for B in opt_sizes:
        lat, c = torch.randn(B, 11, *shape, device=device), torch.randint(10, (B,), device=device)
        items[("g", B)] = lambda lat=lat, c=c, B=B: trained_step(lat, c, torch.zeros(B, device=device), torch.randn(B, device=device))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    items[("o", 0)] = optimizer_step

    samples = {key: [] for key in items}
    for r in range(reps + 1):
        for key, fn in items.items():
            _sync(device); t = time.perf_counter(); fn(); _sync(device)
            if r > 0:  # round 0 warms up
                samples[key].append(time.perf_counter() - t)
    out = {"f": {}, "g": {}, "r": {}}
    for (table, B), ts in samples.items():
        if table == "o":
            out["o"] = statistics.median(ts)
        else:
            out[table][str(B)] = statistics.median(ts)  # JSON keys are strings
    return out


def predict(arm: str, cal: dict, prompts: int, updates: int) -> dict:
    from ..machinery.config import arm_config

    cfg = arm_config(arm, prompts_per_update=prompts)
    s = cfg.schedule
    bounds = (0, *s.prune_steps, s.num_steps)
    f, r, g = (lambda B, k=k: cal[k][str(B)] for k in ("f", "r", "g"))  # JSON keys are strings
    sampling = sum((b - a) * f(prompts * G) for G, a, b in zip(s.group_sizes, bounds, bounds[1:]))
    sampling += sum(r(prompts * G) for G in s.group_sizes[:-1]) + r(prompts * s.final_size)
    mb = prompts * cfg.trained_group_size // cfg.num_minibatches
    optimisation = cfg.num_minibatches * (cfg.trained_steps * g(mb) + cal["o"])
    flops = s.nfe() + 3 * cfg.trained_group_size * cfg.trained_steps
    return {"sampling_s": updates * sampling, "optimisation_s": updates * optimisation,
            "total_s": updates * (sampling + optimisation), "flop_units": flops}


# ---------------------------------------------------------------- scaling of sampling cost
def noise_cost(device, bf16, prompts=4, reps=20) -> dict:
    """What the per-trajectory noise streams (``noise.TrajectoryNoise``) cost, against one generator
    drawing the same numbers in one call, as a fraction of the arm's sampling time (rollout +
    rewards), for Flow-GRPO (24 trajectories per prompt) and Standard (48 at the start). Medians of
    ``reps`` interleaved rounds."""
    from ..algorithm.noise import TrajectoryNoise
    from ..machinery.config import arm_config
    from ..machinery.trainer import collect

    task, model = build(device, bf16, False)
    out = {}
    for arm in ("flow_grpo", "standard"):
        cfg = arm_config(arm, prompts_per_update=prompts, device=device, progress=False)
        G, T = cfg.schedule.group_sizes[0], cfg.schedule.num_steps
        single = torch.Generator().manual_seed(0)
        fns = {"sampling_s": lambda: collect(model, task, cfg, 1, per_update_generator(0, 1)),
               "streams_s": lambda: TrajectoryNoise(0, 1).draws(prompts, G, T + 1, task.latent_shape),
               "one_generator_s": lambda: torch.randn((prompts, G, T + 1, *task.latent_shape), generator=single)}
        times = {k: [] for k in fns}
        for r in range(reps + 1):
            for k, fn in fns.items():
                _sync(device); t = time.perf_counter(); fn(); _sync(device)
                if r > 0:
                    times[k].append(time.perf_counter() - t)
        row = {k: statistics.median(v) for k, v in times.items()}
        row["overhead_fraction"] = (row["streams_s"] - row["one_generator_s"]) / row["sampling_s"]
        out[arm] = row
    return out


def scaling(device, bf16, prompts=4, reps=5) -> dict:
    """Median seconds of one rollout (sampling only) for G in (24, 48, 96) at T = 10 and T in (10, 20, 40) at G = 24."""
    from ..algorithm.rollout import rollout
    from ..algorithm.samplers import FlowSDE

    task, model = build(device, bf16, False)
    p = torch.arange(prompts, device=device) % 10
    res = {"group": {}, "steps": {}}
    for G in (24, 48, 96):
        res["group"][G] = _median_time(lambda: rollout(model, FlowSDE(10), p, G, latent_shape=task.latent_shape), device, reps)
    for T in (10, 20, 40):
        res["steps"][T] = _median_time(lambda: rollout(model, FlowSDE(T), p, 24, latent_shape=task.latent_shape), device, reps)
    return res


def plot_scaling(res: dict, path: Path, device_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, key, xlabel in ((axes[0], "group", "group size G (T = 10)"), (axes[1], "steps", "sampling steps T (G = 24)")):
        xs = [int(k) for k in res[key]]
        ys = [res[key][k] * 1000 for k in res[key]]
        ax.plot(xs, ys, "o-", label="measured")
        ax.plot(xs, [ys[0] * x / xs[0] for x in xs], "k:", label="linear from the first point")
        ax.set(xlabel=xlabel, ylabel="ms per rollout (4 prompts)", xticks=xs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Sampling cost of the tiny model, {device_name}, median of 5")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- driver
def _subprocess(task: dict, threads: int) -> dict:
    code = f"import json, torch; torch.set_num_threads({threads}); from progrpo_ref.study import bench; print('RESULT' + json.dumps(bench._task({task!r})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"benchmark subprocess failed:\n{out.stderr[-3000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _task(task: dict) -> dict:
    kind = task.pop("kind")
    return {"epoch": run_epoch, "calibrate": calibrate}[kind](**task)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(rows: list[dict], header: str) -> str:
    cols = ["method", "nfe_per_prompt", "preview_evals_per_prompt", "trained_per_prompt", "sampling_s", "optimisation_s",
            "total_s", "peak_mem_mb", "sampling_ratio", "optimisation_ratio", "total_ratio", "model_ratio", "flop_ratio"]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) and abs(v) < 100 else (f"{v:.0f}" if isinstance(v, float) else str(v))
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 timed rounds, fewer calibration reps")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved rounds of one update per arm (medians reported)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts per update")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the policy (SDE math stays fp32)")
    ap.add_argument("--sd35", action="store_true", help="a random SD3.5-Medium-size transformer at 512 px latents")
    ap.add_argument("--sd35-layers", type=int, default=None, help="fewer transformer layers (smoke tests only)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads in each subprocess")
    ap.add_argument("--json", type=Path, help="write the per-arm results as a JSON list")
    ap.add_argument("--markdown", type=Path, help="write the Markdown table here too")
    ap.add_argument("--scaling", type=Path, help="also time sampling against G and T and save the plot here")
    ap.add_argument("--scaling-only", action="store_true", help="only the scaling plot (to --scaling or figures/)")
    ap.add_argument("--noise-cost", action="store_true", help="only the cost of the per-trajectory noise streams")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds, reps = (2, 5) if args.quick else (args.rounds, 30)
    common = dict(device=args.device, bf16=args.bf16, sd35=args.sd35, sd35_layers=args.sd35_layers)
    name = device_name(args.device)

    def report_noise(nc):
        for arm, r in nc.items():
            print(f"noise streams, {arm}: {r['streams_s'] * 1e3:.2f} ms per update against {r['one_generator_s'] * 1e3:.2f} ms "
                  f"from one generator, {r['overhead_fraction']:.1%} of its sampling time ({r['sampling_s'] * 1e3:.1f} ms)")

    if args.noise_cost:
        report_noise(noise_cost(args.device, args.bf16, args.prompts))
        return

    if args.scaling or args.scaling_only:
        path = args.scaling or REPO / "figures" / "bench_scaling.png"
        res = scaling(args.device, args.bf16)
        scaled = {k: {str(n): t for n, t in v.items()} for k, v in res.items()}  # for the JSON
        plot_scaling(res, path, name)
        g, t = res["group"], res["steps"]
        print(f"sampling scaling ({name}): G 24 -> 48 -> 96: {g[24] * 1e3:.0f} -> {g[48] * 1e3:.0f} -> {g[96] * 1e3:.0f} ms "
              f"({g[96] / g[24]:.2f}x for 4x the trajectories); T 10 -> 20 -> 40: {t[10] * 1e3:.0f} -> {t[20] * 1e3:.0f} -> "
              f"{t[40] * 1e3:.0f} ms ({t[40] / t[10]:.2f}x for 4x the steps); plot: {path}")
        if args.scaling_only:
            return

    from tqdm.auto import tqdm

    bar = tqdm(total=len(ARMS) + rounds + 2, desc="bench")
    counts = {}  # measured counts and peak memory: one short subprocess per arm
    for arm in ARMS:
        counts[arm] = _subprocess(dict(kind="epoch", arm=arm, prompts=args.prompts, updates=1, warmup=1, seed=0, **common), args.threads)
        bar.update()
    times = run_interleaved(ARMS, prompts=args.prompts, rounds=rounds, seed=0, progress=bar, **common)
    cal = _subprocess(dict(kind="calibrate", prompts=args.prompts, reps=reps, **common), args.threads)
    bar.update(); bar.close()

    pred = {arm: predict(arm, cal, args.prompts, 1) for arm in ARMS}
    rows = []
    for arm in ARMS:
        row = {k: counts[arm][k] for k in ("method", "nfe_per_prompt", "preview_evals_per_prompt", "trained_per_prompt")}
        for k in ("sampling", "optimisation"):  # seconds per update: median over rounds
            row[f"{k}_s"] = statistics.median(times[arm][f"{k}_s"])
        row["total_s"] = row["sampling_s"] + row["optimisation_s"]
        row["peak_mem_mb"] = counts[arm]["peak_mem_mb"]
        for k in ("sampling", "optimisation", "total"):  # median of ratios paired by round
            def per_round(a):
                if k == "total":
                    return [s_ + o for s_, o in zip(times[a]["sampling_s"], times[a]["optimisation_s"])]
                return times[a][f"{k}_s"]
            paired = sorted(x / y for x, y in zip(per_round(arm), per_round("flow_grpo")))
            row[f"{k}_ratio"] = statistics.median(paired)
            row[f"{k}_ratio_iqr"] = [paired[len(paired) // 4], paired[(3 * len(paired)) // 4]]
        row["model_ratio"] = pred[arm]["total_s"] / pred["flow_grpo"]["total_s"]
        row["model_sampling_ratio"] = pred[arm]["sampling_s"] / pred["flow_grpo"]["sampling_s"]
        row["model_optimisation_ratio"] = pred[arm]["optimisation_s"] / pred["flow_grpo"]["optimisation_s"]
        row["model_total_s"] = pred[arm]["total_s"]
        row["flop_ratio"] = pred[arm]["flop_units"] / pred["flow_grpo"]["flop_units"]
        row["rounds"] = rounds
        rows.append(row)
    rows[0]["calibration_s"] = cal  # the cost model's measured step costs, for the record
    if args.scaling:
        rows[0]["scaling"] = scaled
    if not args.sd35:
        rows[0]["noise_cost"] = noise_cost(args.device, args.bf16, args.prompts, 3 if args.quick else 20)
    header = (f"{'SD3.5-Medium-size random transformer, 512 px' if args.sd35 else 'tiny SD3 flow model'}, {name}, "
              f"{args.prompts} prompts per update; seconds per update, median of {rounds} interleaved rounds"
              f"{', bf16 autocast' if args.bf16 else ''}; {time.strftime('%Y-%m-%d')}")
    rows[0]["header"] = header
    table = markdown(rows, header)
    print(table)
    print()
    for r in rows[1:]:
        gap = r["total_ratio"] / r["model_ratio"] - 1
        lo, hi = r["total_ratio_iqr"]
        print(f"{r['method']:10s} measured total ratio {r['total_ratio']:.3f} (quartiles {lo:.3f}-{hi:.3f}), predicted {r['model_ratio']:.3f} "
              f"({gap:+.1%}); sampling {r['sampling_ratio']:.3f} vs {r['model_sampling_ratio']:.3f}, "
              f"optimisation {r['optimisation_ratio']:.3f} vs {r['model_optimisation_ratio']:.3f}")
    if "noise_cost" in rows[0]:
        report_noise(rows[0]["noise_cost"])
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")


if __name__ == "__main__":
    main()
