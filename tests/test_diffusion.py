"""The diffusion half through the same code path as the flow model: the committed diffusion model meets
its bar, and rollout, previews, Expand-and-Prune, the objective and train() run on it with only the task
and the sampler changed. Also the CPS sampler in the trainer (its last step is never trained on)."""
import pytest
import torch

from progrpo_ref import PRESETS, TrainConfig, arm_config, train
from progrpo_ref.digits import DigitsTask
from progrpo_ref.digits.data import IMAGE_SHAPE
from progrpo_ref.algorithm.grpo import grpo_objective, step_log_prob
from progrpo_ref.algorithm.noise import TrajectoryNoise
from progrpo_ref.algorithm.pro_grpo import expand_and_prune
from progrpo_ref.algorithm.rollout import NFECounter, rollout
from progrpo_ref.algorithm.samplers import DDIM, FlowCPS, FlowSDE
from progrpo_ref.machinery.run import strip_timings


@pytest.fixture(scope="module")
def diffusion_model():
    from progrpo_ref.digits.diffusion_model import load_diffusion_model

    return load_diffusion_model()


@pytest.fixture(scope="module")
def ddim():
    return DDIM(20, eta=1.0)


def test_the_committed_diffusion_model_meets_the_bar(diffusion_model):
    """At least 95% of 1000 samples (100 per digit, fixed seed) classified as the requested digit,
    20-step DDIM with eta = 0: re-measured here, not read from the checkpoint's metadata."""
    from progrpo_ref.digits.classifier import load_classifier
    from progrpo_ref.digits.pretrain import sample_accuracy
    from progrpo_ref.digits.serialization import checkpoint_metadata
    from progrpo_ref.digits.diffusion_model import DIFFUSION_CHECKPOINT

    acc = sample_accuracy(diffusion_model, load_classifier("reward"), per_class=100,
                          sampler=diffusion_model.sampler(20, eta=0.0))
    assert acc >= 0.95
    assert float(checkpoint_metadata(DIFFUSION_CHECKPOINT)["sample_accuracy"]) == pytest.approx(acc, abs=0.01)
    assert diffusion_model.sampler(20) == DDIM(20, eta=1.0)  # the model's schedule is the arms' default


def test_rescoring_in_the_rollouts_batch_gives_a_log_ratio_of_exactly_zero(diffusion_model, ddim):
    counter = NFECounter(diffusion_model)
    ro = rollout(counter, ddim, torch.tensor([0, 7, 3]), 4, TrajectoryNoise(2), latent_shape=IMAGE_SHAPE)
    assert counter.nfe == ro.nfe == 3 * 4 * 20 and counter.calls == 20  # measured NFE = the schedule's
    assert ro.latents.shape == (3 * 4, 21, 1, 8, 8) and ro.log_probs.shape == (3 * 4, 20)
    lat, c, old = ro.latents, ro.prompts, ro.log_probs
    with torch.no_grad():
        for t in range(20):
            assert torch.equal(step_log_prob(diffusion_model, ddim, lat, c, t).log_prob, old[:, t]), t


def test_expand_and_prune_on_the_diffusion_model(diffusion_model, ddim):
    task = DigitsTask(model="diffusion")
    model = NFECounter(diffusion_model)
    schedule = PRESETS["standard_sd14"]
    ro = expand_and_prune(model, ddim, torch.tensor([1, 2]), schedule, task.reward, 0, latent_shape=IMAGE_SHAPE)
    assert schedule.nfe() == 48 * 12 + 32 * 4 + 8 * 4 == 736 and PRESETS["dance_grpo"].nfe() == 320
    assert model.nfe == ro.nfe == 2 * 736 and model.calls == 20
    assert [p["call"] for p in ro.previews] == [12, 16] and [p["rewards"].shape for p in ro.previews] == [(2, 48), (2, 32)]
    assert ro.latents.shape == (2 * 8, 21, 1, 8, 8) and torch.isfinite(ro.log_probs).all()


