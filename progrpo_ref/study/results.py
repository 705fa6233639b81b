"""The study's numbers in one file, and the generated sections of the README and the docs.

Each notebook, when ``make reproduce`` rebuilds it, records what it measured under its own key of
``figures/results.json`` (``record``); any other run writes to a temporary file instead, so neither ``make test``
nor a reader's run touches committed results. The benchmark writes ``figures/bench_cpu.json``.
``python -m progrpo_ref.study.results`` rewrites the generated sections (between ``<!-- results:NAME -->`` and
``<!-- /results:NAME -->``) of ``README.md`` (the verdict and the learning path), ``docs/results.md`` (every table)
and ``docs/pipelines.md`` (the SD3.5-Medium costs) from those files; ``--check`` only reports whether they are up
to date (a test runs it).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from .analysis import verdict

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "figures" / "results.json"
BENCH = REPO / "figures" / "bench_cpu.json"
GPU = REPO / "figures" / "gpu_pipeline.json"  # written by study.pipeline_bench render, when a GPU has run it
README = REPO / "README.md"
DOCS_RESULTS = REPO / "docs" / "results.md"
DOCS_PIPELINES = REPO / "docs" / "pipelines.md"
PAGES = {README: ("verdict", "path"), DOCS_RESULTS: ("model", "rewards", "findings", "diffusion", "when", "scenes",
                                                    "bench"),
         DOCS_PIPELINES: ("gpu",)}
_QUICK = Path(tempfile.gettempdir()) / "progrpo_quick_results.json"


def results_path(committed: bool) -> Path:
    return RESULTS if committed else _QUICK


def record(notebook: str, values: dict, committed: bool) -> Path:
    """Store ``values`` (JSON-able) as the results of ``notebook``: in ``figures/results.json`` when ``make
    reproduce`` rebuilds the committed results, else in a temporary file; returns the file."""
    path = results_path(committed)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[notebook] = json.loads(json.dumps(values))  # fails early on anything JSON cannot hold
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def stats(values) -> dict:
    """Mean and std (n - 1) of a list of per-seed values."""
    v = [float(x) for x in values]
    mean = sum(v) / len(v)
    std = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else float("nan")
    return {"mean": mean, "std": std, "n": len(v)}


# ---------------------------------------------------------------- rendering
def _pm(d: dict) -> str:
    return f"{d['mean']:+.2f} +- {d['std']:.2f}"


def render_verdict(r: dict) -> str:
    """The README's bottom line, from notebooks 04, 05 and 07."""
    four, five, seven = r["04"], r["05"], r["07"]
    d, fid, nfe5 = four["diff"], four["fidelity"], five["nfe_per_prompt"]
    settings = [k.split(":")[0] for k in seven["verdict"] if k.endswith("OVF 12 of 48 vs Flow-GRPO 24")]
    head = "a=0.7" if "a=0.7" in settings else settings[0]  # Flow-GRPO's noise level, the headline setting
    late = seven["verdict"][f"{head}: late (6,8) vs paper (5,7)"]
    select = seven["verdict"][f"{head}: OVF 12 of 48 vs Flow-GRPO 24"]
    return "\n".join([
        f"- **Per update, Pro-GRPO trains worse than Flow-GRPO on our flow model:** Standard {_pm(d['standard'])}, "
        f"Flash {_pm(d['flash'])} in the evaluation margin ({d['standard']['n']} paired seeds, {four['updates']} updates), "
        f"in and out of domain. On our diffusion model it ties plain GRPO "
        f"({_pm(five['diff']['standard_sd14 vs dance_grpo'])}, within noise) at "
        f"{nfe5['standard_sd14'] / nfe5['dance_grpo']:.1f}x the network calls. Standard samples 1.35x Flow-GRPO's calls "
        f"and trains on half the trajectories; per second the arms' costs depend on the machine (docs/results.md).",
        f"- **Why:** once training narrows the groups, the previews at the paper's prune points stop ranking them: the "
        f"within-group Spearman correlation of preview and final reward at call 5 falls from {fid['pretrained']['5']:.2f} "
        f"on the pretrained model to {fid['trained']['5']:.2f} after training, so the first prune keeps survivors "
        f"almost at random.",
        f"- **What works:** later prune points train better ((6, 8) over the paper's (5, 7): {_pm(late)} at {head}), and "
        f"the best use of an expanded group is not to prune it: finish all 48 and keep 12 by OVF on the final rewards "
        f"({_pm(select)} over Flow-GRPO, at twice its network calls).",
        *([render_scenes_verdict(r["08"])] if "08" in r else []),
        "- **Unknown:** whether a real text-to-image policy keeps its previews faithful at mid-sampling. Our models are "
        "small (8x8 digits, 24x24 scenes); measure the fidelity on yours before trusting the paper's schedule (the "
        "recipe below)."])


