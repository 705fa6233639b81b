"""Proxy fidelity against independent computations: scipy's ranks and Spearman (ties included),
numpy's mean and std, brute-force OVF subsets, and a Monte-Carlo chance level."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from progrpo_ref.beyond_paper.fidelity import average_ranks, overlap_chance, ovf_overlap, spearman, summarize


def tied_rows(P=40, G=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (P, G), generator=g).float(), torch.randint(0, 4, (P, G), generator=g).float()


def test_average_ranks_match_scipy_with_ties():
    a, _ = tied_rows()
    ours = average_ranks(a).numpy()
    for row, theirs in zip(a.numpy(), ours):
        np.testing.assert_array_equal(theirs, stats.rankdata(row, method="average"))


def test_spearman_matches_scipy_with_and_without_ties():
    a, b = tied_rows()
    c, d = torch.randn(30, 24, generator=torch.Generator().manual_seed(1)), torch.randn(30, 24, generator=torch.Generator().manual_seed(2))
    for x, y in ((a, b), (c, d), (c, c ** 3 + d * 0.1)):
        ours = spearman(x, y).numpy()
        theirs = [stats.spearmanr(u, v).statistic for u, v in zip(x.numpy(), y.numpy())]
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)


def test_known_rankings_and_a_constant_row():
    final = torch.tensor([[0.3, -1.0, 2.0, 0.7, 0.1]])
    assert spearman(final.exp(), final).item() == pytest.approx(1.0)  # a monotone preview ranks perfectly
    assert spearman(-final, final).item() == pytest.approx(-1.0)
    tied = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0]])  # the preview cannot tell the top three apart
    assert spearman(tied, final).item() == pytest.approx(stats.spearmanr(tied[0], final[0]).statistic)
    assert math.isnan(spearman(torch.ones(1, 5), final).item())  # scipy also returns nan


def test_summarize_is_mean_and_standard_error_without_nans():
    v = torch.tensor([0.2, float("nan"), 0.5, 0.9, -0.1])
    kept = np.array([0.2, 0.5, 0.9, -0.1])
    s = summarize(v)
    assert s["n"] == 4 and s["mean"] == pytest.approx(kept.mean())
    assert s["se"] == pytest.approx(kept.std(ddof=1) / 2)
    assert math.isnan(summarize(torch.tensor([0.3]))["se"])


def brute_ovf(r, k):
    best = max(itertools.combinations(range(len(r)), k), key=lambda s: np.var([r[i] for i in s]))
    return set(best)


def test_ovf_overlap_against_brute_force_subsets():
    g = torch.Generator().manual_seed(3)
    preview, final = torch.randn(25, 8, generator=g), torch.randn(25, 8, generator=g)
    ours = ovf_overlap(preview, final, 3).numpy()
    for p, f, o in zip(preview.numpy(), final.numpy(), ours):
        assert o == pytest.approx(len(brute_ovf(p, 3) & brute_ovf(f, 3)) / 3)
    assert torch.equal(ovf_overlap(final, final, 3), torch.ones(25, dtype=torch.float64))


def test_unrelated_previews_overlap_at_chance():
    g = torch.Generator().manual_seed(4)
    preview, final = torch.randn(4000, 48, generator=g), torch.randn(4000, 48, generator=g)
    measured = ovf_overlap(preview, final, 12).mean().item()
    assert measured == pytest.approx(overlap_chance(12, 48), abs=0.01)  # 0.25; Monte-Carlo se about 0.002


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="same shape"):
        spearman(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        average_ranks(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="k=5 must be in 1..group_size=4"):
        overlap_chance(5, 4)
