r"""Noise that does not depend on batching: each trajectory's noise is a function of who it is.

Trajectory g of the prompt at position p of update u draws its initial latent and every step's z
from its own generator, seeded by a hash of (stream, seed, u, p, g). So its noise is the same whether
it is sampled alone or among 96 others, before or after other trajectories are pruned, in one
process or spread over several (``draws_for`` draws any process's share of the keys; ``first_prompt``
offsets the positions of a caller that gives a process a block of prompts). ``per_update_generator`` derives the other random choices of an update (prompts, random
subsets, the mini-batch order) from (seed, u) the same way, so a run's randomness is a pure function
of its seed and resuming needs no generator state.

Shapes: ``draws(P, G, n, shape)`` -> ``[P, G, n, *shape]``: the rollout takes draw 0 as x_0 and
draw i + 1 as step i's z. They are drawn on the CPU (the same numbers on every device) in one call
per trajectory; measured cost: ``python -m progrpo_ref.study.bench --noise-cost``.
"""
from __future__ import annotations

import hashlib

import torch

_MASK = (1 << 63) - 1


def derive_seed(*key) -> int:
    """A 63-bit seed from a tuple of ints and strings, the same in every process and Python version."""
    return int.from_bytes(hashlib.blake2b(repr(key).encode(), digest_size=8).digest(), "little") & _MASK


class TrajectoryNoise:
    """The noise of every trajectory of one update (or of one evaluation, with its own ``stream``)."""

    def __init__(self, seed: int = 0, update: int = 0, stream: str = "train", first_prompt: int = 0):
        for name, v in (("seed", seed), ("update", update), ("first_prompt", first_prompt)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r} must be an integer >= 0")
        self.seed, self.update, self.stream, self.first_prompt = seed, update, stream, first_prompt

    def generator(self, p: int, g: int) -> torch.Generator:
        """The generator of trajectory g of the prompt at position p (counted from ``first_prompt``)."""
        return torch.Generator().manual_seed(derive_seed(self.stream, self.seed, self.update, self.first_prompt + p, g))

    def draws(self, P: int, G: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal draws ``[P, G, n, *shape]`` on the CPU: n per trajectory, in its own stream."""
        keys = [(p, g) for p in range(P) for g in range(G)]
        return self.draws_for(keys, n, shape).view(P, G, n, *shape)

    def draws_for(self, keys, n: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The draws ``[len(keys), n, *shape]`` of the trajectories ``keys`` = [(prompt position, index), ...]:
        the same numbers as ``draws`` gives them, for any subset (a process's share of the groups)."""
        return torch.stack([torch.randn((n, *shape), generator=self.generator(int(p), int(g))) for p, g in keys])

    def __repr__(self):
        return f"TrajectoryNoise(seed={self.seed}, update={self.update}, stream={self.stream!r}, first_prompt={self.first_prompt})"


def per_update_generator(seed: int, update: int, what: str = "update") -> torch.Generator:
    """A CPU generator for the non-noise random choices of one update (prompts, subsets, mini-batches)."""
    return torch.Generator().manual_seed(derive_seed(what, seed, update))


def as_noise(noise) -> TrajectoryNoise:
    """``TrajectoryNoise`` as given, or one with that seed for an int, or seed 0 for ``None``."""
    if isinstance(noise, TrajectoryNoise):
        return noise
    if noise is None or isinstance(noise, int):
        return TrajectoryNoise(noise or 0)
    raise ValueError(f"noise={noise!r} must be a TrajectoryNoise, an integer seed or None")