def _noise(d: dict) -> str:
    return "beyond 2 se" if d["exceeds_2se"] else "within noise"


def render_scenes_verdict(e: dict) -> str:
    """The README's bullet on the scenes (notebook 08)."""
    d, fid = e["diff"], e["fidelity"]
    pre, trained = (fid[k] for k in list(fid)[:2])
    return (f"- **On compositional scenes** (notebook 08: a 24x24 text-to-image model with SD3's architecture, "
            f"GenEval's reward): the pretrained model satisfies {e['pretrained']['eval_accuracy']:.0%} of the evaluation's "
            f"training prompts and {e['pretrained']['eval_heldout_accuracy']:.0%} of its held-out ones. After "
            f"{e['updates']} updates ({e['seeds']} paired seeds), strict accuracy minus Flow-GRPO's: Standard "
            f"{_pm3(d['standard'])} ({_noise(d['standard'])}), Flash {_pm3(d['flash'])} ({_noise(d['flash'])}), "
            f"ovf_48 {_pm3(d['ovf_48'])} ({_noise(d['ovf_48'])}). Preview fidelity at call 5: {pre['5']:.2f} on the "
            f"pretrained model, {trained['5']:.2f} after Flow-GRPO.")


NOTEBOOKS_TAUGHT = {
    "00": ("Pro-GRPO from scratch", "GRPO over the denoising chain, the SDE policy, advantages, the clipped "
           "objective, OVF, Expand-and-Prune on one worked group; `minimal.py` checked equal to the package"),
    "01": ("The flow model and its rewards", "the toy model, ODE and SDE samples, rewards, the on-policy check, "
           "reward hacking and the KL"),
    "02": ("Reward clustering", "the paper's Observation 1 (Fig. 1 and 2) measured"),
    "03": ("Optimal Variance Filtering", "Observation 2: OVF 12 of 24 against the full group, k, simpler rules"),
    "04": ("Pro-GRPO against Flow-GRPO", "the main comparison per update, NFE and second; proxy fidelity; "
           "selection bias; the paper's Tables 5 and 6"),
    "05": ("Diffusion, and CPS", "the SD-v1.4-shaped arms on a diffusion UNet; Flow-GRPO's CPS sampler"),
    "06": ("Real pipelines", "the same `train()` on diffusers' SD3 and Stable Diffusion pipelines with LoRA"),
    "07": ("When to prune", "fidelity by step, sampler and noise level; why it falls; five schedules in two "
           "settings, an adaptive one among them"),
    "08": ("Scenes: a GenEval in miniature", "a text-to-image flow model on compositional scenes with GenEval's "
           "reward; the arms, held-out combinations and proxy fidelity where the layout decides the reward"),
}


def render_path(r: dict) -> str:
    """The learning path: each notebook, what it teaches, and what it cost to compute from nothing."""
    lines = ["| notebook | what it teaches | computed from nothing (2 cores) |", "|---|---|---|"]
    for key, (title, what) in NOTEBOOKS_TAUGHT.items():
        name = next((p.name for p in sorted((REPO / "notebooks").glob(f"{key}_*.ipynb"))), key)
        secs = r.get(key, {}).get("seconds")
        cost = f"{secs / 60:.0f} min" if secs and secs >= 90 else (f"{secs:.0f} s" if secs else "n/a")
        lines.append(f"| [{key} · {title}](notebooks/{name}) | {what} | {cost} |")
    return "\n".join(lines)


