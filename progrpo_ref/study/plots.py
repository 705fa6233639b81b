"""Plotting helpers shared by the notebooks, and where their figures go.

``figure_dir(committed)``: ``figures/`` when ``make reproduce`` rebuilds the committed results; a temporary folder
otherwise (a reader's run, nbval's quick run), so that running a notebook never changes the work tree.
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
          "adaptive 0.8": "C9", "ovf_48": "C3", "dance_grpo": "C0", "standard_sd14": "C1"}


def current_profile(default: str = "full") -> str:
    """The notebook profile from the ``PROGRPO_PROFILE`` environment variable: "full" (the study's sizes; the
    default, what a reader gets) or "quick" (nbval's small sizes)."""
    profile = os.environ.get(PROFILE_ENV, default)
    if profile not in ("quick", "full"):
        raise ValueError(f"{PROFILE_ENV}={profile!r} must be 'quick' or 'full'")
    return profile


def figure_dir(committed: bool) -> Path:
    if committed:
        REPO_FIGURES.mkdir(exist_ok=True)
        return REPO_FIGURES
    global _TEMP_DIR
    if _TEMP_DIR is None:
        _TEMP_DIR = Path(tempfile.mkdtemp(prefix="progrpo_figures_"))
    return _TEMP_DIR


_TEMP_DIR = None


def save(fig, name: str, committed: bool) -> Path:
    """Save ``fig`` as ``<figure_dir(committed)>/<name>.png``."""
    path = figure_dir(committed) / f"{name}.png"
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


def plot_arms(ax, results: dict, key: str, x: str = "update", label_fmt: str = "{arm}", seconds_per_update: dict | None = None,
              colors: dict | None = None, bands: bool = True):
    """Mean over seeds (line) and min-max across seeds (band, in the line's colour; ``bands=False``: none) of ``key``
    for each arm.

    results: ``{arm: [history per seed]}``; ``seconds_per_update``: ``{arm: s}`` for ``x="seconds"``; ``colors``:
    ``{arm: colour}`` (default ``COLORS`` by the run's arm, else the next colour of the cycle, band included)."""
    for arm, hs in results.items():
        xs, vals = curve(hs, key, x, (seconds_per_update or {}).get(arm))
        color = (colors or {}).get(arm) or COLORS.get(arm) or COLORS.get(hs[0]["config"]["arm"])
        (line,) = ax.plot(xs, vals.mean(0), label=label_fmt.format(arm=arm, n=len(hs)), color=color)
        if bands and len(hs) > 1:
            ax.fill_between(xs, vals.min(0).values, vals.max(0).values, alpha=0.2, color=line.get_color(), lw=0)
    ax.grid(alpha=0.3)
    return ax


def plot_differences(ax, rows: dict, baseline: str, xlabel: str):
    """Paired differences as points with 2-se error bars, one row per comparison, and the baseline's zero line:
    ``rows`` ``{label: {"mean", "se"}}`` (``analysis.paired_difference``)."""
    labels = list(rows)
    means = [rows[k]["mean"] for k in labels]
    errors = [2 * rows[k]["se"] for k in labels]
    ax.errorbar(means, range(len(labels)), xerr=errors, fmt="o", color="C0", capsize=3)
    ax.axvline(0, color="gray", lw=1)
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set(xlabel=f"{xlabel} minus {baseline} (mean over paired seeds, bars 2 se)")
    ax.grid(axis="x", alpha=0.3)
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
