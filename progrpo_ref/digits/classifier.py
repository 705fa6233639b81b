"""Digit classifiers that the rewards are built on.

Two independently trained networks of different shape:
- ``"reward"``: a small CNN, the reward model GRPO trains against (its logits give the headline reward);
- ``"heldout"``: an MLP trained from another seed, never used for training, so it can score samples
  out of domain (the role ImageReward / Aesthetic play beside PickScore in the paper).
Both train on the train split with light Gaussian-noise augmentation, so that slightly noisy SDE
samples and one-step previews are still judged sensibly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from .data import NUM_CLASSES, load_split
from .model import CHECKPOINT_DIR, check_images

CLASSIFIER_CHECKPOINTS = {
    "reward": CHECKPOINT_DIR / "classifier_reward.safetensors",
    "heldout": CHECKPOINT_DIR / "classifier_heldout.safetensors",
}


@dataclass
class ClassifierConfig:
    """Architecture of a digit classifier."""

    kind: str = "cnn"
    """"cnn" (conv 32-64, two poolings) or "mlp" (two hidden layers)"""
    width: int = 32
    """channels of the first conv layer, or hidden width of the MLP"""


class DigitClassifier(nn.Module):
    """images ``[B, 1, 8, 8]`` in [-1, 1] -> logits ``[B, 10]``."""

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config = config or ClassifierConfig()
        w = config.width
        if config.kind == "cnn":
            self.net = nn.Sequential(
                nn.Conv2d(1, w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),          # [B, w, 4, 4]
                nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),      # [B, 2w, 2, 2]
                nn.Flatten(), nn.Linear(8 * w, 64), nn.SiLU(), nn.Linear(64, NUM_CLASSES),
            )
        elif config.kind == "mlp":
            self.net = nn.Sequential(
                nn.Flatten(), nn.Linear(64, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(), nn.Linear(w, NUM_CLASSES)
            )
        else:
            raise ValueError(f"classifier kind={config.kind!r} must be 'cnn' or 'mlp'")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images)
        return self.net(images)


def train_classifier(
    config: ClassifierConfig, epochs: int = 30, seed: int = 0, noise_std: float = 0.15, device="cpu"
) -> DigitClassifier:
    """Cross-entropy on the train split; inputs get N(0, noise_std^2) noise and are clamped to [-1, 1]."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_split("train")
    model = DigitClassifier(config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            xb = (x[idx] + noise_std * torch.randn(x[idx].shape, generator=g)).clamp(-1, 1)
            loss = F.cross_entropy(model(xb.to(device)), y[idx].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def heldout_accuracy(model: DigitClassifier) -> float:
    """Fraction of the held-out split classified correctly."""
    x, y = load_split("heldout")
    device = next(model.parameters()).device
    return (model(x.to(device)).argmax(-1).cpu() == y).float().mean().item()


def load_classifier(name: str = "reward", path: str | Path | None = None, device="cpu") -> DigitClassifier:
    """The committed classifier ``"reward"`` or ``"heldout"``, frozen, on ``device``."""
    from .serialization import load_module

    if name not in CLASSIFIER_CHECKPOINTS:
        raise ValueError(f"classifier {name!r} must be one of {sorted(CLASSIFIER_CHECKPOINTS)}")
    model = load_module(DigitClassifier, ClassifierConfig, path or CLASSIFIER_CHECKPOINTS[name], device)
    return model.requires_grad_(False)