def render_model(r: dict) -> str:
    z = r["01"]
    c = z["classifiers"]
    return "\n".join([
        f"- {z['parameters']:,} parameters: a learned prompt encoder (a 4-token \"text\" sequence and a pooled vector per digit)",
        "  plus `SD3Transformer2DModel` (patch 2, 2 joint blocks, 2 heads x 32); timestep fed = sigma x 1000.",
        f"- Pretraining by flow matching, 4000 AdamW steps of batch 128, EMA 0.999: {z['pretrain_seconds']:.0f} s on 2 CPU cores "
        "(recorded in the checkpoint).",
        f"  10-step Euler ODE samples are classified as the requested digit in {z['sample_accuracy']:.1%} of 1000 samples "
        "(100 per digit, seed 0; the bar is 95%).",
        f"- Reward classifiers: a {c['reward']['kind'].upper()} ({c['reward']['parameters']:,} parameters, held-out accuracy "
        f"{c['reward']['heldout_accuracy']:.1%}) gives the training reward; an {c['heldout']['kind'].upper()} "
        f"({c['heldout']['parameters']:,} parameters, {c['heldout']['heldout_accuracy']:.1%}) trained from another seed "
        "scores out of domain (`margin_heldout`)."])


REWARD_NOTES = {
    "margin": "headline: requested logit minus best other", "prob": "classifier probability, saturates",
    "margin_heldout": "independent MLP, never trained on", "jpeg_incompressibility": "kB, DDPO, 8x nearest upscale",
}


def render_rewards(r: dict) -> str:
    z = r["01"]
    lines = ["| reward | mean | within-group std | \\|A\\| <= 0.25 | \\|A\\| <= 0.5 | real digit / blank / noise |",
             "|---|---|---|---|---|---|"]
    for row in z["rewards"]:
        name = f"**`{row['reward']}`**" if row["reward"] == z["headline"] else f"`{row['reward']}`"
        if row["reward"] in REWARD_NOTES:
            name += f" ({REWARD_NOTES[row['reward']]})"
        lines.append(f"| {name} | {row['mean']:.3f} | {row['within_std']:.3f} | {row['cluster_0.25']:.0%} | "
                     f"{row['cluster_0.5']:.0%} | {row['real']:.3f} / {row['blank']:.3f} / {row['noise']:.3f} |")
    return "\n".join(lines)


def render_findings(r: dict) -> str:
    one, two, three = r["02"], r["03"], r["04"]
    times = ", ".join(f"{k} {r[k]['seconds']:.0f} s" for k in ("01", "02", "03", "04"))
    f2, f3 = two["final"], three["final"]
    d2, d3 = two["diff"], three["diff"]
    c05, gauss = one["cluster"]["full group (24)"]["0.5"], one["gaussian"]["0.5"]
    shape = ("present, but Gaussian-shaped at our scale" if abs(c05 - gauss) < 0.03 else
             "present, more than in a Gaussian group" if c05 > gauss else "weaker than in a Gaussian group")
    random_like = "agrees" if not d2["random"]["exceeds_2se"] else "disagrees"
    rows = [
        ("rewards cluster near the group mean (Fig. 1)",
         f"{c05:.1%} of trajectories have \\|A\\| <= 0.5 (Gaussian: {gauss:.1%}); they cost {one['share']['compute']:.1%} "
         f"of compute and carry {one['share']['gradient']:.1%} of the summed \\|A\\|", shape),
        ("OVF 12 of 24 beats the full group (\"less is more\")",
         f"{f2['ovf']['mean']:.2f} vs {f2['flow_grpo']['mean']:.2f}, paired diff {_pm(d2['ovf'])} ({d2['ovf']['n']} seeds)",
         verdict(d2["ovf"], 1)),
        ("random 12 behaves like the full group",
         f"{f2['random']['mean']:.2f}, diff {_pm(d2['random'])} (a plain G = 12: {f2['g12']['mean']:.2f})", random_like),
        ("Pro-GRPO Standard beats Flow-GRPO (PickScore +0.69)",
         f"{f3['standard']['mean']:.2f} vs {f3['flow_grpo']['mean']:.2f}, diff {_pm(d3['standard'])} per update "
         f"({d3['standard']['n']} seeds)", verdict(d3["standard"], 1)),
        ("Pro-GRPO Flash beats Flow-GRPO (+0.40)",
         f"{f3['flash']['mean']:.2f}, diff {_pm(d3['flash'])} per update", verdict(d3["flash"], 1)),
        ("Pro-GRPO is cheaper for the same or better result",
         f"equal NFE: Standard {_pm(three['equal_nfe']['standard'])}, Flash {_pm(three['equal_nfe']['flash'])}; "
         f"equal seconds: Standard {_pm(three['equal_seconds']['standard'])}, Flash {_pm(three['equal_seconds']['flash'])}",
         "; ".join(f"{arm.capitalize()}: {verdict(three['equal_nfe'][arm], 1)} (NFE), "
                   f"{verdict(three['equal_seconds'][arm], 1)} (seconds)" for arm in ("standard", "flash"))),
        ("later prune points prune better (Table 6)",
         f"(6, 8): {f3['prune at 6,8']['mean']:.2f} vs (2, 4): {f3['prune at 2,4']['mean']:.2f}, diff "
         f"{_pm(d3['late vs early'])} ({d3['late vs early']['n']} seeds)", verdict(d3["late vs early"], 1)),
        ("larger start size helps, diminishing (Table 5)",
         f"32 / 48 / 64: {f3['start 32']['mean']:.2f} / {f3['start 48']['mean']:.2f} / {f3['start 64']['mean']:.2f}; "
         f"64 - 32: {_pm(d3['start 64 vs 32'])}", verdict(d3["start 64 vs 32"], 1)),
    ]
    fid = three["fidelity"]
    lines = [f"Measured times of the full profile on 2 cores: notebook {times}.", "",
             "| paper's claim | ours (selection-independent eval: margin of fixed-seed ODE samples) | verdict |",
             "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows], "",
             "Proxy fidelity, the within-group Spearman correlation between the preview's reward and the final reward "
             f"(`figures/04_proxy_fidelity.png`): at calls 5 and 7, {fid['pretrained']['5']:.2f} and {fid['pretrained']['7']:.2f} "
             f"on the pretrained model, {fid['trained']['5']:.2f} and {fid['trained']['7']:.2f} on a policy trained for "
             f"{three['updates']} updates with Standard."]
    return "\n".join(lines)


