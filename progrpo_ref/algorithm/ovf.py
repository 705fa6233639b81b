r"""Optimal Variance Filtering (OVF) and the other subset-selection rules the ablations compare.

OVF keeps the size-k subset of a group with the largest reward variance:

    K* = argmax_{|K| = k} var({R_g : g in K})

Exact solver in O(G log G). Sort the rewards. Some optimal subset is always the j lowest plus the
k - j highest rewards, for some j in 0..k. Why: var(K) = (1 / 2k^2) sum over pairs (R_i - R_j)^2, and
swapping a kept x for a dropped y changes the pair sum by f(y) - f(x), f(z) = sum_{j kept, j != x} (z - R_j)^2.
f is convex, so if x lies between two dropped values lo <= x <= hi, one of them gives f >= f(x):
swapping it in does not lower the variance, and repeating this ends at two tails (full proof in
docs/derivations.md, section 5; PODS, arXiv 2504.13818, uses the same lemma for LLM GRPO). So we
score the k + 1 "two tails" candidates with prefix sums,

    S_j = sum of the j lowest + sum of the k - j highest,    Q_j = same for the squares,
    var_j = Q_j / k - (S_j / k)^2,

and keep the best; among candidates that tie (discrete rewards make several subsets optimal) the one with the
fewest lowest rewards (``first_best``). ``tests/test_ovf.py`` checks this against brute force over all subsets.
Ties in reward are ordered by index (a stable sort).

Shapes: ``rewards`` ``[G]`` -> indices ``[k]``, or batched ``[P, G]`` -> ``[P, k]`` (one group per
prompt); indices are returned in ascending reward order.
"""
from __future__ import annotations

import torch

STRATEGIES = ("ovf", "random", "top", "bottom", "split")


def _check(rewards: torch.Tensor, k: int) -> torch.Tensor:
    if not isinstance(rewards, torch.Tensor) or rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [G] or [P, G] (a tensor), got {type(rewards).__name__} of shape "
                         f"{tuple(getattr(rewards, 'shape', ()))}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k={k!r} must be an integer (the subset size)")
    G = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"k={k} must be >= 2 (a group of one has no variance)")
    if k > G:
        raise ValueError(f"k={k} must be <= group size {G}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards contain {int((~torch.isfinite(rewards)).sum())} non-finite values")
    return rewards if rewards.dim() == 2 else rewards[None]


def _tails(order: torch.Tensor, j: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the j lowest and k - j highest, per row: order ``[P, G]`` sorted ascending, j ``[P]``."""
    G = order.shape[1]
    pos = torch.arange(G, device=order.device)[None]
    keep = (pos < j[:, None]) | (pos >= (G - k + j)[:, None])  # exactly k True per row
    return order[keep].view(-1, k)


TIE = 1e-9  # candidates whose variance is within TIE x the largest squared reward of the best are ties


def first_best(var: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The j of the best candidate per row of ``var`` ``[P, k + 1]``, ties going to the smallest j (the fewest lowest
    rewards). A tie is a variance within ``TIE`` x max R^2 of the best: far above float64's rounding of the prefix
    sums (which cancel when the rewards' mean is large) and far below any real difference. Discrete rewards tie
    often (several subsets are optimal); a rule, not the last bit of a sum, then decides which is kept."""
    slack = TIE * rewards.pow(2).amax(dim=1, keepdim=True)
    return (var >= var.amax(dim=1, keepdim=True) - slack).double().argmax(dim=1)


def ovf_select(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the size-k subset with the largest reward variance (exact, O(G log G))."""
    r = _check(rewards, k)
    sorted_r, order = r.detach().cpu().double().sort(dim=1, stable=True)  # float64 on the CPU, from any device
    G = r.shape[1]
    zero = torch.zeros_like(sorted_r[:, :1])
    csum = torch.cat([zero, sorted_r.cumsum(1)], 1)  # csum[:, i] = sum of the i lowest
    csq = torch.cat([zero, (sorted_r**2).cumsum(1)], 1)
    j = torch.arange(k + 1)
    hi = G - (k - j)  # the k - j highest start at sorted position hi
    S = csum[:, j] + csum[:, G:G + 1] - csum[:, hi]  # [P, k + 1]
    Q = csq[:, j] + csq[:, G:G + 1] - csq[:, hi]
    var = Q / k - (S / k) ** 2
    idx = _tails(order, first_best(var, sorted_r), k).to(rewards.device)
    return idx if rewards.dim() == 2 else idx[0]


def select_subset(rewards: torch.Tensor, k: int, strategy: str = "ovf", generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices ``[P, k]`` (or ``[k]``) of the subset each strategy keeps.

    ``ovf``: exact OVF; ``random``: uniform random k; ``top``/``bottom``: the k highest / lowest;
    ``split``: the fixed two tails, floor(k/2) lowest plus ceil(k/2) highest.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
    if strategy == "ovf":
        return ovf_select(rewards, k)
    r = _check(rewards, k)
    P, G = r.shape
    if strategy == "random":
        noise = torch.rand((P, G), generator=generator, device=generator.device if generator is not None else r.device)
        idx = noise.argsort(dim=1)[:, :k].sort(dim=1).values.to(r.device)
    else:
        order = r.argsort(dim=1)
        j = {"top": 0, "bottom": k, "split": k // 2}[strategy]
        idx = _tails(order, torch.full((P,), j, device=r.device), k)
    return idx if rewards.dim() == 2 else idx[0]
