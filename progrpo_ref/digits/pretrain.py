"""Pretraining: the reward classifiers, then the flow model by flow matching (with an EMA).

    python -m progrpo_ref.digits.pretrain            # regenerates every committed checkpoint (< 5 min, 2 cores)
    python -m progrpo_ref.digits.pretrain --only flow

Flow matching (rectified flow): x0 ~ data, eps ~ N(0, I), sigma ~ U(0, 1),
x_sigma = (1 - sigma) x0 + sigma eps, loss = || v_theta(x_sigma, sigma, c) - (eps - x0) ||^2.
The EMA of the weights is what gets saved and loaded by default.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .serialization import save_module
from .classifier import CLASSIFIER_CHECKPOINTS, ClassifierConfig, heldout_accuracy, train_classifier
from .data import IMAGE_SHAPE, NUM_CLASSES, load_split
from .model import FLOW_CHECKPOINT, FlowModel, FlowModelConfig
from ..rollout import sample
from ..samplers import FlowSDE

CLASSIFIERS = {  # name -> (architecture, seed): two independent models
    "reward": (ClassifierConfig("cnn", 32), 0),
    "heldout": (ClassifierConfig("mlp", 256), 1),
}


@dataclass
class PretrainConfig:
    """Flow-matching pretraining of the small flow model."""

    steps: int = 4000
    """optimizer steps"""
    batch_size: int = 128
    """images per step"""
    lr: float = 1e-3
    """AdamW learning rate (cosine-decayed to 0)"""
    ema_decay: float = 0.999
    """EMA decay of the weights, warmed up as min(decay, (1 + n) / (10 + n))"""
    seed: int = 0
    """seed for initialisation, batches and noise"""


def flow_matching_loss(model, x0: torch.Tensor, prompts: torch.Tensor, generator=None) -> torch.Tensor:
    """Mean squared error between v_theta(x_sigma, sigma, c) and the target velocity eps - x0."""
    sigma = torch.rand(len(x0), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    s = sigma.view(-1, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps
    return ((model(x_sigma, sigma, prompts) - (eps - x0)) ** 2).mean()


def pretrain_flow(config: PretrainConfig = PretrainConfig(), device="cpu", progress=True) -> tuple[FlowModel, list[float]]:
    """Train a ``FlowModel`` by flow matching; returns (EMA model, loss per step)."""
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    x, y = load_split("train")
    model = FlowModel(FlowModelConfig()).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.05)
    losses = []
    for n in tqdm(range(config.steps), desc="flow matching", disable=not progress):
        idx = torch.randint(len(y), (config.batch_size,), generator=g)
        loss = flow_matching_loss(model, x[idx].to(device), y[idx].to(device), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        decay = min(config.ema_decay, (1 + n) / (10 + n))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), model.parameters()):
                pe.lerp_(p, 1 - decay)
        losses.append(loss.item())
    return ema.eval(), losses


@torch.no_grad()
def sample_accuracy(model, classifier, per_class: int = 100, num_steps: int = 10, seed: int = 0) -> float:
    """Fraction of ``per_class`` x 10 ODE samples (Euler, ``num_steps``) classified as their prompt."""
    device = next(model.parameters()).device
    prompts = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
    images = sample(model, FlowSDE(num_steps, noise_level=0.0), prompts, noise=seed, latent_shape=IMAGE_SHAPE)
    return (classifier(images.clamp(-1, 1)).argmax(-1) == prompts).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["classifiers", "flow"], help="regenerate only these checkpoints")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps, help="flow-matching steps")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    if args.only in (None, "classifiers"):
        for name, (cfg, seed) in CLASSIFIERS.items():
            t = time.perf_counter()
            clf = train_classifier(cfg, seed=seed, device=args.device)
            acc = heldout_accuracy(clf)
            save_module(clf, CLASSIFIER_CHECKPOINTS[name], {"heldout_accuracy": f"{acc:.4f}"})
            print(f"classifier {name}: {cfg.kind}, held-out accuracy {acc:.4f}, {time.perf_counter() - t:.1f} s")

    if args.only in (None, "flow"):
        from .classifier import load_classifier

        t = time.perf_counter()
        model, losses = pretrain_flow(PretrainConfig(steps=args.steps), device=args.device)
        seconds = time.perf_counter() - t
        acc = sample_accuracy(model, load_classifier("reward", device=args.device))
        save_module(model, FLOW_CHECKPOINT, {"sample_accuracy": f"{acc:.4f}", "pretrain_seconds": f"{seconds:.0f}",
                                             "final_loss": f"{sum(losses[-200:]) / 200:.4f}"})
        print(f"flow model: {model.num_parameters()} parameters, {seconds:.0f} s, "
              f"loss {sum(losses[-200:]) / 200:.4f}, 10-step ODE sample accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