def render_diffusion(r: dict) -> str:
    """Notebook 05: the diffusion model, Pro-GRPO on it, and the flow model under SDE and CPS."""
    f = r["05"]
    m, fin, d = f["diffusion_model"], f["final"], f["diff"]
    nfe, fid = f["nfe_per_prompt"], f["fidelity"]
    dd, df = fid["diffusion"], fid["flow"]
    base, pro = fin["dance_grpo"], fin["standard_sd14"]
    sde_p, cps_p = df["pretrained, sde"], df["pretrained, cps"]
    sde_t, cps_t = df["trained (standard sde, seed 0), sde"], df["trained (standard cps, seed 0), cps"]
    sec = f["seconds_per_update"]
    from ..digits.pretrain import DIFFUSION_PRETRAIN

    rows = [
        ("Pro-GRPO beats plain GRPO on a diffusion model (SD-v1.4: HPSv2.1 0.391 vs 0.369)",
         f"{pro['mean']:.2f} vs {base['mean']:.2f}, paired diff {_pm(d['standard_sd14 vs dance_grpo'])} "
         f"({d['standard_sd14 vs dance_grpo']['n']} seeds, {f['updates']['diffusion']} updates)",
         verdict(d["standard_sd14 vs dance_grpo"], 1)),
        ("... for less compute",
         f"NFE per prompt {nfe['standard_sd14']:.0f} vs {nfe['dance_grpo']:.0f} ({nfe['standard_sd14'] / nfe['dance_grpo']:.2f}x); "
         f"clean seconds per update {sec['standard_sd14'] / sec['dance_grpo']:.2f}x; at equal NFE {_pm(f['equal_nfe'])}, "
         f"at equal seconds {_pm(f['equal_seconds'])}",
         f"{verdict(f['equal_nfe'], 1)} (NFE), {verdict(f['equal_seconds'], 1)} (seconds)"),
        ("Pro-GRPO beats Flow-GRPO under the SDE sampler (9 of 10 steps trained)",
         f"diff {_pm(d['standard vs flow_grpo']['sde'])} ({d['standard vs flow_grpo']['sde']['n']} seeds)",
         verdict(d["standard vs flow_grpo"]["sde"], 1)),
        ("... and under CPS (not in the paper)",
         f"diff {_pm(d['standard vs flow_grpo']['cps'])}", verdict(d["standard vs flow_grpo"]["cps"], 1)),
    ]
    return "\n".join([
        f"- The diffusion model: `UNet2DModel` (channels 16, 32; class embedding), {m['parameters']:,} parameters, DDPM's loss "
        f"on a linear schedule of 1000 steps, {DIFFUSION_PRETRAIN.steps} AdamW steps in {float(m['pretrain_seconds']):.0f} s on 2 cores; "
        f"20-step DDIM (eta = 0) samples are classified as the requested digit in {float(m['sample_accuracy']):.1%} "
        "of 1000 (the bar is 95%).",
        f"- Notebook 05 ran in {f['seconds']:.0f} s (full profile).", "",
        "| claim | ours (margin of fixed-seed deterministic samples) | verdict |", "|---|---|---|",
        *[f"| {a} | {b} | {c} |" for a, b, c in rows], "",
        f"Proxy fidelity on the diffusion model (Spearman of preview and final reward within groups; "
        f"`figures/05_diffusion_proxy_fidelity.png`): at the prune calls 12 and 16, {dd['pretrained']['12']:.2f} and "
        f"{dd['pretrained']['16']:.2f} on the pretrained model, {dd['trained']['12']:.2f} and {dd['trained']['16']:.2f} "
        f"on the policy trained with Pro-GRPO. Flow model at calls 5 and 7, SDE: {sde_p['5']:.2f} / {sde_p['7']:.2f} "
        f"pretrained, {sde_t['5']:.2f} / {sde_t['7']:.2f} trained; CPS: {cps_p['5']:.2f} / {cps_p['7']:.2f} pretrained, "
        f"{cps_t['5']:.2f} / {cps_t['7']:.2f} trained (`figures/05_sde_vs_cps.png`). Clip fractions (clip 1e-3): "
        + ", ".join(f"{k} {v:.3f}" for k, v in f["clip_frac"].items()) + "."])


