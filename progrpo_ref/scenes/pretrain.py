"""Pretraining the scenes' flow model by flow matching on rendered scenes of the training prompts.

    python -m progrpo_ref.scenes.pretrain            # the committed checkpoint (scenes/checkpoints/)
    python -m progrpo_ref.scenes.pretrain --steps 500 --out /tmp/probe.safetensors

Data: ``scenes_per_prompt`` renders of every training prompt (``grammar.TRAIN``; no held-out pair is ever drawn),
made once. Batches draw a category uniformly, then one of its prompts, then one of its renders, so that the six
categories weigh alike although ``position`` has most prompts. The prompt is dropped to ``NULL_PROMPT`` with
probability ``prompt_dropout`` (for classifier-free guidance). Loss, as the digits' flow model:
x_sigma = (1 - sigma) x0 + sigma eps, loss = || v_theta(x_sigma, sigma, c) - (eps - x0) ||^2, with sigma from SD3's
logit-normal (sigma = sigmoid(n), n ~ N(0, 1)). AdamW, one-cycle learning rate, EMA of the weights (what is saved).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from ..algorithm.rollout import sample
from ..algorithm.samplers import FlowSDE
from ..digits.pretrain import PretrainConfig as DigitsPretrainConfig, fit
from .checker import geneval_scores
from .grammar import CATEGORIES, SPECS, TRAIN
from .model import CHECKPOINT, NULL_PROMPT, SceneModel, SceneModelConfig
from .render import render
from .task import fixed_prompts


@dataclass
class PretrainConfig(DigitsPretrainConfig):
    """The digits' flow-matching settings (batch, learning rate, EMA, seed), with more steps and the scenes' data."""

    steps: int = 6000
    """optimizer steps"""
    scenes_per_prompt: int = 16
    """renders of each training prompt"""
    prompt_dropout: float = 0.1
    """probability of training on the empty prompt"""


def rendered_data(per_prompt: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 ``[N, 3, S, S]``, prompt ids ``[N]``) of ``per_prompt`` renders of every training prompt."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(TRAIN).repeat_interleave(per_prompt)
    images = torch.stack([render(SPECS[i], g, size)[0] for i in ids.tolist()])
    return ((images + 1) * 127.5).round().to(torch.uint8), ids


def pretrain(config: PretrainConfig = PretrainConfig(), model_config: SceneModelConfig | None = None,
             progress: bool = True) -> tuple[SceneModel, list[float]]:
    torch.manual_seed(config.seed)
    model = SceneModel(model_config)
    data, ids = rendered_data(config.scenes_per_prompt, model.config.image_size, config.seed)
    cats = torch.tensor([CATEGORIES.index(SPECS[i].category) for i in ids.tolist()])
    by_cat = [torch.nonzero(cats == c).flatten() for c in range(len(CATEGORIES))]
    by_cat = [r for r in by_cat if len(r)]
    g = torch.Generator().manual_seed(config.seed + 1)

    def batch_loss(m):
        cat = torch.randint(len(by_cat), (config.batch_size,), generator=g)
        row = torch.stack([by_cat[c][torch.randint(len(by_cat[c]), (), generator=g)] for c in cat.tolist()])
        x0 = data[row].float() / 127.5 - 1
        prompts = torch.where(torch.rand(len(row), generator=g) < config.prompt_dropout, NULL_PROMPT, ids[row])
        sigma = torch.sigmoid(torch.randn(len(row), generator=g))
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        return ((m((1 - s) * x0 + s * eps, sigma, prompts) - (eps - x0)) ** 2).mean()

    return fit(model, batch_loss, config, progress, "scenes flow matching")


def eval_prompts(per_category: int = 16, seed: int = 1234) -> dict[str, list[int]]:
    """The task's fixed evaluation prompts: ``per_category`` training prompts of each category, and held-out ones
    under ``heldout_<category>``."""
    held_out = fixed_prompts(per_category, seed, held_out=True)
    return {**fixed_prompts(per_category, seed, held_out=False), **{f"heldout_{c}": v for c, v in held_out.items()}}


@torch.no_grad()
def accuracy(model, prompts: dict[str, list[int]], per_prompt: int = 4, num_steps: int = 10, seed: int = 0) -> dict:
    """Strict accuracy and mean score of the checker per category: fixed-seed ODE samples (Euler, ``num_steps``)."""
    out = {}
    for k, (name, ids) in enumerate(prompts.items()):
        p = torch.tensor(ids).repeat_interleave(per_prompt)
        images = sample(model, FlowSDE(num_steps, noise_level=0.0), p, noise=seed + k,
                        latent_shape=(3, model.config.image_size, model.config.image_size))
        score, strict = geneval_scores(images.clamp(-1, 1), p)
        out[name] = {"strict": strict.float().mean().item(), "score": score.mean().item(), "n": len(p)}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps)
    parser.add_argument("--out", default=str(CHECKPOINT))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t = time.perf_counter()
    model, losses = pretrain(PretrainConfig(steps=args.steps))
    seconds = time.perf_counter() - t
    acc = accuracy(model, eval_prompts())
    for name, a in acc.items():
        print(f"{name:24s} strict {a['strict']:.3f}  score {a['score']:.3f}  (n={a['n']})")
    print(f"{model.num_parameters()} parameters, {args.steps} steps in {seconds:.0f} s, final loss "
          f"{sum(losses[-100:]) / 100:.4f}")
    from ..digits.serialization import save_module

    save_module(model, args.out, {"steps": str(args.steps), "seconds": f"{seconds:.0f}"})


if __name__ == "__main__":
    main()
