"""Pretraining the scenes' autoencoder, then its flow model by flow matching on the latents of rendered scenes.

    python -m progrpo_ref.scenes.pretrain            # every committed checkpoint (scenes/checkpoints/)
    python -m progrpo_ref.scenes.pretrain --only flow --steps 500 --out /tmp/probe.safetensors
    python -m progrpo_ref.scenes.pretrain --only attributes   # the learned reward and its twin

The learned reward and its twin (``attributes``) are trained last, on renders (not on the model's samples).

Data: ``scenes_per_prompt`` renders of every training prompt (``grammar.TRAIN``; no held-out pair is ever drawn),
made once. The autoencoder learns to reconstruct them (``autoencoder``'s loss); their latents are then computed
once, and the flow model learns those, as SD3 learns its VAE's latents. Flow-matching batches draw a category uniformly, then one of its prompts, then one of its renders, so that the six
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
from .autoencoder import AUTOENCODER_CHECKPOINT, AutoencoderConfig, SceneAutoencoder
from .model import CHECKPOINT, NULL_PROMPT, SceneModel, SceneModelConfig
from .render import render
from .task import fixed_prompts, load_autoencoder


@dataclass
class PretrainConfig(DigitsPretrainConfig):
    """The digits' flow-matching settings (batch, learning rate, EMA, seed), with more steps and the scenes' data."""

    steps: int = 6000
    """optimizer steps of the flow model"""
    autoencoder_steps: int = 1500
    """optimizer steps of the autoencoder (learning rate ``2 * lr``)"""
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


def pretrain_autoencoder(config: PretrainConfig, data: torch.Tensor, ae_config: AutoencoderConfig | None = None,
                         progress: bool = True) -> tuple[SceneAutoencoder, list[float]]:
    """The autoencoder on ``data`` (uint8 renders), its latents normalised over them (EMA weights)."""
    torch.manual_seed(config.seed)
    ae = SceneAutoencoder(ae_config)
    g = torch.Generator().manual_seed(config.seed + 2)

    def batch_loss(m):
        return m.raw_loss(data[torch.randint(len(data), (config.batch_size,), generator=g)].float() / 127.5 - 1, g)

    ae_config = DigitsPretrainConfig(config.autoencoder_steps, config.batch_size, 2 * config.lr, config.ema_decay,
                                     config.seed)
    ema, losses = fit(ae, batch_loss, ae_config, progress, "scenes autoencoder")
    ema.set_normalisation(data[torch.randperm(len(data), generator=g)[:4096]].float() / 127.5 - 1)
    return ema, losses


@torch.no_grad()
def encode_all(ae: SceneAutoencoder, data: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    return torch.cat([ae.encode(data[i:i + batch].float() / 127.5 - 1) for i in range(0, len(data), batch)])


def pretrain(config: PretrainConfig = PretrainConfig(), model_config: SceneModelConfig | None = None,
             autoencoder: SceneAutoencoder | None = None,
             progress: bool = True) -> tuple[SceneModel, SceneAutoencoder, list[float]]:
    """(flow model, autoencoder, flow-matching loss per step); the autoencoder is trained first unless given."""
    images, ids = rendered_data(config.scenes_per_prompt, 24 if autoencoder is None else
                                autoencoder.config.image_size, config.seed)
    if autoencoder is None:
        autoencoder, _ = pretrain_autoencoder(config, images, progress=progress)
    data = encode_all(autoencoder, images)
    torch.manual_seed(config.seed)
    model = SceneModel(model_config)
    cats = torch.tensor([CATEGORIES.index(SPECS[i].category) for i in ids.tolist()])
    by_cat = [torch.nonzero(cats == c).flatten() for c in range(len(CATEGORIES))]
    by_cat = [r for r in by_cat if len(r)]
    g = torch.Generator().manual_seed(config.seed + 1)

    def batch_loss(m):
        cat = torch.randint(len(by_cat), (config.batch_size,), generator=g)
        row = torch.stack([by_cat[c][torch.randint(len(by_cat[c]), (), generator=g)] for c in cat.tolist()])
        x0 = data[row]
        prompts = torch.where(torch.rand(len(row), generator=g) < config.prompt_dropout, NULL_PROMPT, ids[row])
        sigma = torch.sigmoid(torch.randn(len(row), generator=g))
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, 1, 1, 1)
        return ((m((1 - s) * x0 + s * eps, sigma, prompts) - (eps - x0)) ** 2).mean()

    model, losses = fit(model, batch_loss, config, progress, "scenes flow matching")
    return model, autoencoder, losses


def eval_prompts(per_category: int = 16, seed: int = 1234) -> dict[str, list[int]]:
    """The task's fixed evaluation prompts: ``per_category`` training prompts of each category, and held-out ones
    under ``heldout_<category>``."""
    held_out = fixed_prompts(per_category, seed, held_out=True)
    return {**fixed_prompts(per_category, seed, held_out=False), **{f"heldout_{c}": v for c, v in held_out.items()}}


@torch.no_grad()
def accuracy(model, autoencoder, prompts: dict[str, list[int]], per_prompt: int = 4, num_steps: int = 10,
             seed: int = 0) -> dict:
    """Strict accuracy and mean score of the checker per category: fixed-seed ODE samples (Euler, ``num_steps``),
    decoded."""
    out = {}
    for k, (name, ids) in enumerate(prompts.items()):
        p = torch.tensor(ids).repeat_interleave(per_prompt)
        latents = sample(model, FlowSDE(num_steps, noise_level=0.0), p, noise=seed + k,
                         latent_shape=autoencoder.latent_shape)
        score, strict = geneval_scores(autoencoder.decode(latents).clamp(-1, 1), p)
        out[name] = {"strict": strict.float().mean().item(), "score": score.mean().item(), "n": len(p)}
    return out


ATTRIBUTE_STEPS = 1000


def train_rewards(progress: bool = True) -> None:
    """The learned reward (a CNN on renders of the training prompts) and its twin (an MLP, another seed, renders of
    every prompt), saved where ``attributes.load_attribute_reward`` finds them."""
    from ..digits.serialization import save_module
    from .attributes import ATTRIBUTE_CHECKPOINTS, AttributeConfig, train_attributes
    from .grammar import PROMPTS

    for name, kind, ids, seed in (("reward", "cnn", TRAIN, 0), ("heldout", "mlp", list(range(len(PROMPTS))), 1)):
        t = time.perf_counter()
        model, losses = train_attributes(AttributeConfig(kind), ids, steps=ATTRIBUTE_STEPS, seed=seed, progress=progress)
        save_module(model, ATTRIBUTE_CHECKPOINTS[name], {"seconds": f"{time.perf_counter() - t:.0f}"})
        print(f"attributes {name} ({kind}): {ATTRIBUTE_STEPS} steps in {time.perf_counter() - t:.0f} s, final loss "
              f"{sum(losses[-50:]) / 50:.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["flow", "models", "attributes"],
                        help="flow: keep the committed autoencoder, train the flow model; models: the autoencoder and "
                             "the flow model; attributes: only the learned rewards")
    parser.add_argument("--steps", type=int, default=PretrainConfig.steps, help="flow-matching steps")
    parser.add_argument("--out", default=str(CHECKPOINT), help="where the flow model goes")
    parser.add_argument("--autoencoder-out", default=str(AUTOENCODER_CHECKPOINT))
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    from ..digits.serialization import save_module

    t = time.perf_counter()
    if args.only not in ("flow", "models"):
        train_rewards()
    if args.only == "attributes":
        return
    if args.only == "flow":
        ae = load_autoencoder()
    else:  # trained and saved first, on the same renders the flow model then learns
        config = PretrainConfig(steps=args.steps)
        ae, _ = pretrain_autoencoder(config, rendered_data(config.scenes_per_prompt, 24, config.seed)[0])
        save_module(ae, args.autoencoder_out)
        print(f"autoencoder: {config.autoencoder_steps} steps, saved to {args.autoencoder_out}")
    model, ae, losses = pretrain(PretrainConfig(steps=args.steps), autoencoder=ae)
    seconds = time.perf_counter() - t
    acc = accuracy(model, ae, eval_prompts())
    for name, a in acc.items():
        print(f"{name:24s} strict {a['strict']:.3f}  score {a['score']:.3f}  (n={a['n']})")
    print(f"{model.num_parameters()} parameters, {args.steps} steps in {seconds:.0f} s, final loss "
          f"{sum(losses[-100:]) / 100:.4f}")
    save_module(model, args.out, {"steps": str(args.steps), "seconds": f"{seconds:.0f}"})


if __name__ == "__main__":
    main()