def render_bench(b: list[dict]) -> str:
    from .bench import markdown

    by = {row["method"]: row for row in b}
    lines = [markdown(b, b[0]["header"]), ""]
    nfe = " / ".join(f"{by[m]['nfe_per_prompt']:.0f}" for m in ("standard", "flash", "flow_grpo"))
    lines.append(f"- Measured NFE per prompt (Standard / Flash / Flow-GRPO): {nfe}; previews reuse the step's velocity and add "
                 f"no network evaluation; they cost {by['standard']['preview_evals_per_prompt']:.0f} (Standard) and "
                 f"{by['flash']['preview_evals_per_prompt']:.0f} (Flash) reward calls per prompt.")
    gaps = ", ".join(f"{m} {by[m]['total_ratio']:.3f} vs {by[m]['model_ratio']:.3f} ({by[m]['total_ratio'] / by[m]['model_ratio'] - 1:+.1%})"
                     for m in ("ovf", "standard", "flash"))
    lines.append(f"- Measured total ratio to Flow-GRPO vs the cost model's prediction: {gaps}.")
    ovf, flow = by["ovf"], by["flow_grpo"]
    lines.append(f"- Static OVF costs {ovf['sampling_ratio']:.3f}x Flow-GRPO's sampling plus {ovf['optimisation_ratio']:.2f}x of its "
                 f"optimisation (the cost model: {ovf['model_optimisation_ratio']:.2f}x), not the naive 0.5x: on a CPU a mini-batch "
                 f"of half the trajectories costs more than half (per-call overhead), and optimisation is "
                 f"{flow['optimisation_s'] / flow['total_s']:.0%} of a Flow-GRPO update here.")
    if "scaling" in b[0]:
        g, t = b[0]["scaling"]["group"], b[0]["scaling"]["steps"]
        lines.append(f"- Sampling cost against size: 4x the group (24 -> 96) costs {g['96'] / g['24']:.2f}x, 4x the steps "
                     f"(10 -> 40) {t['40'] / t['10']:.2f}x (`figures/bench_scaling.png`; on a CPU the cost per sample "
                     "falls with the batch size, the cost per step does not).")
    if "noise_cost" in b[0]:
        nc = b[0]["noise_cost"]
        lines.append(f"- The per-trajectory noise streams (`algorithm/noise.py`) cost {nc['flow_grpo']['overhead_fraction']:.1%} (Flow-GRPO) and "
                     f"{nc['standard']['overhead_fraction']:.1%} (Standard) of sampling time, against one generator drawing the same numbers.")
    return "\n".join(lines)


