"""Each trajectory's noise is a function of (seed, update, prompt position, trajectory index) only."""
import pytest
import torch

from progrpo_ref.algorithm.noise import TrajectoryNoise, as_noise, derive_seed, per_update_generator
from progrpo_ref.algorithm.pro_grpo import PruneSchedule, expand_and_prune
from progrpo_ref.algorithm.rollout import rollout
from progrpo_ref.algorithm.samplers import FlowSDE


def shrink(x, t, prompts):
    """An element-wise "model" (v = 0.5 x + prompt): its output for a sample does not depend on the batch."""
    return 0.5 * x + prompts.view(-1, 1, 1, 1).float()


def test_a_trajectory_draws_the_same_noise_in_any_batch_and_process():
    full = TrajectoryNoise(3, update=5).draws(3, 8, 11, (1, 4, 4))
    assert full.shape == (3, 8, 11, 1, 4, 4)
    alone = TrajectoryNoise(3, update=5, first_prompt=2).draws(1, 6, 11, (1, 4, 4))  # prompt 2 in another process
    assert torch.equal(alone[0], full[2, :6])
    assert not torch.equal(TrajectoryNoise(3, update=6).draws(3, 8, 11, (1, 4, 4)), full)  # another update
    assert not torch.equal(TrajectoryNoise(4, update=5).draws(3, 8, 11, (1, 4, 4)), full)  # another seed
    z = full.flatten(0, 2)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05


def test_rollouts_split_over_processes_reproduce_one_process():
    sde, prompts = FlowSDE(6), torch.tensor([4, 1, 7, 2])
    one = rollout(shrink, sde, prompts, 5, TrajectoryNoise(9, 1), latent_shape=(1, 4, 4))
    halves = [rollout(shrink, sde, prompts[i:i + 2], 5, TrajectoryNoise(9, 1, first_prompt=i), latent_shape=(1, 4, 4))
              for i in (0, 2)]
    assert torch.equal(torch.cat([h.latents for h in halves]), one.latents)
    assert torch.equal(torch.cat([h.log_probs for h in halves]), one.log_probs)


def test_pruning_does_not_change_the_survivors_noise():
    sde, prompts = FlowSDE(10), torch.tensor([0, 3])
    reward = lambda x, c: x.flatten(1).sum(1)  # noqa: E731
    pruned = expand_and_prune(shrink, sde, prompts, PruneSchedule((12, 6, 3), (4, 7), 10), reward, TrajectoryNoise(2, 8),
                              latent_shape=(1, 4, 4))
    full = rollout(shrink, sde, prompts, 12, TrajectoryNoise(2, 8), latent_shape=(1, 4, 4))
    first, second = pruned.previews[0]["keep"], pruned.previews[1]["keep"]
    survivors = first.gather(1, second)  # indices into the expanded group of 12
    assert torch.equal(pruned.kept, survivors)
    assert torch.equal(pruned.latents, full.select(survivors).latents)
    assert torch.equal(pruned.log_probs, full.select(survivors).log_probs)


def test_seeds_and_generators_are_pure_functions_of_their_key():
    assert derive_seed("train", 0, 1, 2, 3) == derive_seed("train", 0, 1, 2, 3) != derive_seed("train", 0, 1, 2, 4)
    assert 0 <= derive_seed("x") < 2**63
    a = torch.randperm(10, generator=per_update_generator(0, 3))
    assert torch.equal(a, torch.randperm(10, generator=per_update_generator(0, 3)))
    assert not torch.equal(a, torch.randperm(10, generator=per_update_generator(0, 4)))
    assert as_noise(5).seed == 5 and as_noise(None).seed == 0
    with pytest.raises(ValueError, match="noise=.* must be a TrajectoryNoise"):
        as_noise(torch.Generator())
    with pytest.raises(ValueError, match="update=-1 must be an integer >= 0"):
        TrajectoryNoise(0, update=-1)
