"""Plotting helpers shared by the notebooks, and where their figures go.

``figure_dir(profile)``: ``figures/`` for the full profile; a temporary folder for the quick profile,
so ``make test`` never overwrites committed figures.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from .analysis import curve

REPO_FIGURES = Path(__file__).resolve().parents[2] / "figures"
PROFILE_ENV = "PROGRPO_PROFILE"
COLORS = {"flow_grpo": "C0", "g12": "C7", "ovf": "C3", "random": "C2", "standard": "C1", "flash": "C4",
          "top": "C5", "split": "C6", "bottom": "C8", "paper (5,7)": "C1", "late (6,8)": "C5", "adaptive": "C2",
          "adaptive 0.8": "C9", "ovf_48": "C3"}


def current_profile(default: str = "quick") -> str:
    """The notebook profile from the ``PROGRPO_PROFILE`` environment variable ("quick" or "full")."""
    profile = os.environ.get(PROFILE_ENV, default)
    if profile not in ("quick", "full"):
        raise ValueError(f"{PROFILE_ENV}={profile!r} must be 'quick' or 'full'")
    return profile


def figure_dir(profile: str) -> Path:
    if profile == "full":
        REPO_FIGURES.mkdir(exist_ok=True)
        return REPO_FIGURES
    global _QUICK_DIR
    if _QUICK_DIR is None:
        _QUICK_DIR = Path(tempfile.mkdtemp(prefix="progrpo_figures_"))
    return _QUICK_DIR


_QUICK_DIR = None


def save(fig, name: str, profile: str) -> Path:
    """Save ``fig`` as ``<figure_dir>/<name>.png`` with the profile stamped in a corner."""
    fig.text(0.995, 0.005, f"profile: {profile}", ha="right", va="bottom", fontsize=7, color="gray")
    path = figure_dir(profile) / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def image_grid(images: torch.Tensor, ax=None, nrow: int | None = None, title: str | None = None):
    """Show images ``[N, 1, 8, 8]`` in [-1, 1] as a grid with ``nrow`` per row."""
    images = images.detach().clamp(-1, 1).cpu()
    n = len(images)
    nrow = nrow or int(n**0.5 + 0.999)
    ncol_rows = (n + nrow - 1) // nrow
    canvas = torch.ones(ncol_rows * 9 + 1, nrow * 9 + 1)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        canvas[1 + 9 * r : 9 * r + 9, 1 + 9 * c : 9 * c + 9] = img[0]
    ax = ax or plt.gca()
    ax.imshow(canvas, cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


def plot_arms(ax, results: dict, key: str, x: str = "update", label_fmt: str = "{arm}", seconds_per_update: dict | None = None):
    """Mean over seeds (line) and min-max across seeds (band) of ``key`` for each arm.

    results: ``{arm: [history per seed]}``; ``seconds_per_update``: ``{arm: s}`` for ``x="seconds"``."""
    for arm, hs in results.items():
        xs, vals = curve(hs, key, x, (seconds_per_update or {}).get(arm))
        color = COLORS.get(hs[0]["config"]["arm"], None)
        ax.plot(xs, vals.mean(0), label=label_fmt.format(arm=arm, n=len(hs)), color=color)
        if len(hs) > 1:
            ax.fill_between(xs, vals.min(0).values, vals.max(0).values, alpha=0.2, color=color)
    ax.grid(alpha=0.3)
    return ax


def rgb_grid(images: torch.Tensor, ax, nrow: int, title: str | None = None):
    """Show RGB images ``[N, 3, H, W]`` in [0, 1] as a grid with ``nrow`` per row (a pipeline's decoded samples)."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, _, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    canvas = torch.ones(3, rows * (h + 1) - 1, nrow * (w + 1) - 1)
    for k, img in enumerate(images):
        r, c = divmod(k, nrow)
        canvas[:, r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = img
    ax.imshow(canvas.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