def render_gpu(gpu: list[dict] | None) -> str:
    """The pipeline arms at SD3.5-Medium size: the FLOPs counted by ``pipeline_costs`` (no GPU needed), and the
    GPU timings of ``pipeline_bench`` (``figures/gpu_pipeline.json``) once a GPU has run them."""
    from .pipeline_bench import table
    from .pipeline_costs import flop_table, per_pass_flops

    pp = per_pass_flops(cfg=True, lora=True)
    lines = ["FLOPs of one update per prompt at SD3.5-Medium size (512 px, guidance 4.5 so 2 rows per network pass, LoRA, "
             "beta > 0, 9 of 10 steps trained), counted by `python -m progrpo_ref.study.pipeline_costs --beta 0.001`: "
             "each network's FLOPs measured with `FlopCounterMode` on a model built on the `meta` device, times the "
             "counts that follow from each arm's schedule.", "",
             flop_table(beta=0.001, per_pass=pp), "",
             f"Per sample: network forward {pp['network_forward'] / 1e12:.2f} TFLOPs and LoRA backward "
             f"{pp['network_backward'] / 1e12:.2f} (2 rows), VAE decode at 512 px {pp['vae_decode'] / 1e12:.2f}, a "
             f"PickScore-size reward call {pp['reward'] / 1e12:.2f}.", ""]
    if gpu:
        lines += ["Measured on a GPU by `python -m progrpo_ref.study.pipeline_bench run` (then `render`):", "", table(gpu)]
    else:
        lines.append("**GPU timings: not measured yet.** No GPU has run `python -m progrpo_ref.study.pipeline_bench run "
                     "--device cuda --out DIR` for this project; its CPU rehearsal (1 layer, 64 px) is all that has run.")
    return "\n".join(lines)


