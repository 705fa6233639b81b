"""OVF against brute force over all subsets, and the other selection rules against their definitions."""
import itertools

import pytest
import torch

from progrpo_ref.algorithm.ovf import ovf_select, select_subset


def brute_force_best_variance(r: torch.Tensor, k: int) -> float:
    return max(r[list(s)].double().var(unbiased=False).item() for s in itertools.combinations(range(len(r)), k))


@pytest.mark.parametrize("trial", range(60))
def test_ovf_matches_brute_force(trial):
    g = torch.Generator().manual_seed(trial)
    G = int(torch.randint(2, 13, (1,), generator=g))
    k = int(torch.randint(2, G + 1, (1,), generator=g))
    kind = trial % 3
    if kind == 0:
        r = torch.randn(G, generator=g)
    elif kind == 1:  # heavy tails and skew
        r = torch.randn(G, generator=g) ** 3
    else:  # many ties
        r = torch.randint(0, 3, (G,), generator=g).float()
    idx = ovf_select(r, k)
    assert idx.shape == (k,) and len(set(idx.tolist())) == k
    got = r[idx].double().var(unbiased=False).item()
    assert got == pytest.approx(brute_force_best_variance(r, k), rel=1e-9, abs=1e-12)


def test_batched_ovf_equals_per_row():
    g = torch.Generator().manual_seed(0)
    r = torch.randn(7, 24, generator=g) * torch.rand(7, 1, generator=g)
    batched = ovf_select(r, 12)
    assert batched.shape == (7, 12)
    for p in range(7):
        assert torch.equal(batched[p], ovf_select(r[p], 12))


def test_ovf_picks_the_extremes_of_a_clustered_group():
    r = torch.tensor([0.0] * 20 + [-3.0, -2.0, 2.0, 3.0])
    assert set(ovf_select(r, 4).tolist()) == {20, 21, 22, 23}


def test_other_strategies():
    r = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0])
    assert set(select_subset(r, 2, "top").tolist()) == {0, 2}
    assert set(select_subset(r, 2, "bottom").tolist()) == {5, 1}
    assert set(select_subset(r, 3, "split").tolist()) == {5, 0, 2}  # 1 lowest + 2 highest
    g = torch.Generator().manual_seed(0)
    picks = torch.stack([select_subset(r, 3, "random", g) for _ in range(2000)])
    assert all(len(set(p.tolist())) == 3 for p in picks[:50])
    freq = torch.bincount(picks.flatten(), minlength=6).float() / 2000
    assert torch.allclose(freq, torch.full((6,), 0.5), atol=0.05)  # each index kept with prob k/G


@pytest.mark.parametrize(
    "rewards, k, match",
    [
        (torch.randn(24), 30, "k=30 must be <= group size 24"),
        (torch.randn(24), 1, "k=1 must be >= 2"),
        (torch.tensor([1.0, float("nan"), 2.0]), 2, "non-finite"),
        (torch.randn(2, 3, 4), 2, "must be \\[G\\] or \\[P, G\\]"),
            ([1.0, 2.0, 3.0], 2, "got list"),
            (torch.randn(24), 2.5, "k=2.5 must be an integer"),
            (torch.randn(24), True, "k=True must be an integer"),
    ],
)
def test_bad_input(rewards, k, match):
    with pytest.raises(ValueError, match=match):
        ovf_select(rewards, k)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="strategy='median'"):
        select_subset(torch.randn(8), 4, "median")
