"""Prune schedules, measured NFE, the expand-and-prune rollout, and the trainer end to end."""
import pytest
import torch

from progrpo_ref.grpo import step_log_prob
from progrpo_ref.model import sigma_schedule
from progrpo_ref.ovf import ovf_select
from progrpo_ref.pro_grpo import PRESETS, PruneSchedule, expand_and_prune, record_previews
from progrpo_ref.rollout import NFECounter, rollout


def test_schedule_nfe():
    assert PRESETS["standard"].nfe() == 48 * 5 + 24 * 2 + 12 * 3 == 324
    assert PRESETS["flash"].nfe() == 24 * 5 + 16 * 2 + 12 * 3 == 188
    assert PRESETS["flow_grpo"].nfe() == PruneSchedule((24,), (), 10).nfe() == 240
    assert PruneSchedule((48, 32, 8), (30, 40), 50).nfe() == 48 * 30 + 32 * 10 + 8 * 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(group_sizes=(24, 24, 12), prune_steps=(5, 7)), "strictly decreasing"),
        (dict(group_sizes=(24, 12, 16), prune_steps=(5, 7)), "strictly decreasing"),
        (dict(group_sizes=(24, 1), prune_steps=(5,)), ">= 2"),
        (dict(group_sizes=(48, 24, 12), prune_steps=(5,)), "one step per reduction"),
        (dict(group_sizes=(48, 24, 12), prune_steps=(7, 5)), "strictly increasing"),
        (dict(group_sizes=(48, 24), prune_steps=(10,)), r"inside \(0, num_steps=10\)"),
        (dict(group_sizes=(48, 24), prune_steps=(0,)), r"inside \(0, num_steps=10\)"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneSchedule(**kwargs)


def test_rollout_rejects_a_bad_sigma_schedule(flow_model):
    with pytest.raises(ValueError, match="strictly decreasing"):
        rollout(flow_model, torch.tensor([1]), 4, torch.tensor([1.0, 0.5, 0.5, 0.0]))


@pytest.mark.parametrize("name", ["standard", "flash", "flow_grpo"])
def test_measured_nfe_equals_the_schedule(flow_model, margin_reward, name):
    sched = PRESETS[name]
    counter = NFECounter(flow_model)
    prompts = torch.tensor([0, 4, 9])
    g = torch.Generator().manual_seed(0)
    if len(sched.group_sizes) > 1:
        ro = expand_and_prune(counter, prompts, sched, margin_reward, sigma_schedule(10), 0.7, g)
    else:
        ro = rollout(counter, prompts, 24, sigma_schedule(10), 0.7, g)
    assert counter.nfe == ro.nfe == sched.nfe() * 3
    assert counter.calls == 10  # one batched network call per step
    assert ro.latents.shape == (3, sched.final_size, 11, 1, 8, 8) and ro.log_probs.shape == (3, sched.final_size, 10)


def test_expand_and_prune_keeps_the_ovf_subset_of_previews(flow_model, margin_reward):
    sched = PruneSchedule((16, 8, 4), (5, 7), 10)
    sigmas = sigma_schedule(10)
    ro = expand_and_prune(flow_model, torch.tensor([2, 6]), sched, margin_reward, sigmas, 0.7, torch.Generator().manual_seed(1))
    assert [p["step"] for p in ro.previews] == [5, 7]
    assert [tuple(p["rewards"].shape) for p in ro.previews] == [(2, 16), (2, 8)]
    for p in ro.previews:
        assert torch.equal(p["keep"], ovf_select(p["rewards"], p["keep"].shape[1]))
    # independent recomputation: the survivors' preview x0_hat = x - sigma v at the last prune step
    c = 7
    lat, prompts = ro.latents.flatten(0, 1), ro.prompts.flatten()
    with torch.no_grad():
        x = lat[:, c - 1]
        x0_hat = x - sigmas[c - 1] * flow_model(x, sigmas[c - 1].expand(len(x)), prompts)
        proxy = margin_reward(x0_hat, prompts).view(2, 4)
    last = ro.previews[-1]
    assert torch.allclose(proxy, last["rewards"].gather(1, last["keep"]), atol=1e-4)
    # survivors keep a consistent history: re-scored log-probs match the stored ones
    with torch.no_grad():
        for t in range(10):
            lp, _, _ = step_log_prob(flow_model, lat, prompts, sigmas, t, 0.7)
            assert (lp - ro.log_probs.flatten(0, 1)[:, t]).abs().max() < 1e-5


def test_record_previews_prunes_nothing(flow_model, margin_reward):
    ro, proxies = record_previews(flow_model, torch.tensor([1, 2]), 6, margin_reward, sigma_schedule(10), (3, 9))
    assert ro.images.shape == (2, 6, 1, 8, 8) and sorted(proxies) == [3, 9]
    assert proxies[9].shape == (2, 6)


def test_prune_schedule_must_match_sigmas(flow_model, margin_reward):
    with pytest.raises(ValueError, match="20 steps but the prune schedule 10"):
        expand_and_prune(flow_model, torch.tensor([1]), PRESETS["standard"], margin_reward, sigma_schedule(20))


def test_rollout_select_gathers_the_same_trajectories(flow_model):
    ro = rollout(flow_model, torch.tensor([1, 2]), 5, sigma_schedule(4), 0.7, torch.Generator().manual_seed(0))
    keep = torch.tensor([[4, 0], [2, 3]])
    sub = ro.select(keep)
    for p in range(2):
        for j, g in enumerate(keep[p].tolist()):
            assert torch.equal(sub.latents[p, j], ro.latents[p, g])
            assert torch.equal(sub.log_probs[p, j], ro.log_probs[p, g])
            assert sub.prompts[p, j] == ro.prompts[p, g]