def render_when(r: dict) -> str:
    """Notebook 07: proxy fidelity by call, why it falls, and the schedules compared in two settings."""
    w = r["07"]
    crit, second = w["criterion"], w["second_setting"]
    settings = [s for s in w["arms"] if s != second] + [second]  # the headline first (the file's keys are sorted)
    first = lambda keys, preferred: [k for k in preferred if k in keys] + sorted(k for k in keys if k not in preferred)

    def call_at(f: dict, x: float) -> int:  # the index of the call nearest the fraction x of the steps
        T = len(f["calls"]) + 1
        return min(range(len(f["calls"])), key=lambda i: abs(f["calls"][i] - x * T))

    def at(f: dict, fractions=(0.3, 0.5, 0.7, 0.9)) -> list[float]:  # rho at the same fractions of the steps
        return [f["rho"][call_at(f, x)] for x in fractions]

    acc = lambda v: "n/a" if v is None else f"{v:.2f}"

    screen = [f"| {n} | {' / '.join(f'{v:.2f}' for v in at(s['pretrained'], (0.5, 0.7)))} | "
              f"{' / '.join(f'{v:.2f}' for v in at(s['trained'], (0.5, 0.7)))} | {acc(s['trained']['accuracy'])} | "
              f"{s['eval_margin']:.2f} | {'yes' if s['passes'] else 'no'} |" for n, s in sorted(w["screen"].items(), reverse=True)]  # a=0.7 first
    fidelity = []
    for key in sorted(w["fidelity"], key=lambda k: ((settings + ["CPS", "DDIM"]).index(k.split("|")[0])
                                                    if k.split("|")[0] in settings + ["CPS", "DDIM"] else 99,
                                                    k.split("|")[1] != "pretrained", k)):
        f = w["fidelity"][key]
        setting, policy = key.split("|")
        mid = call_at(f, 0.5)
        fidelity.append(f"| {setting} | {policy} | {' / '.join(f'{v:.2f}' for v in at(f))} | "
                        f"{f['overlap'][mid]:.2f} ({f['chance']:.2f}) | {f['final_std']:.2f} | {acc(f['accuracy'])} |")
    spread = [f"{k}: raw fall {g['raw_fall']:+.2f}, left once the spread is fitted {g['b'][2]:+.2f} +- {g['se'][2]:.2f} "
              f"(slope on log spread {g['b'][1]:+.2f} +- {g['se'][1]:.2f}, {g['n']} groups)" for k, g in sorted(w["regression"].items(), key=lambda kv: (settings.index(kv[0].split(" call")[0])
                                                                      if kv[0].split(" call")[0] in settings else 99,
                                                                      int(kv[0].rsplit(" ", 1)[1])))]
    arms = first(list(w["arms"][settings[0]]), ["paper (5,7)", "late (6,8)", "adaptive", "adaptive 0.8", "ovf_48", "flow_grpo"])
    arm_rows = [f"| {a} | " + " | ".join(f"{w['arms'][s][a]['eval_margin']['mean']:.2f} +- {w['arms'][s][a]['eval_margin']['std']:.2f}"
                                         for s in settings) + " |" for a in arms]
    labels = first(list(dict.fromkeys(k.split(": ", 1)[1] for k in w["verdict"])),
                   ["paper (5,7) vs Flow-GRPO 24", "paper (5,7) vs OVF 12 of 48 on final rewards", "late (6,8) vs paper (5,7)",
                    "adaptive vs paper (5,7)", "adaptive, target 0.8 (exploratory) vs paper (5,7)", "OVF 12 of 48 vs Flow-GRPO 24"])
    equal = [f"- {s}: " + ", ".join(f"{a} {w['equal_seconds'][f'{s}: {a}']['mean']:+.2f} +- {w['equal_seconds'][f'{s}: {a}']['std']:.2f}"
                                     f" ({w['seconds_per_update'][f'{s}: {a}'] / w['seconds_per_update'][f'{s}: paper (5,7)']:.2f}x"
                                     " the seconds per update)" for a in arms if f"{s}: {a}" in w["equal_seconds"])
             for s in settings]
    verdicts = [f"| {lab} | " + " | ".join(
        f"{w['verdict'][f'{s}: {lab}']['mean']:+.2f} +- {w['verdict'][f'{s}: {lab}']['std']:.2f} "
        f"(se {w['verdict'][f'{s}: {lab}']['se']:.2f}): {w['verdict'][f'{s}: {lab}']['word']}" for s in settings) + " |"
        for lab in labels]
    seeds = ", ".join(f"{s}: {len(w['seeds'][s])} seeds" for s in settings)
    return "\n".join([
        f"Notebook 07 ran in {w['seconds']:.0f} s (full profile). The second setting, fixed before the comparison ran: **{second}**. The screen trained one Flow-GRPO run "
        f"(seed 0, {w['updates']} updates) per SDE noise level. The criterion: rho >= {crit['min_trained_fidelity']} at "
        f"call {crit['call']} on the trained policy, and held-out accuracy >= {crit['min_heldout_accuracy']}.", "",
        "| noise level | rho at calls 5 / 7, pretrained | trained | held-out accuracy, trained | eval margin, trained | meets |",
        "|---|---|---|---|---|---|", *screen, "",
        "Proxy fidelity (within-group Spearman of preview and final reward, 40 groups of 24) at 30 / 50 / 70 / 90% of "
        "the steps (flow calls 3 / 5 / 7 / 9, DDIM calls 6 / 10 / 14 / 18 of 20), the OVF overlap at the middle call "
        "against its chance level, the groups' final-reward std, and the held-out accuracy of the final samples "
        "(`figures/07_fidelity_by_step_and_sigma.png`):", "",
        "| setting | policy | rho at 30 / 50 / 70 / 90% | overlap at 50% (chance) | group std | held-out accuracy |",
        "|---|---|---|---|---|---|", *fidelity, "",
        "Why fidelity falls (rho_g = b_0 + b_1 log s_g + b_2 trained_g over pretrained and Flow-GRPO-trained groups; "
        "`figures/07_fidelity_vs_spread.png`):", "", *[f"- {x}" for x in spread], "",
        f"Final evaluation margin, mean +- std over seeds ({seeds}, {w['updates']} updates; `figures/07_arms.png`):", "",
        "| arm | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings), *arm_rows, "",
        "Paired differences in the final margin (mean +- std over seeds, se); 'helps' or 'hurts' needs |mean| > 2 se:", "",
        "| comparison | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings), *verdicts, "",
        "The same differences against the paper's prune points at equal seconds (each run's own sampling, optimisation "
        "and audit seconds, two runs sharing 2 cores; noisy), with each arm's seconds per update relative to the paper's:", "",
        *equal, "",
        "The adaptive schedule's audits (4 prompts x G_0 = 48, every 10 updates) were "
        + ", ".join(f"{w['audit_share'][s]['mean']:.0%} of its NFE in {s}" for s in settings) + "."])


