"""Prune schedules, measured NFE, the expand-and-prune rollout, and the trainer end to end."""
import pytest
import torch

from progrpo_ref.algorithm.grpo import step_log_prob
from progrpo_ref.algorithm.ovf import ovf_select
from progrpo_ref.algorithm.pro_grpo import PRESETS, PruneSchedule, expand_and_prune
from progrpo_ref.beyond_paper.fidelity import record_previews
from progrpo_ref.algorithm.rollout import NFECounter, rollout
from progrpo_ref.algorithm.samplers import FlowSDE


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
        (dict(group_sizes=(48.0, 24), prune_steps=(5,)), "must be integers"),
        (dict(group_sizes=48, prune_steps=()), "must be sequences"),
        (dict(group_sizes=(48,), prune_steps=(), num_steps=0), "num_steps=0 must be >= 1"),
    ],
)
def test_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneSchedule(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(group_size=0), "group_size=0 must be an integer >= 1"),
    (dict(prompts=torch.tensor([1.0])), "integer tensor"),
    (dict(prompts=torch.tensor([], dtype=torch.long)), "non-empty"),
    (dict(preview_steps=(11,)), r"preview_steps=\(11,\) must lie in \[1, 10\]"),
    (dict(sampler=None), "sampler must be a Sampler"),
    (dict(latent_shape=(1, 8.0, 8)), "latent_shape=.* must be a tuple of positive ints"),
])
def test_rollout_rejects_bad_input(flow_model, sde, kwargs, match):
    args = dict(sampler=sde, prompts=torch.tensor([1]), group_size=4, latent_shape=(1, 8, 8)) | kwargs
    with pytest.raises(ValueError, match=match):
        rollout(flow_model, **args)


@pytest.mark.parametrize("name", ["standard", "flash", "flow_grpo"])
def test_measured_nfe_equals_the_schedule(flow_model, margin_reward, name):
    sched = PRESETS[name]
    counter = NFECounter(flow_model)
    prompts = torch.tensor([0, 4, 9])
    if len(sched.group_sizes) > 1:
        ro = expand_and_prune(counter, FlowSDE(), prompts, sched, margin_reward, 0, latent_shape=(1, 8, 8))
    else:
        ro = rollout(counter, FlowSDE(), prompts, 24, 0, latent_shape=(1, 8, 8))
    assert counter.nfe == ro.nfe == sched.nfe() * 3
    assert counter.calls == 10  # one batched network call per step
    assert ro.latents.shape == (3 * sched.final_size, 11, 1, 8, 8) and ro.log_probs.shape == (3 * sched.final_size, 10)
    assert ro.kept.shape == (3, sched.final_size)


def test_expand_and_prune_keeps_the_ovf_subset_of_previews(flow_model, margin_reward, sde):
    sched = PruneSchedule((16, 8, 4), (5, 7), 10)
    sigmas = sde.sigmas
    ro = expand_and_prune(flow_model, sde, torch.tensor([2, 6]), sched, margin_reward, 1, latent_shape=(1, 8, 8))
    assert [p["call"] for p in ro.previews] == [5, 7]
    assert [tuple(p["rewards"].shape) for p in ro.previews] == [(2, 16), (2, 8)]
    for p in ro.previews:
        assert torch.equal(p["keep"], ovf_select(p["rewards"], p["keep"].shape[1]))
    # independent recomputation: the survivors' preview x0_hat = x - sigma v at the last prune step
    c = 7
    lat, prompts = ro.latents, ro.prompts
    with torch.no_grad():
        x = lat[:, c - 1]
        x0_hat = x - sigmas[c - 1] * flow_model(x, sigmas[c - 1].expand(len(x)), prompts)
        proxy = margin_reward(x0_hat, prompts).view(2, 4)
    last = ro.previews[-1]
    assert torch.allclose(proxy, last["rewards"].gather(1, last["keep"]), atol=1e-4)
    # survivors keep a consistent history: re-scored log-probs match the stored ones
    with torch.no_grad():
        for t in range(10):
            lp = step_log_prob(flow_model, sde, lat, prompts, t).log_prob
            assert (lp - ro.log_probs[:, t]).abs().max() < 1e-5


def test_a_preview_hook_must_return_distinct_indices_of_live_trajectories(flow_model):
    for bad in (torch.tensor([[0, 0]]), torch.tensor([[0, 4]]), torch.tensor([0, 1]), torch.tensor([[0.0, 1.0]])):
        with pytest.raises(ValueError, match=r"on_preview must return None or \[P, k\] = \[1, k\] distinct indices in 0..3"):
            rollout(flow_model, FlowSDE(4), torch.tensor([2]), 4, 0, (2,), lambda call, x0_hat, live: bad,
                    latent_shape=(1, 8, 8))


def test_record_previews_prunes_nothing(flow_model, margin_reward, sde):
    ro, proxies = record_previews(flow_model, sde, torch.tensor([1, 2]), 6, margin_reward, (3, 9), latent_shape=(1, 8, 8))
    assert ro.images.shape == (2 * 6, 1, 8, 8) and sorted(proxies) == [3, 9]
    assert proxies[9].shape == (2, 6)


def test_prune_schedule_must_match_the_sampler(flow_model, margin_reward):
    with pytest.raises(ValueError, match="20 steps but the prune schedule 10"):
        expand_and_prune(flow_model, FlowSDE(20), torch.tensor([1]), PRESETS["standard"], margin_reward, latent_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="strategy='best'"):
        expand_and_prune(flow_model, FlowSDE(10), torch.tensor([1]), PRESETS["standard"], margin_reward, strategy="best", latent_shape=(1, 8, 8))


def test_rollout_select_gathers_the_same_trajectories(flow_model):
    ro = rollout(flow_model, FlowSDE(4), torch.tensor([1, 2]), 5, 0, latent_shape=(1, 8, 8))
    keep = torch.tensor([[4, 0], [2, 3]])
    sub = ro.select(keep)
    assert torch.equal(sub.kept, keep)
    R = ro.final_rewards(lambda x, c: x.flatten(1).sum(1))
    assert torch.equal(sub.final_rewards(lambda x, c: x.flatten(1).sum(1)), R.gather(1, keep))
    for p in range(2):
        for j, g in enumerate(keep[p].tolist()):
            assert torch.equal(sub.grouped(sub.latents)[p, j], ro.grouped(ro.latents)[p, g])
            assert torch.equal(sub.grouped(sub.log_probs)[p, j], ro.grouped(ro.log_probs)[p, g])
            assert sub.grouped(sub.prompts)[p, j] == ro.grouped(ro.prompts)[p, g]
    again = sub.select(torch.tensor([[1, 0], [0, 1]]))  # a selection of a selection indexes the current order
    assert torch.equal(again.kept, torch.tensor([[0, 4], [2, 3]]))
    assert torch.equal(again.position, torch.arange(4))
