"""Analysis helpers against brute-force computations; the benchmark's measured counts; the SD3 adapter."""
import json
import math

import pytest
import torch

from progrpo_ref.study.analysis import (clustering_fraction, compute_vs_gradient_share, curve, gaussian_clustering_fraction,
                                  paired_difference, rank_correlation, standardized_moments, verdict)


def test_rank_correlation_matches_pearson_of_ranks():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 24, generator=g), torch.randn(5, 24, generator=g)
    rho = rank_correlation(a, b)
    for p in range(5):
        ra, rb = a[p].argsort().argsort().double(), b[p].argsort().argsort().double()
        n = 24
        d2 = ((ra - rb) ** 2).sum()
        assert rho[p].item() == pytest.approx(1 - 6 * d2.item() / (n * (n * n - 1)), abs=1e-9)  # Spearman's formula
    assert torch.allclose(rank_correlation(a, a * 3 + 1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(rank_correlation(a, -a), -torch.ones(5, dtype=torch.float64))


def test_clustering_fraction_and_gaussian_reference():
    R = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -10.0, 10.0]])
    # mean 0, population std sqrt(200 / 8) = 5: A = 0 for six, +-2 for two
    assert clustering_fraction(R, 0.5) == pytest.approx(6 / 8)
    share = compute_vs_gradient_share(R, 0.5)
    assert share["compute_share"] == pytest.approx(0.75) and share["gradient_share"] == pytest.approx(0.0)
    assert gaussian_clustering_fraction(0.5) == pytest.approx(0.3829, abs=1e-4)
    big = torch.randn(400, 24, generator=torch.Generator().manual_seed(0))
    assert clustering_fraction(big, 0.5) == pytest.approx(gaussian_clustering_fraction(0.5), abs=0.02)
    m = standardized_moments(big)
    assert abs(m["skew"]) < 0.1 and abs(m["excess_kurtosis"]) < 0.3


def _hist(seed, finals, nfe=240):
    evals = [{"update": 0, "x": 0.0}] + [{"update": 2 * (i + 1), "x": v} for i, v in enumerate(finals)]
    ups = [{"nfe_per_prompt": nfe, "sampling_s": 0.1, "optimisation_s": 0.2}] * (2 * len(finals))
    return {"config": {"seed": seed, "arm": "a"}, "evals": evals, "updates": ups}


def test_curve_and_paired_difference():
    a = [_hist(s, [1.0, 2.0 + s]) for s in range(4)]
    b = [_hist(s, [1.0, 1.0 + s]) for s in range(4)]
    xs, vals = curve(a, "x")
    assert xs.tolist() == [0, 2, 4] and vals.shape == (4, 3)
    xn, _ = curve(a, "x", x="nfe")
    assert xn.tolist() == [0, 480, 960]
    d = paired_difference(a, b, "x")
    assert d["mean"] == pytest.approx(1.0) and d["std"] == pytest.approx(0.0) and d["exceeds_2se"]
    assert verdict(d, +1) == "agrees" and verdict(d, -1) == "disagrees"
    noisy = paired_difference([_hist(s, [float(s % 2)]) for s in range(4)], [_hist(s, [0.25]) for s in range(4)], "x")
    assert not noisy["exceeds_2se"] and verdict(noisy, +1) == "same direction, within noise"


def test_only_a_rebuild_writes_to_figures(monkeypatch):
    from progrpo_ref.study import plots
    from progrpo_ref.study.cache import MODE_ENV
    from progrpo_ref.study.experiments import Study

    monkeypatch.delenv(plots.PROFILE_ENV, raising=False)
    monkeypatch.delenv(MODE_ENV, raising=False)
    assert plots.current_profile() == "full"  # what a reader opening a notebook gets
    assert not Study("x").writes  # ... and a reader's run does not touch the committed figures
    monkeypatch.setenv(plots.PROFILE_ENV, "quick")
    assert plots.current_profile() == "quick" and not Study("x").writes and Study("x").results.mode == "off"
    assert plots.figure_dir(False) != plots.REPO_FIGURES and plots.figure_dir(True) == plots.REPO_FIGURES
    monkeypatch.setenv(plots.PROFILE_ENV, "full")
    monkeypatch.setenv(MODE_ENV, "rebuild")
    assert Study("x").writes  # make reproduce
    monkeypatch.setenv(plots.PROFILE_ENV, "fast")
    with pytest.raises(ValueError, match="'fast' must be 'quick' or 'full'"):
        plots.current_profile()


def test_benchmark_measures_the_schedules_nfe(tmp_path):
    from progrpo_ref.study import bench

    out = tmp_path / "bench.json"
    bench.main(["--quick", "--threads", "1", "--prompts", "1", "--json", str(out)])
    rows = {r["method"]: r for r in json.loads(out.read_text())}
    assert {m: r["nfe_per_prompt"] for m, r in rows.items()} == {"flow_grpo": 240, "ovf": 240, "standard": 324, "flash": 188}
    assert {m: r["preview_evals_per_prompt"] for m, r in rows.items()} == {"flow_grpo": 0, "ovf": 0, "standard": 72, "flash": 40}
    assert {m: r["trained_per_prompt"] for m, r in rows.items()} == {"flow_grpo": 24, "ovf": 12, "standard": 12, "flash": 12}
    for r in rows.values():
        assert r["total_s"] == pytest.approx(r["sampling_s"] + r["optimisation_s"])
        assert math.isfinite(r["model_ratio"]) and r["peak_mem_mb"] > 0
    assert rows["standard"]["flop_ratio"] == pytest.approx((324 + 3 * 120) / (240 + 3 * 240))


def test_equal_compute_difference_interpolates_at_the_smaller_budget():
    from progrpo_ref.study.analysis import equal_compute_difference

    # a: 100 NFE per update, value rises 1 per eval (every 2 updates); b: 50 NFE per update, rises 0.5
    def h(seed, nfe, slope, evals=4):
        return {"config": {"seed": seed},
                "evals": [{"update": 2 * i, "x": slope * i} for i in range(evals + 1)],
                "updates": [{"nfe_per_prompt": nfe, "sampling_s": 0, "optimisation_s": 0}] * (2 * evals)}

    a = [h(s, 100, 1.0) for s in range(3)]
    b = [h(s, 50, 0.5) for s in range(3)]
    # budgets: a ends at 800, b at 400; at 400 NFE a has value 2 (update 4), b has value 2 (update 8)
    d = equal_compute_difference(a, b, "x", "nfe")
    assert d["mean"] == pytest.approx(0.0)
    b2 = [h(s, 50, 1.0) for s in range(3)]  # b2 reaches 4 at 400 NFE
    assert equal_compute_difference(a, b2, "x", "nfe")["mean"] == pytest.approx(-2.0)
