"""Notebook 07's measurements: noise levels against diffusers' own schedule, fidelity by call against scipy,
the spread regression against scikit-learn and a Monte Carlo of its standard errors, the arms, and the
audit's cost in the curves."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from progrpo_ref import DDIM, FlowCPS, FlowSDE, PruneSchedule
from progrpo_ref.digits import DigitsTask
from progrpo_ref.algorithm.noise import TrajectoryNoise
from progrpo_ref.beyond_paper.fidelity import record_previews
from progrpo_ref.study.analysis import curve, mean_cost
from progrpo_ref.study.when_to_prune import (CRITERION, SCREEN, SECOND_SETTING, audit_share, comparison_arms,
                                             fidelity_by_call, noise_level, passes, placements, run_screen,
                                             spread_regression)
from progrpo_ref.machinery.trainer import train

SHAPE = (1, 8, 8)


def test_noise_level_is_the_flow_sigma_and_matches_ddpm_snr_from_diffusers():
    assert [round(noise_level(FlowSDE(10), c), 6) for c in (1, 5, 7, 10)] == [1.0, 0.6, 0.4, 0.1]
    assert noise_level(FlowCPS(10), 5) == pytest.approx(0.6)
    from diffusers import DDIMScheduler

    sampler = DDIM(20, eta=1.0)
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                        timestep_spacing="trailing")
    ref.set_timesteps(20)
    for c in (1, 10, 20):
        abar = ref.alphas_cumprod[int(ref.timesteps[c - 1])].double().item()
        s = noise_level(sampler, c)
        # the flow form with the same signal-to-noise ratio: ((1 - s) / s)^2 = abar / (1 - abar)
        assert ((1 - s) / s) ** 2 == pytest.approx(abar / (1 - abar), rel=1e-5)
    with pytest.raises(ValueError, match="c=0"):
        noise_level(FlowSDE(10), 0)
    with pytest.raises(ValueError, match="c=11"):
        noise_level(FlowSDE(10), 11)


def test_fidelity_by_call_equals_scipy_on_the_same_rollout(flow_model, margin_reward):
    sampler, prompts, G = FlowSDE(10), torch.tensor([3, 7, 1]), 6
    seen = []
    out = fidelity_by_call(flow_model, sampler, margin_reward, prompts, G, k=3, seed=5, latent_shape=SHAPE,
                           accuracy_fn=lambda images, p: seen.append(len(images)) or 0.5)
    ro, proxies = record_previews(flow_model, sampler, prompts, G, margin_reward, range(1, 10),
                                  TrajectoryNoise(5, stream="fidelity"), latent_shape=SHAPE)
    final = ro.final_rewards(margin_reward).numpy()
    assert out["calls"] == list(range(1, 10)) and out["rho"].shape == (9, 3) and out["overlap"].shape == (9, 3)
    for i, c in enumerate(out["calls"]):
        for p in range(3):
            assert out["rho"][i, p].item() == pytest.approx(sps.spearmanr(proxies[c][p].numpy(), final[p]).statistic, abs=1e-12)
    assert np.allclose(out["final_std"].numpy(), final.std(1, ddof=0), atol=1e-6)  # group_std: the population std
    assert out["chance"] == 0.5 and seen == [18] and out["accuracy"] == 0.5
    assert out["sigma"] == [noise_level(sampler, c) for c in out["calls"]]
    # the overlap against OVF by enumeration: the 3-subset of largest variance, on previews and on finals
    best = lambda r: set(max(itertools.combinations(range(G), 3), key=lambda idx: np.var(r[list(idx)])))
    for i, c in enumerate(out["calls"]):
        for p in range(3):
            assert out["overlap"][i, p].item() == pytest.approx(len(best(proxies[c][p].numpy()) & best(final[p])) / 3)


def synthetic_groups(n, b, noise, seed, trained_spread_shift=-1.0):
    g = torch.Generator().manual_seed(seed)
    trained = (torch.arange(n) % 2).double()
    log_s = torch.randn(n, generator=g, dtype=torch.float64) + trained_spread_shift * trained
    rho = b[0] + b[1] * log_s + b[2] * trained + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return rho, log_s.exp(), trained


def test_spread_regression_matches_scikit_learn_and_its_se_matches_a_monte_carlo():
    from sklearn.linear_model import LinearRegression

    rho, s, t = synthetic_groups(60, (0.3, 0.2, -0.1), 0.1, seed=0)
    out = spread_regression(rho, s, t)
    lr = LinearRegression().fit(np.stack([s.log().numpy(), t.numpy()], 1), rho.numpy())
    assert out["b"][0] == pytest.approx(lr.intercept_, abs=1e-10)
    assert out["b"][1:] == pytest.approx(list(lr.coef_), abs=1e-10)
    assert out["raw_fall"] == pytest.approx(rho[t == 1].mean().item() - rho[t == 0].mean().item())
    # the reported standard errors, averaged over 4000 fresh noise draws of a 12-group design, against the spread
    # of the estimates over those draws. Monte Carlo error about 1%; mean s against sigma: -3% for N - 3 = 9 degrees
    # of freedom; dividing the RSS by N instead of N - 3 would be 13% low.
    _, s12, t12 = synthetic_groups(12, (0, 0, 0), 0.1, seed=3)
    b, se = [], []
    for k in range(4000):
        g = torch.Generator().manual_seed(1000 + k)
        y = 0.3 + 0.2 * s12.log() - 0.1 * t12 + 0.1 * torch.randn(12, generator=g, dtype=torch.float64)
        fit = spread_regression(y, s12, t12)
        b.append(fit["b"])
        se.append(fit["se"])
    assert torch.allclose(torch.tensor(se).mean(0), 0.97 * torch.tensor(b).std(0), rtol=0.05)


def test_a_fall_explained_by_spread_leaves_no_fall_once_spread_is_in_the_fit():
    # rho depends on the spread only; trained groups are narrower, so the raw fall is large and b_2 is ~0
    rho, s, t = synthetic_groups(200, (0.5, 0.25, 0.0), 0.05, seed=1, trained_spread_shift=-1.5)
    out = spread_regression(rho, s, t)
    assert out["raw_fall"] < -0.3
    assert abs(out["b"][2]) < 2 * out["se"][2] and out["b"][1] == pytest.approx(0.25, abs=0.03)


def test_spread_regression_rejects_bad_input():
    rho, s, t = synthetic_groups(10, (0, 0, 0), 0.1, seed=2)
    with pytest.raises(ValueError, match="same 1-d shape"):
        spread_regression(rho[:5], s, t)
    with pytest.raises(ValueError, match="> 0"):
        spread_regression(rho, s * 0, t)
    with pytest.raises(ValueError, match="both policies"):
        spread_regression(rho, s, t * 0)
    rho[3], s[3] = math.nan, 0.0  # a constant group (spread 0, NaN rho) is left out
    fit = spread_regression(rho, s, t)
    keep = [i for i in range(10) if i != 3]
    assert fit["n"] == 9 and fit["b"] == pytest.approx(spread_regression(rho[keep], s[keep], t[keep])["b"])


def test_comparison_arms_and_the_committed_second_setting():
    arms = comparison_arms(SCREEN[SECOND_SETTING], audit_every=7, seed=3)
    assert list(arms) == ["paper (5,7)", "late (6,8)", "adaptive", "ovf_48", "flow_grpo"]
    assert {n: c.schedule.nfe() for n, c in arms.items()} == {"paper (5,7)": 324, "late (6,8)": 360, "adaptive": 324,
                                                               "ovf_48": 480, "flow_grpo": 240}
    assert arms["late (6,8)"].schedule == PruneSchedule((48, 24, 12), (6, 8), 10)
    assert arms["adaptive"].adaptive and arms["adaptive"].audit_every == 7
    assert all(c.audit_every == 0 for n, c in arms.items() if n != "adaptive")
    assert arms["ovf_48"].selection == "ovf" and arms["ovf_48"].select_k == 12
    assert all(c.sampler == FlowSDE(10, noise_level=0.3) and c.seed == 3 for c in arms.values())
    assert SCREEN["a=0.7"] == FlowSDE() and SECOND_SETTING in SCREEN


def scored(rho7, accuracy):
    rho = torch.zeros(9, 4)  # every call but the criterion's call 7 is far below the bar
    rho[6] = rho7
    return {"trained": {"calls": list(range(1, 10)), "rho": rho}, "accuracy": {"trained": accuracy}}


def test_the_criterion():
    assert CRITERION == {"call": 7, "min_trained_fidelity": 0.7, "min_heldout_accuracy": 0.9}
    assert passes(scored(0.71, 0.95)) and not passes(scored(0.69, 0.95)) and not passes(scored(0.9, 0.85))


def test_audit_cost_placements_and_curves_count_the_audit():
    task = DigitsTask(eval_per_class=1, eval_group=4)
    small = dict(num_updates=3, prompts_per_update=2, eval_every=3, audit_prompts=2, fidelity_target=-1.0, progress=False)
    h = train(comparison_arms(FlowSDE(10), audit_every=2, **small)["adaptive"], task)
    # audits at updates 1 and 3, each 2 prompts x G_0 = 48 x 10 calls; the target -1 moves both checkpoints to 1, 2
    assert [r["update"] for r in h["updates"] if "audit" in r] == [1, 3]
    assert placements(h) == [(1, [1, 2])]
    audit_nfe = 2 * (2 * 48 * 10)
    train_nfe = sum(r["nfe_per_prompt"] * 2 for r in h["updates"])
    assert audit_share(h)["nfe"] == pytest.approx(audit_nfe / (audit_nfe + train_nfe))
    assert mean_cost([h])["nfe_with_audits"] == pytest.approx((train_nfe / 2 + audit_nfe / 2) / 3)
    xs, _ = curve([h], "eval_margin", x="nfe")
    assert xs[-1].item() == pytest.approx(train_nfe / 2 + audit_nfe / 2)  # per prompt, the audits included
    secs, _ = curve([h], "eval_margin", x="seconds")
    assert secs[-1].item() == pytest.approx(sum(r["sampling_s"] + r["optimisation_s"] + r.get("audit_s", 0.0)
                                                for r in h["updates"]), rel=1e-6)


def test_run_screen_trains_and_measures_every_candidate():
    from progrpo_ref.study.experiments import Study

    study = Study("test_screen", profile="quick", workers=1)
    out = run_screen(study, DigitsTask(eval_per_class=1, eval_group=4), 1, torch.tensor([0, 1]), group_size=4,
                     prompts_per_update=2, eval_every=1)
    assert list(out) == list(SCREEN)
    for r in out.values():
        assert r["pretrained"]["rho"].shape == (9, 2) and r["trained"]["rho"].shape == (9, 2)
        assert 0 <= r["accuracy"]["trained"] <= 1 and len(r["history"]["updates"]) == 1
        assert isinstance(passes(r), bool)