@pytest.mark.parametrize("arm", ["dance_grpo", "standard_sd14"])
def test_train_runs_the_diffusion_arms(arm, tmp_path):
    task = DigitsTask(model="diffusion", eval_per_class=1, eval_group=4)
    cfg = arm_config(arm, num_updates=2, prompts_per_update=2, eval_every=2, beta=0.01, progress=False,
                     checkpoint_path=str(tmp_path / "d.safetensors"))
    assert isinstance(cfg.sampler, DDIM) and cfg.trained_steps == 20
    h = train(cfg, task)
    for row in h["updates"]:
        assert row["nfe_per_prompt"] == PRESETS[arm].nfe()
        assert row["trained_per_prompt"] == PRESETS[arm].final_size
        assert row["ratio_dev_first"] <= 1e-5
    assert h["task"]["model"] == "diffusion" and h["config"]["sampler"]["family"] == "DDIM"
    resumed = train(TrainConfig(**{**cfg.to_dict(), "num_updates": 3}), task, resume=True)
    assert strip_timings(resumed)["updates"][:2] == strip_timings(h)["updates"]


def test_train_refuses_a_sampler_that_does_not_fit_the_model_before_any_work():
    with pytest.raises(ValueError, match="the diffusion model needs DDIM"):
        train(arm_config("flow_grpo", num_updates=1, progress=False), DigitsTask(model="diffusion"))
    with pytest.raises(ValueError, match="the flow model needs FlowSDE or FlowCPS"):
        train(arm_config("dance_grpo", num_updates=1, progress=False), DigitsTask())


def test_the_diffusion_model_refuses_what_it_would_misread(diffusion_model):
    from progrpo_ref.digits.diffusion_model import DiffusionModelConfig

    with pytest.raises(ValueError, match="t must be integer timesteps in \\[0, 1000\\)"):
        diffusion_model(torch.zeros(2, 1, 8, 8), torch.tensor([0.5, 0.5]), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="prediction_type='v_prediction': the digits' diffusion model is trained"):
        DiffusionModelConfig(prediction_type="v_prediction")
    assert "model" not in DigitsTask().describe() and DigitsTask(model="diffusion").describe()["model"] == "diffusion"


def test_the_task_refuses_a_sampler_that_does_not_fit_its_model():
    with pytest.raises(ValueError, match="the diffusion model needs DDIM on its training schedule"):
        DigitsTask(model="diffusion").check_sampler(FlowSDE(20))
    with pytest.raises(ValueError, match="beta_schedule='linear'"):
        DigitsTask(model="diffusion").check_sampler(DDIM(20, beta_schedule="scaled_linear"))
    with pytest.raises(ValueError, match="the flow model needs FlowSDE or FlowCPS"):
        DigitsTask().check_sampler(DDIM(20))
    with pytest.raises(ValueError, match="model='unet' must be one of"):
        DigitsTask(model="unet")
    DigitsTask().check_sampler(FlowCPS(10))


# ---------------------------------------------------------------- CPS in the trainer
def test_cps_trains_on_its_first_nine_steps_only(flow_model, margin_reward):
    with pytest.raises(ValueError, match=r"trains on 10 steps but only the first 9 .* have a log-prob"):
        arm_config("flow_grpo", sampler=FlowCPS(10, 0.8))
    cfg = arm_config("standard", sampler=FlowCPS(10, 0.8), train_steps_fraction=0.9, num_updates=1,
                     prompts_per_update=1, eval_every=1, progress=False)
    assert cfg.trained_steps == 9
    h = train(cfg, DigitsTask(eval_per_class=1, eval_group=4))
    assert h["updates"][0]["nfe_per_prompt"] == 324 and h["updates"][0]["ratio_dev_first"] <= 1e-5
    # the rollout stores the deterministic last step's log-prob as NaN; the objective refuses it
    cps = FlowCPS(10, 0.8)
    ro = rollout(flow_model, cps, torch.tensor([4]), 3, 0, latent_shape=IMAGE_SHAPE)
    assert torch.isnan(ro.log_probs[:, 9]).all() and torch.isfinite(ro.log_probs[:, :9]).all()
    lat, c, old = ro.latents, ro.prompts, ro.log_probs
    calls = NFECounter(flow_model)
    with pytest.raises(ValueError, match=r"steps=\[8, 9\] include a step of FlowCPS.* that is deterministic"):
        grpo_objective(calls, cps, lat, c, old, torch.ones(3), [8, 9], 1e-3)
    assert calls.calls == 0  # refused before any forward pass
    # a sampler that does score step 9 (the SDE on the same grid) meets the rollout's NaN: refused, not trained on
    with pytest.raises(ValueError, match="old_log_probs are not finite at the trained steps"):
        grpo_objective(flow_model, FlowSDE(10), lat, c, old, torch.ones(3), range(10), 1e-3)
    out = grpo_objective(flow_model, cps, lat, c, old, torch.ones(3), range(9), 1e-3)
    assert out.max_abs_log_ratio == 0.0
