r"""The learned reward: an attribute model's log-likelihood of the prompt, and its independently trained twin.

A small network reads a decoded image ``[B, 3, S, S]`` and predicts, for every (colour, shape) pair, a distribution
over how many such objects the image shows, ``p_{c,s}(n)`` for n = 0..4 (``[B, 6, 3, 5]``). Pairs are treated as
independent, so the number of a shape in any colour, N_{*,s} = sum_c N_{c,s}, has the convolution of its colours'
distributions. A prompt names objects O = {(s, c or *, n)}; its reward is their mean log-likelihood

    r(x, prompt) = 1/|O| sum_{(s, c, n) in O} log p(N_{c,s} = n | x)        (<= 0; 0 = certain)

smooth in the image, unlike the checker's counts. What it does not score: where the objects are (a position prompt
is scored on its two objects) and objects the prompt does not name (GenEval ignores those too).

Training: renders of the prompts (labels: the renderer's layout), light Gaussian noise on them, and one image in
eight blank or pure noise labelled empty, so that blank and noise images score low (tested). ``"reward"`` (a CNN) is
trained on renders of the training prompts only; its twin ``"heldout"`` (an MLP, another seed) on renders of every
prompt, held-out pairs included: it scores the out-of-domain evaluation, and no training step sees it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .grammar import COLORS, SHAPES, SPECS
from .model import check_prompt_ids

MAX_COUNT = 4
ATTRIBUTE_CHECKPOINTS = {name: Path(__file__).resolve().parent / "checkpoints" / f"attributes_{name}.safetensors"
                         for name in ("reward", "heldout")}


@dataclass
class AttributeConfig:
    """``kind``: "cnn" or "mlp"; ``width``: hidden width; ``image_size``: S."""

    kind: str = "cnn"
    width: int = 64
    image_size: int = 24


class AttributeModel(nn.Module):
    """Image ``[B, 3, S, S]`` in [-1, 1] -> count log-probabilities ``[B, 6 colours, 3 shapes, 5 counts]``."""

    def __init__(self, config: AttributeConfig | None = None):
        super().__init__()
        self.config = c = config or AttributeConfig()
        out = len(COLORS) * len(SHAPES) * (MAX_COUNT + 1)
        if c.kind == "cnn":
            self.net = nn.Sequential(
                nn.Conv2d(3, c.width // 2, 3, padding=1), nn.SiLU(),
                nn.Conv2d(c.width // 2, c.width, 4, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(c.width, c.width, 4, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
                nn.Linear(c.width * (c.image_size // 4) ** 2, 4 * c.width), nn.SiLU(), nn.Linear(4 * c.width, out))
        elif c.kind == "mlp":
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * c.image_size ** 2, 8 * c.width), nn.SiLU(),
                                     nn.Linear(8 * c.width, 4 * c.width), nn.SiLU(), nn.Linear(4 * c.width, out))
        else:
            raise ValueError(f"kind={c.kind!r} must be 'cnn' or 'mlp'")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.config.image_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"images have shape {tuple(getattr(images, 'shape', ()))}; expected [B, 3, {s}, {s}]")
        logits = self.net(images).view(len(images), len(COLORS), len(SHAPES), MAX_COUNT + 1)
        return logits.log_softmax(-1)


def count_labels(layout) -> torch.Tensor:
    """Pair counts ``[6, 3]`` (capped at 4) of a renderer's layout ``[(shape, colour, box)]``."""
    n = torch.zeros(len(COLORS), len(SHAPES), dtype=torch.long)
    for shape, colour, _ in layout:
        n[COLORS.index(colour), SHAPES.index(shape)] += 1
    return n.clamp(max=MAX_COUNT)


