"""Pretraining: the reward classifiers, the flow model (flow matching) and the diffusion model (DDPM).

    python -m progrpo_ref.digits.pretrain                   # every committed checkpoint (about 5 min, 2 cores)
    python -m progrpo_ref.digits.pretrain --only flow       # or classifiers, or diffusion

Flow matching (rectified flow): x0 ~ data, eps ~ N(0, I), sigma ~ U(0, 1),
x_sigma = (1 - sigma) x0 + sigma eps, loss = || v_theta(x_sigma, sigma, c) - (eps - x0) ||^2.
DDPM (the diffusion model): t ~ U{0, ..., N - 1}, x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
loss = || eps_theta(x_t, t, c) - eps ||^2, alpha_bar from diffusers' ``DDPMScheduler``.
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
from .diffusion_model import DIFFUSION_CHECKPOINT, DiffusionModel, DiffusionModelConfig
from .model import FLOW_CHECKPOINT, FlowModel, FlowModelConfig
from ..algorithm.rollout import sample
from ..algorithm.samplers import FlowSDE, Sampler

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


DIFFUSION_PRETRAIN = PretrainConfig(steps=3000, lr=2e-3)  # about 3 minutes on 2 cores


def ddpm_loss(model, x0: torch.Tensor, prompts: torch.Tensor, alphas_cumprod: torch.Tensor, generator=None) -> torch.Tensor:
    """Mean squared error between eps_theta(x_t, t, c) and the noise eps (DDPM's simple loss)."""
    t = torch.randint(len(alphas_cumprod), (len(x0),), generator=generator)
    eps = torch.randn(x0.shape, generator=generator).to(x0.device)
    a = alphas_cumprod[t].view(-1, 1, 1, 1).to(x0.device)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    return ((model(x_t, t.to(x0.device), prompts) - eps) ** 2).mean()


def pretrain_flow(config: PretrainConfig = PretrainConfig(), device="cpu", progress=True) -> tuple[FlowModel, list[float]]:
    """Train a ``FlowModel`` by flow matching; returns (EMA model, loss per step)."""
    torch.manual_seed(config.seed)  # the initialisation
    return _pretrain(FlowModel(FlowModelConfig()), flow_matching_loss, config, device, progress, "flow matching")


def pretrain_diffusion(config: PretrainConfig = DIFFUSION_PRETRAIN, device="cpu", progress=True,
                       model_config: DiffusionModelConfig | None = None) -> tuple[DiffusionModel, list[float]]:
    """Train a ``DiffusionModel`` with DDPM's loss on ``DDPMScheduler``'s alphas_cumprod; returns (EMA model, losses)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(config.seed)  # the initialisation
    model = DiffusionModel(model_config or DiffusionModelConfig())
    cfg = dict(model.config.scheduler_config())
    alphas_cumprod = DDPMScheduler(**cfg).alphas_cumprod.float()

    def loss_fn(m, x0, prompts, g):
        return ddpm_loss(m, x0, prompts, alphas_cumprod, g)

    return _pretrain(model, loss_fn, config, device, progress, "DDPM")


def _pretrain(model, loss_fn, config: PretrainConfig, device, progress, desc):
    g = torch.Generator().manual_seed(config.seed)
    x, y = load_split("train")

    def batch_loss(m):
        idx = torch.randint(len(y), (config.batch_size,), generator=g)
        return loss_fn(m, x[idx].to(device), y[idx].to(device), g)

    return fit(model.to(device), batch_loss, config, progress, desc)


def fit(model, batch_loss, config: PretrainConfig, progress: bool = True, desc: str = "pretraining"):
    """``config.steps`` AdamW steps on ``batch_loss(model)`` (one-cycle learning rate), keeping an EMA of the weights,
    warmed up as min(decay, (1 + n) / (10 + n)); returns (EMA model in eval mode, loss per step)."""
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, config.lr, total_steps=config.steps, pct_start=0.05)
    losses = []
    for n in tqdm(range(config.steps), desc=desc, disable=not progress):
        loss = batch_loss(model)
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
def sample_accuracy(model, classifier, per_class: int = 100, num_steps: int = 10, seed: int = 0,
                    sampler: Sampler | None = None) -> float:
    """Fraction of ``per_class`` x 10 deterministic samples classified as their prompt: the flow
    model's Euler ODE with ``num_steps`` unless another (deterministic) ``sampler`` is given."""
    device = next(model.parameters()).device
    prompts = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
    sampler = sampler or FlowSDE(num_steps, noise_level=0.0)
    images = sample(model, sampler, prompts, noise=seed, latent_shape=IMAGE_SHAPE)
    return (classifier(images.clamp(-1, 1)).argmax(-1) == prompts).float().mean().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["classifiers", "flow", "diffusion"], help="regenerate only these checkpoints")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps, help="flow-matching steps")
    parser.add_argument("--diffusion-steps", type=int, default=DIFFUSION_PRETRAIN.steps, help="DDPM steps")
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

    if args.only in (None, "diffusion"):
        from dataclasses import replace

        from .classifier import load_classifier

        t = time.perf_counter()
        model, losses = pretrain_diffusion(replace(DIFFUSION_PRETRAIN, steps=args.diffusion_steps), device=args.device)
        seconds = time.perf_counter() - t
        acc = sample_accuracy(model, load_classifier("reward", device=args.device), sampler=model.sampler(20, eta=0.0))
        save_module(model, DIFFUSION_CHECKPOINT, {"sample_accuracy": f"{acc:.4f}", "pretrain_seconds": f"{seconds:.0f}",
                                                  "pretrain_steps": args.diffusion_steps,
                                                  "final_loss": f"{sum(losses[-200:]) / 200:.4f}"})
        print(f"diffusion model: {model.num_parameters()} parameters, {seconds:.0f} s, "
              f"loss {sum(losses[-200:]) / 200:.4f}, 20-step DDIM (eta = 0) sample accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
