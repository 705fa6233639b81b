"""minimal.py is the package's algorithm: the same numbers, bit for bit, from the one-file version.

Each piece against the package's and, where one exists, an independent computation (OVF by brute force); then
whole runs: a few updates of ``minimal.train`` against ``progrpo_ref.train`` on the same config leave the model's
parameters ``torch.equal``, with the same per-update rewards, for Flow-GRPO, Standard, Flash and static OVF, with
and without the KL.
"""
import itertools

import pytest
import torch

from progrpo_ref import FlowSDE, PRESETS, PruneSchedule, arm_config, expand_and_prune, group_advantages, minimal, train
from progrpo_ref.algorithm.noise import TrajectoryNoise
from progrpo_ref.algorithm.ovf import ovf_select
from progrpo_ref.algorithm.samplers import sde_step_with_logprob
from progrpo_ref.digits import DigitsTask

TASK = DigitsTask(eval_per_class=1, eval_group=2)


@pytest.mark.parametrize("T, shift", [(10, 1.0), (10, 3.0), (7, 2.5)])
def test_sigmas_are_the_samplers(T, shift):
    assert torch.equal(minimal.flow_sigmas(T, shift), FlowSDE(T, shift=shift).sigmas)


def test_the_sde_step_is_the_packages():
    g = torch.Generator().manual_seed(0)
    v, x, z = (torch.randn(5, 1, 8, 8, generator=g) for _ in range(3))
    sigmas = minimal.flow_sigmas(10)
    for i in (0, 4, 9):  # the first step (sigma = 1, the guarded denominator), a middle one and the last
        col = lambda s: minimal.per_sample(s, 5)  # noqa: E731
        mine = minimal.sde_step(v, x, col(sigmas[i]), col(sigmas[i + 1]), 0.7, z=z)
        theirs = sde_step_with_logprob(v, x, sigmas[i], sigmas[i + 1], 0.7, noise=z)
        assert torch.equal(mine[0], theirs.prev_sample) and torch.equal(mine[1], theirs.log_prob)
        assert torch.equal(mine[2], theirs.mean) and torch.equal(mine[3], theirs.std)
        scored = minimal.sde_step(v, x, col(sigmas[i]), col(sigmas[i + 1]), 0.7, x_next=mine[0])
        assert torch.equal(scored[1], mine[1])


def brute_force_ovf(r: torch.Tensor, k: int) -> float:
    return max(r[list(s)].double().var(unbiased=False).item() for s in itertools.combinations(range(len(r)), k))


@pytest.mark.parametrize("G, k", [(8, 4), (9, 3), (7, 2), (6, 6)])
def test_ovf_finds_the_largest_variance_and_the_packages_subset(G, k):
    g = torch.Generator().manual_seed(G * 10 + k)
    R = torch.cat([torch.randn(5, G, generator=g), torch.randint(0, 3, (3, G), generator=g).float()])  # ties too
    keep = minimal.ovf(R, k)
    for row, idx in zip(R, keep):
        assert len(set(idx.tolist())) == k
        assert row[idx].double().var(unbiased=False).item() == pytest.approx(brute_force_ovf(row, k), abs=1e-12)
    assert torch.equal(keep, ovf_select(R, k))


@pytest.mark.parametrize("draw", ["scores 1-5", "quarters", "pass-fail", "all equal", "large mean"])
def test_ovf_keeps_the_packages_subset_when_rewards_tie(draw):
    """Discrete rewards make several subsets optimal; both implementations break the tie by the same rule."""
    g = torch.Generator().manual_seed(3)
    R = {"scores 1-5": torch.randint(1, 6, (300, 24), generator=g).float(),
         "quarters": (torch.randn(300, 24, generator=g) * 4).round() / 4,
         "pass-fail": torch.randint(0, 2, (300, 24), generator=g).float(),
         "all equal": torch.full((5, 24), 0.7),
         "large mean": 23 + 0.01 * torch.randint(0, 4, (300, 24), generator=g).float()}[draw]
    for k in (2, 6, 12):
        mine, theirs = minimal.ovf(R, k), ovf_select(R, k)
        assert torch.equal(mine, theirs), (draw, k, (mine != theirs).any(1).sum().item())
        if k == 2:  # the chosen subsets are optimal (brute force over all 276 pairs)
            best = torch.tensor([brute_force_ovf(r, k) for r in R[:8]], dtype=torch.float64)
            assert torch.allclose(R[:8].double().gather(1, mine[:8]).var(1, unbiased=False), best, rtol=0, atol=1e-12)


