"""A rule-based checker in GenEval's manner: find the objects in an image, then score the prompt's requirements.

Finding objects (``detect``), for images ``[B, 3, S, S]`` in [-1, 1]:

1. each pixel takes the nearest of the palette's colours or the black background (Euclidean distance in RGB);
2. pixels of one colour that touch (4-neighbours) form a component; components smaller than ``MIN_AREA`` of a
   sprite's area are noise and ignored (GenEval's detector has a confidence threshold for the same reason);
3. a component's shape comes from its bounding box: a triangle is bottom-heavy (the rows of its lower half hold
   more than ``TRIANGLE_ASYMMETRY`` of its area beyond those of its upper half), a square fills its box (at least
   ``SQUARE_FILL``), anything else is a circle (a disc fills about pi / 4 of its box, 0.84 at 5 pixels).

Scoring (``check``), GenEval's training reward with its strict accuracy. Each requirement ``(shape, colour, n)``
adds a count entry 1 - |n - found| / n over the objects of its shape (any colour); where the count is right, a
colour entry 1 - |n - k| / n over the k of them with the right colour (if the prompt names one); where it is wrong,
a 0 for the colour. A ``position`` prompt adds one entry: 1 if both requirements are met and every object of the
first stands in the relation to every object of the second (``grammar.relations``), else 0. The score is the mean of
the entries (partial credit); the prompt is satisfied (strict) when every entry is 1. Objects the prompt does not
mention do not count against it, as in GenEval (which checks only named classes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .grammar import COLORS, PROMPTS, SPECS, Spec, relations
from .render import RGB, object_size

PALETTE = torch.tensor([(0.0, 0.0, 0.0)] + [RGB[c] for c in COLORS])  # [1 + colours, 3], index 0 the background
MIN_AREA = 0.3
SQUARE_FILL = 0.92
TRIANGLE_ASYMMETRY = 0.25


@dataclass(frozen=True)
class Found:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # (x0, y0, x1, y1), ends exclusive
    area: int


def check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != images.shape[3]:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape}: expected [B, 3, S, S]")
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise ValueError("images must be finite floating-point values in [-1, 1]")
    lo, hi = images.min().item(), images.max().item()
    if lo < -1.5 or hi > 1.5:  # samples and previews overshoot [-1, 1] a little and are clamped; far beyond is a bug
        raise ValueError(f"images range over [{lo:.3g}, {hi:.3g}]: expected [-1, 1] (a [0, 255] or [0, 1] image?)")


def colour_labels(images: torch.Tensor) -> torch.Tensor:
    """``[B, S, S]``: 0 for background, 1 + i for ``COLORS[i]`` (the nearest palette colour)."""
    rgb = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)  # [B, S, S, 3]
    return torch.cdist(rgb.reshape(-1, 3), PALETTE.to(rgb)).argmin(1).reshape(rgb.shape[:3])


def components(labels: torch.Tensor) -> torch.Tensor:
    """``[B, S, S]`` component ids (0 for background): pixels of one colour label joined through 4-neighbours, by
    propagating the largest pixel index until nothing changes."""
    B, H, W = labels.shape
    ids = torch.arange(1, H * W + 1).reshape(1, H, W).expand(B, H, W).clone() * (labels > 0)
    pad_l = F.pad(labels, (1, 1, 1, 1), value=-1)
    while True:
        pad_i = F.pad(ids, (1, 1, 1, 1))
        best = ids
        for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
            same = pad_l[:, dy:dy + H, dx:dx + W] == labels
            best = torch.maximum(best, torch.where(same & (labels > 0), pad_i[:, dy:dy + H, dx:dx + W], 0))
        if torch.equal(best, ids):
            return ids
        ids = best


def shape_from(area: torch.Tensor, h: torch.Tensor, w: torch.Tensor, top: torch.Tensor, bottom: torch.Tensor) -> list[str]:
    """Shapes of components from their areas, box sizes and the areas of their boxes' upper and lower halves."""
    triangle = (bottom - top) / area > TRIANGLE_ASYMMETRY
    square = area / (h * w) >= SQUARE_FILL
    return ["triangle" if t else "square" if q else "circle" for t, q in zip(triangle.tolist(), square.tolist())]