def _sum_log_probs(log_p: torch.Tensor) -> torch.Tensor:
    """Log-distribution of the sum of K independent counts, ``[B, K, 5]`` -> ``[B, 4 K + 1]`` (a convolution)."""
    p = log_p.exp()
    total = p[:, 0]
    for k in range(1, p.shape[1]):
        new = torch.zeros(len(p), total.shape[1] + MAX_COUNT, dtype=p.dtype, device=p.device)
        for j in range(MAX_COUNT + 1):
            new[:, j:j + total.shape[1]] += total * p[:, k, j:j + 1]
        total = new
    return total.clamp_min(1e-30).log()


def prompt_log_likelihood(count_log_probs: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """``r(x, prompt)`` of the module docstring: count log-probabilities ``[B, 6, 3, 5]``, prompt ids ``[B]`` ->
    ``[B]``."""
    check_prompt_ids(prompts)
    out = torch.zeros(len(prompts), device=count_log_probs.device)
    shape_totals = {}
    for b, pid in enumerate(prompts.tolist()):
        objects = SPECS[pid].objects
        for shape, colour, n in objects:
            s = SHAPES.index(shape)
            if colour is None:
                if s not in shape_totals:
                    shape_totals[s] = _sum_log_probs(count_log_probs[:, :, s])
                out[b] = out[b] + shape_totals[s][b, n]
            else:
                out[b] = out[b] + count_log_probs[b, COLORS.index(colour), s, min(n, MAX_COUNT)]
        out[b] = out[b] / len(objects)
    return out


class AttributeReward:
    """``reward(images [B, 3, S, S], prompts [B]) -> [B]``: a trained ``AttributeModel``'s prompt log-likelihood."""

    def __init__(self, model: AttributeModel):
        self.model = model.eval().requires_grad_(False)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        from .checker import check_images, check_prompts

        check_images(images)
        check_prompts(prompts, len(images))
        return prompt_log_likelihood(self.model(images.float()), prompts.cpu())


def train_attributes(config: AttributeConfig, prompt_ids: list[int], per_prompt: int = 8, steps: int = 1500,
                     seed: int = 0, progress: bool = True) -> tuple[AttributeModel, list[float]]:
    """Train an ``AttributeModel`` on ``per_prompt`` renders of each of ``prompt_ids`` (module docstring)."""
    from ..digits.pretrain import PretrainConfig, fit
    from .render import render

    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    for pid in prompt_ids:
        for _ in range(per_prompt):
            image, layout = render(SPECS[pid], g, config.image_size)
            images.append(image)
            labels.append(count_labels(layout))
    images, labels = torch.stack(images), torch.stack(labels)
    torch.manual_seed(seed)
    model = AttributeModel(config)

    def batch_loss(m):
        row = torch.randint(len(images), (128,), generator=g)
        x = (images[row] + 0.1 * torch.randn(images[row].shape, generator=g)).clamp(-1, 1)
        y = labels[row].clone()
        junk = torch.rand(len(row), generator=g) < 1 / 8  # blank, uniform or Gaussian noise: nothing in it
        kinds = torch.randint(3, (len(row),), generator=g)
        noise = [-torch.ones_like(x), torch.rand(x.shape, generator=g) * 2 - 1, torch.randn(x.shape, generator=g).clamp(-1, 1)]
        for k in range(3):
            x[junk & (kinds == k)] = noise[k][junk & (kinds == k)]
        y[junk] = 0
        return nn.functional.nll_loss(m(x).reshape(-1, MAX_COUNT + 1), y.flatten())

    return fit(model, batch_loss, PretrainConfig(steps=steps, lr=2e-3, seed=seed), progress, f"attributes ({config.kind})")


def load_attribute_reward(name: str = "reward", path=None) -> AttributeReward:
    """The committed ``"reward"`` model or its ``"heldout"`` twin, as a reward function."""
    from ..digits.serialization import load_module

    if name not in ATTRIBUTE_CHECKPOINTS:
        raise ValueError(f"name={name!r} must be one of {sorted(ATTRIBUTE_CHECKPOINTS)}")
    return AttributeReward(load_module(AttributeModel, AttributeConfig, path or ATTRIBUTE_CHECKPOINTS[name], "cpu",
                                       "python -m progrpo_ref.scenes.pretrain --only attributes"))