def test_advantages_are_the_packages():
    R = torch.randn(4, 12, generator=torch.Generator().manual_seed(1)) * 3
    for global_std in (False, True):
        assert torch.equal(minimal.advantages(R, 1e-4, 5.0, global_std), group_advantages(R, 1e-4, global_std, 5.0))


@pytest.mark.parametrize("name", ["flow_grpo", "standard", "flash"])
def test_expand_and_prune_keeps_the_same_trajectories(flow_model, margin_reward, name):
    s, prompts, noise = PRESETS[name], torch.tensor([3, 7, 7]), TrajectoryNoise(5, 2)
    latents, log_probs, c, pruned = minimal.expand_and_prune(flow_model, prompts, s.group_sizes, s.prune_steps,
                                                             minimal.flow_sigmas(10), 0.7, margin_reward, noise, (1, 8, 8))
    ro = expand_and_prune(flow_model, FlowSDE(), prompts, s, margin_reward, noise, latent_shape=(1, 8, 8))
    assert len(pruned) == len(ro.previews) == len(s.prune_steps)
    for (p, keep), record in zip(pruned, ro.previews):
        assert torch.equal(keep, record["keep"]) and torch.equal(p, record["rewards"])
    assert torch.equal(latents, ro.grouped(ro.latents)) and torch.equal(log_probs, ro.grouped(ro.log_probs))
    assert torch.equal(c, ro.grouped(ro.prompts))
    final = margin_reward(latents[:, :, -1].flatten(0, 1), c.flatten()).view(3, -1)
    assert torch.equal(final, ro.final_rewards(margin_reward))


@pytest.mark.parametrize("beta", [0.0, 0.01])
@pytest.mark.parametrize("arm", ["flow_grpo", "standard", "flash", "ovf"])
def test_minimal_train_leaves_the_parameters_of_the_packages(arm, beta):
    # two updates: the second samples with the weights the first trained, and its second mini-batch is clipped
    cfg = arm_config(arm, num_updates=2, prompts_per_update=1, beta=beta, seed=11, eval_every=2, progress=False)
    theirs, mine = TASK.policy(), TASK.policy()
    history = train(cfg, TASK, model=theirs)
    rewards = minimal.train(cfg, TASK, mine)
    assert rewards == [u["reward_mean"] for u in history["updates"]]
    for (name, a), b in zip(theirs.named_parameters(), mine.parameters()):
        assert torch.equal(a, b), name
    start = TASK.policy()
    assert any(not torch.equal(a, b) for a, b in zip(start.parameters(), mine.parameters()))  # the updates moved it


@pytest.mark.parametrize("overrides, field", [
    (dict(sampler={"family": "FlowCPS", "num_steps": 10}, train_steps_fraction=0.9), "sampler"),
    (dict(sampler=FlowSDE(10, grid=tuple(torch.linspace(1, 0.1, 10).tolist()))), "sampler"),
    (dict(prune_strategy="random"), "prune_strategy"),
    (dict(selection="top"), "selection"),
    (dict(device_batch=4), "device_batch"),
    (dict(audit_every=5), "audit_every"),
    (dict(audit_every=5, adaptive=True), "audit_every"),
    (dict(checkpoint_path="x.safetensors"), "checkpoint_path"),
])
def test_what_minimal_does_not_implement_is_refused_by_name(overrides, field):
    cfg = arm_config("standard", num_updates=1, progress=False, **overrides)
    with pytest.raises(ValueError, match=f"^{field}=.*minimal.train does not implement it"):
        minimal.train(cfg, TASK, TASK.policy())


def test_adaptive_is_refused_by_name():
    from dataclasses import replace

    cfg = replace(arm_config("standard", num_updates=1, progress=False), audit_every=0)
    object.__setattr__(cfg, "adaptive", True)  # a config minimal.train could otherwise run
    with pytest.raises(ValueError, match="^adaptive=True: minimal.train does not implement it"):
        minimal.train(cfg, TASK, TASK.policy())


def test_a_prune_schedule_of_three_points_runs(flow_model, margin_reward):
    s = PruneSchedule((16, 12, 8, 4), (3, 5, 8), 10)
    latents, log_probs, c, pruned = minimal.expand_and_prune(flow_model, torch.tensor([1]), s.group_sizes, s.prune_steps,
                                                             minimal.flow_sigmas(10), 0.7, margin_reward,
                                                             TrajectoryNoise(0, 1), (1, 8, 8))
    ro = expand_and_prune(flow_model, FlowSDE(), torch.tensor([1]), s, margin_reward, TrajectoryNoise(0, 1),
                          latent_shape=(1, 8, 8))
    assert latents.shape == (1, 4, 11, 1, 8, 8) and torch.equal(latents, ro.grouped(ro.latents))