def detect(images: torch.Tensor) -> list[list[Found]]:
    """The objects in each image, largest first. Each component's area, box and half-box areas are reduced over its
    pixels in one pass for the whole batch."""
    check_images(images)
    images = images.detach().float().cpu()
    B, _, S, _ = images.shape
    labels = colour_labels(images)
    ids = components(labels)  # 1..S*S within an image, 0 for background
    flat = (ids + torch.arange(B).view(B, 1, 1) * (S * S + 1)).flatten()  # unique across the batch
    n = B * (S * S + 1)
    y, x = torch.meshgrid(torch.arange(S), torch.arange(S), indexing="ij")
    y, x = y.expand(B, S, S).flatten(), x.expand(B, S, S).flatten()
    area = torch.bincount(flat, minlength=n)
    x0 = torch.full((n,), S).scatter_reduce(0, flat, x, "amin")
    y0 = torch.full((n,), S).scatter_reduce(0, flat, y, "amin")
    x1 = torch.zeros(n, dtype=torch.long).scatter_reduce(0, flat, x + 1, "amax")
    y1 = torch.zeros(n, dtype=torch.long).scatter_reduce(0, flat, y + 1, "amax")
    colour = torch.zeros(n, dtype=torch.long).scatter_reduce(0, flat, labels.flatten(), "amax")
    h = (y1 - y0).clamp(min=1)
    top = torch.bincount(flat, weights=(y < y0[flat] + h[flat] // 2).double(), minlength=n)
    bottom = torch.bincount(flat, weights=(y >= y0[flat] + (h[flat] + 1) // 2).double(), minlength=n)
    keep = (area >= MIN_AREA * object_size(S) ** 2) & (torch.arange(n) % (S * S + 1) != 0)
    k = keep.nonzero().flatten()
    shapes = shape_from(area[k].double(), h[k].double(), (x1 - x0)[k].double(), top[k], bottom[k])
    out = [[] for _ in range(B)]
    for j, i in enumerate(k.tolist()):
        out[i // (S * S + 1)].append(Found(shapes[j], COLORS[colour[i].item() - 1],
                                           (x0[i].item(), y0[i].item(), x1[i].item(), y1[i].item()), area[i].item()))
    return [sorted(f, key=lambda f: -f.area) for f in out]


def check(spec: Spec, found: list[Found]) -> tuple[float, bool]:
    """(score, strict) of one image's objects against a prompt's spec (see the module's docstring)."""
    entries, met = [], []
    for shape, colour, n in spec.objects:
        mine = [f for f in found if f.shape == shape]
        entries.append(1 - abs(n - len(mine)) / n)
        ok = len(mine) == n
        if colour is not None:
            k = sum(f.colour == colour for f in mine)
            entries.append(1 - abs(n - k) / n if ok else 0.0)
            ok = ok and k == n
        met.append(mine if ok else None)
    if spec.relation is not None:
        holds = all(m is not None for m in met) and all(
            spec.relation in relations(a.box, b.box) for a in met[0] for b in met[1])
        entries.append(1.0 if holds else 0.0)
    return sum(entries) / len(entries), all(e == 1 for e in entries)


def check_prompts(prompts: torch.Tensor, n: int) -> None:
    if not isinstance(prompts, torch.Tensor) or prompts.dtype != torch.long or prompts.ndim != 1:
        raise ValueError(f"prompts must be a 1-D long tensor of prompt ids, got {prompts!r:.80}")
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} images")
    bad = prompts[(prompts < 0) | (prompts >= len(PROMPTS))]
    if len(bad):
        raise ValueError(f"prompt id {bad[0].item()} is not in 0..{len(PROMPTS) - 1}")


def geneval_scores(images: torch.Tensor, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [B], strict [B] bool) of images ``[B, 3, S, S]`` for prompt ids ``[B]``."""
    check_images(images)
    check_prompts(prompts, len(images))
    results = [check(SPECS[p], f) for p, f in zip(prompts.tolist(), detect(images))]
    return torch.tensor([r[0] for r in results]), torch.tensor([r[1] for r in results])
