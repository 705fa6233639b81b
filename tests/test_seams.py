"""Proof that the seams hold: train() drives a diffusers SD3 transformer through SD3Task unchanged.

A tiny random configuration (16-channel 8x8 latents, random prompt embeddings, the decode-and-score
stand-in reward) on the CPU. What this covers: the adapter's interface, the trainer, the rollout, the
objective, Expand-and-Prune, NFE counting and checkpoints on a real SD3 transformer class. What it
does not: real weights, text encoders, guidance, LoRA or a real image reward.
"""
import pytest
import torch

from progrpo_ref import FlowSDE, arm_config, train
from progrpo_ref.adapters.sd3 import SD3Task
from progrpo_ref.algorithm.grpo import step_log_prob
from progrpo_ref.algorithm.noise import TrajectoryNoise
from progrpo_ref.algorithm.pro_grpo import PRESETS, expand_and_prune
from progrpo_ref.algorithm.rollout import NFECounter, rollout
from progrpo_ref.machinery.config import TrainConfig
from progrpo_ref.machinery.run import strip_timings


@pytest.fixture(scope="module")
def task():
    return SD3Task.tiny()


@pytest.mark.parametrize("arm", ["flow_grpo", "standard"])
def test_train_drives_an_sd3_transformer(task, arm, tmp_path):
    cfg = arm_config(arm, num_updates=2, prompts_per_update=2, eval_every=2, beta=0.01, progress=False,
                     checkpoint_path=str(tmp_path / "sd3.safetensors"))
    h = train(cfg, task)
    assert task.latent_shape == (16, 8, 8)
    for row in h["updates"]:
        assert row["nfe_per_prompt"] == PRESETS[arm].nfe()  # measured by wrapping the adapter
        assert row["trained_per_prompt"] == PRESETS[arm].final_size
        assert row["ratio_dev_first"] <= 1e-5  # the first mini-batch is on-policy up to batch composition
    assert [e["update"] for e in h["evals"]] == [0, 2] and h["task"]["name"] == "sd3_random"
    resumed = train(TrainConfig(**{**cfg.to_dict(), "num_updates": 3}), task, resume=True)  # the config rebuilt from JSON
    assert strip_timings(resumed)["updates"][:2] == strip_timings(h)["updates"]


def test_rescoring_in_the_rollouts_batch_gives_a_log_ratio_of_exactly_zero(task):
    model, sde = task.policy(), FlowSDE(10)
    counter = NFECounter(model)
    ro = rollout(counter, sde, torch.tensor([0, 3]), 4, TrajectoryNoise(1), latent_shape=task.latent_shape)
    assert counter.nfe == 2 * 4 * 10 and ro.latents.shape == (2 * 4, 11, 16, 8, 8)
    lat, c, old = ro.latents, ro.prompts, ro.log_probs
    with torch.no_grad():
        for t in range(10):
            assert torch.equal(step_log_prob(model, sde, lat, c, t).log_prob, old[:, t])


def test_expand_and_prune_counts_network_calls_on_sd3(task):
    model = NFECounter(task.policy())
    ro = expand_and_prune(model, FlowSDE(10), torch.tensor([1, 2]), PRESETS["standard"], task.reward, 0,
                          latent_shape=task.latent_shape)
    assert model.nfe == ro.nfe == 2 * 324 and model.calls == 10
    assert ro.latents.shape == (2 * 12, 11, 16, 8, 8) and torch.isfinite(ro.log_probs).all()