def render_scenes(r: dict) -> str:
    """Notebook 08: the scene model's accuracy per category, the arms on it, proxy fidelity, the cost of an update."""
    e = r["08"]
    pre = e["pretrained"]
    cats = [k.removeprefix("eval_accuracy_") for k in pre if k.startswith("eval_accuracy_")]
    lines = ["Pretrained scene model: strict accuracy (GenEval's metric) of fixed-seed ODE samples per category.", "",
             "| category | training prompts | held-out prompts |", "|---|---|---|"]
    for c in cats:
        held = pre.get(f"eval_heldout_accuracy_{c}")
        lines.append(f"| {c} | {pre[f'eval_accuracy_{c}']:.2f} | {'' if held is None else f'{held:.2f}'} |")
    lines += [f"| all | {pre['eval_accuracy']:.2f} | {pre['eval_heldout_accuracy']:.2f} |", "",
              f"With classifier-free guidance 4 (two passes per sample): {e['pretrained_guidance4']:.2f} on training "
              "prompts.", "",
              f"GRPO with GenEval's reward, {e['updates']} updates of 4 prompts, {e['seeds']} paired seeds: final strict "
              "accuracy (mean +- std over seeds) and the paired difference to Flow-GRPO.", "",
              "| arm | training prompts | held-out prompts | minus Flow-GRPO | minus Flow-GRPO, held out |",
              "|---|---|---|---|---|"]
    for arm, f in e["final"].items():
        d, dh = e["diff"].get(arm), e["diff_heldout"].get(arm)
        lines.append(f"| {arm} | {f['mean']:.3f} +- {f['std']:.3f} | {e['final_heldout'][arm]['mean']:.3f} +- "
                     f"{e['final_heldout'][arm]['std']:.3f} | {'' if d is None else _pm3(d)} | "
                     f"{'' if dh is None else _pm3(dh)} |")
    lines += ["", "Proxy fidelity (within-group Spearman of preview and final GenEval reward) at calls 3 / 5 / 7 / 9:", ""]
    for name, f in e["fidelity"].items():
        lines.append(f"- {name}: " + " / ".join(f"{f[str(c)]:.2f}" for c in (3, 5, 7, 9)))
    digits = e["digits_seconds_per_update"]
    lines += ["", "Seconds per update on the machine that ran `make reproduce`: " + ", ".join(
        f"{arm} {s:.2f} s ({s / digits:.1f}x the digits' Flow-GRPO update)" for arm, s in e["seconds_per_update"].items())
        + "."]
    return "\n".join(lines)


def _pm3(d: dict) -> str:
    return f"{d['mean']:+.3f} +- {d['std']:.3f}"


def sections(results: dict, bench: list[dict], gpu: list[dict] | None = None) -> dict:
    return {"scenes": render_scenes(results), "verdict": render_verdict(results), "path": render_path(results), "model": render_model(results),
            "rewards": render_rewards(results), "findings": render_findings(results),
            "diffusion": render_diffusion(results), "when": render_when(results), "bench": render_bench(bench),
            "gpu": render_gpu(gpu)}


def regenerate(text: str, secs: dict) -> str:
    """The text with every generated section of ``secs`` replaced; each marker pair must exist once."""
    for name, body in secs.items():
        pattern = re.compile(rf"(<!-- results:{name} -->\n).*?(<!-- /results:{name} -->)", re.S)
        if len(pattern.findall(text)) != 1:
            raise ValueError(f"the page needs exactly one <!-- results:{name} --> ... <!-- /results:{name} --> pair")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


def regenerated_pages(secs: dict) -> dict:
    """``{page: (current text, regenerated text)}`` for every page with generated sections."""
    out = {}
    for page, names in PAGES.items():
        text = page.read_text()
        out[page] = (text, regenerate(text, {n: secs[n] for n in names}))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated section differs from the results")
    args = ap.parse_args(argv)
    gpu = json.loads(GPU.read_text()) if GPU.exists() else None
    secs = sections(json.loads(RESULTS.read_text()), json.loads(BENCH.read_text()), gpu)
    pages = regenerated_pages(secs)
    stale = [page.relative_to(REPO) for page, (old, new) in pages.items() if old != new]
    if args.check:
        if stale:
            print(f"{', '.join(map(str, stale))}: the generated sections differ from figures/results.json; "
                  "run python -m progrpo_ref.study.results")
            return 1
        print("the generated sections match the results files")
        return 0
    for page, (_, new) in pages.items():
        page.write_text(new)
    print(f"rewrote the generated sections of {', '.join(str(p.relative_to(REPO)) for p in PAGES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
