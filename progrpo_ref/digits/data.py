"""The data: scikit-learn's bundled 8x8 handwritten digits, no download.

Images are scaled from 0..16 to [-1, 1] and shaped ``[N, 1, 8, 8]`` (one latent channel, 8x8
"latent" pixels); labels ``[N]`` are the digit classes 0-9, which play the role of text prompts.
The train / held-out split is fixed (a seeded permutation), so every checkpoint and evaluation in
the project sees the same images.
"""
from __future__ import annotations

import torch

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
HELDOUT_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: images ``[N, 1, 8, 8]`` float32 in [-1, 1], labels ``[N]`` long."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: nothing is downloaded

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    labels = torch.tensor(d.target, dtype=torch.long)
    return images, labels


def load_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed ``"train"`` (80%) or ``"heldout"`` (20%) part of the digits."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r} must be 'train' or 'heldout'")
    images, labels = load_digits_tensors()
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_heldout = int(round(HELDOUT_FRACTION * len(labels)))
    idx = perm[n_heldout:] if split == "train" else perm[:n_heldout]
    return images[idx], labels[idx]
