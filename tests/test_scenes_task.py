"""The scenes task through the unchanged trainer: a tiny random scene model (4 x 4 x 4 latents of a random 16 x 16
autoencoder, one joint block) on the CPU.
What this covers: the text encoder and SD3 transformer behind the Task seam, exact NFE, the on-policy log-ratio,
Expand-and-Prune and the evaluation's keys. What it does not: the pretrained model or any learning."""
import pytest
import torch

from progrpo_ref import FlowSDE, arm_config, train
from progrpo_ref.algorithm.grpo import step_log_prob
from progrpo_ref.algorithm.noise import TrajectoryNoise
from progrpo_ref.algorithm.pro_grpo import PRESETS
from progrpo_ref.algorithm.rollout import NFECounter, rollout
from progrpo_ref.scenes.grammar import CATEGORIES, SPECS, TRAIN
from progrpo_ref.scenes.model import NULL_PROMPT, SceneModel, SceneModelConfig
from progrpo_ref.scenes.task import ScenesTask

TINY = dict(latent_size=4, latent_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=8, text_width=16,
            text_layers=1, pooled_projection_dim=16)


@pytest.fixture(scope="module")
def task():
    return ScenesTask(eval_per_category=1, eval_per_prompt=1, eval_group=3, model_config=TINY)


@pytest.mark.parametrize("arm", ["flow_grpo", "standard"])
def test_train_drives_the_scene_model(task, arm):
    cfg = arm_config(arm, num_updates=1, prompts_per_update=2, eval_every=1, beta=0.01, progress=False)
    h = train(cfg, task)
    row = h["updates"][0]
    assert row["nfe_per_prompt"] == PRESETS[arm].nfe()  # measured by wrapping the model
    assert row["trained_per_prompt"] == PRESETS[arm].final_size
    assert row["ratio_dev_first"] <= 1e-5
    ev = h["evals"][-1]
    assert {f"eval_accuracy_{c}" for c in CATEGORIES} <= set(ev) and "eval_heldout_accuracy" in ev
    assert all(0 <= ev[k] <= 1 for k in ev if "accuracy" in k)
    assert h["task"]["name"] == "scenes"


def test_rescoring_gives_a_log_ratio_of_exactly_zero(task):
    model, sde = task.policy(), FlowSDE(10)
    counter = NFECounter(model)
    ro = rollout(counter, sde, torch.tensor([0, 500]), 3, TrajectoryNoise(1), latent_shape=task.latent_shape)
    assert counter.nfe == 2 * 3 * 10 and ro.latents.shape == (6, 11, 4, 4, 4)
    with torch.no_grad():
        for t in range(10):
            assert torch.equal(step_log_prob(model, sde, ro.latents, ro.prompts, t).log_prob, ro.log_probs[:, t])


def test_prompts_are_training_prompts_with_categories_alike(task):
    p = task.sample_prompts(6000, torch.Generator().manual_seed(0))
    assert set(p.tolist()) <= set(TRAIN)
    counts = torch.tensor([sum(SPECS[i].category == c for i in p.tolist()) for c in CATEGORIES], dtype=torch.float)
    assert (counts / 1000 - 1).abs().max() < 0.1  # 1000 each expected; position alone has 75% of the prompts


def test_the_prompt_changes_the_output_and_bad_inputs_are_refused():
    torch.manual_seed(0)
    m = SceneModel(SceneModelConfig(**TINY))
    x = torch.randn(2, 4, 4, 4)
    a, b = m(x, 0.5, torch.tensor([0, 0])), m(x, 0.5, torch.tensor([0, NULL_PROMPT]))
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match=r"expected \[B, 4, 4, 4\]"):
        m(torch.randn(2, 3, 16, 16), 0.5, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prompt id 9999"):
        m(x, 0.5, torch.tensor([0, 9999]))
    with pytest.raises(ValueError, match="FlowSDE or FlowCPS"):
        ScenesTask(model_config=TINY).check_sampler(object())
    with pytest.raises(ValueError, match="eval_group"):
        ScenesTask(eval_group=1, model_config=TINY)


def test_without_a_checkpoint_the_task_names_the_command_that_makes_it(tmp_path):
    from progrpo_ref.scenes.task import load_scene_model

    with pytest.raises(FileNotFoundError, match="python -m progrpo_ref.scenes.pretrain"):
        load_scene_model(tmp_path / "missing.safetensors")


def test_pretraining_runs_and_round_trips_through_its_checkpoint(tmp_path):
    """Two steps of the pretraining on a tiny model, saved and loaded back: the same outputs."""
    from progrpo_ref.digits.serialization import save_module
    from progrpo_ref.scenes.pretrain import PretrainConfig, pretrain
    from progrpo_ref.scenes.task import load_scene_model

    from progrpo_ref.scenes.autoencoder import AutoencoderConfig
    from progrpo_ref.scenes.pretrain import pretrain_autoencoder, rendered_data
    from progrpo_ref.scenes.task import load_autoencoder

    config = PretrainConfig(steps=2, autoencoder_steps=2, batch_size=8, scenes_per_prompt=1)
    data = rendered_data(1, 16, 0)[0][:64]
    ae, _ = pretrain_autoencoder(config, data, AutoencoderConfig(16, 4, 8), progress=False)
    with torch.no_grad():
        z = ae.encode(data.float() / 127.5 - 1)  # normalised as SD3's latents: mean 0, std 1 per channel
    assert torch.allclose(z.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z.std((0, 2, 3)), torch.ones(4), atol=1e-4)
    model, ae2, losses = pretrain(config, SceneModelConfig(**TINY), autoencoder=ae, progress=False)
    assert ae2 is ae and len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    save_module(model, tmp_path / "m.safetensors")
    save_module(ae, tmp_path / "ae.safetensors")
    back, ae_back = load_scene_model(tmp_path / "m.safetensors"), load_autoencoder(tmp_path / "ae.safetensors")
    x, p = torch.randn(2, 4, 4, 4), torch.tensor([3, NULL_PROMPT])
    with torch.no_grad():
        assert torch.equal(model(x, 0.3, p), back(x, 0.3, p))
        assert torch.equal(ae.decode(x), ae_back.decode(x))


def test_pretraining_is_judged_on_the_tasks_fixed_prompts():
    from progrpo_ref.scenes.grammar import HELD_OUT
    from progrpo_ref.scenes.pretrain import eval_prompts
    from progrpo_ref.scenes.task import fixed_prompts

    e = eval_prompts(3, seed=7)
    assert e["colors"] == fixed_prompts(3, 7, held_out=False)["colors"]
    assert e["heldout_position"] == fixed_prompts(3, 7, held_out=True)["position"]
    for name, ids in e.items():
        assert len(ids) == len(set(ids)) <= 3
        assert set(ids) <= set(HELD_OUT if name.startswith("heldout_") else TRAIN)
        assert {SPECS[i].category for i in ids} == {name.removeprefix("heldout_")}


def test_guidance_counts_both_branches_and_combines_them_as_sd3():
    """With w > 1 the NFE counts two passes per sample, and the output is v_u + w (v_c - v_u) of two separate calls."""
    task = ScenesTask(eval_per_category=1, eval_per_prompt=1, eval_group=3, guidance_scale=3.0, model_config=TINY)
    h = train(arm_config("flow_grpo", num_updates=1, prompts_per_update=2, eval_every=5, progress=False), task)
    assert h["updates"][0]["nfe_per_prompt"] == 2 * PRESETS["flow_grpo"].nfe()
    assert h["updates"][0]["ratio_dev_first"] <= 1e-5
    m = task.policy()
    x, p = torch.randn(3, 4, 4, 4), torch.tensor([0, 7, 500])
    with torch.no_grad():
        c = m.velocity(x, torch.full((3,), 0.4), p)
        u = m.velocity(x, torch.full((3,), 0.4), torch.full((3,), NULL_PROMPT))
        assert torch.allclose(m(x, 0.4, p), u + 3.0 * (c - u), atol=1e-5)
    with pytest.raises(ValueError, match="guidance_scale=0.5"):
        ScenesTask(guidance_scale=0.5, model_config=TINY)


def test_rewards_see_decoded_pixels_and_refuse_bad_latents(task):
    z = torch.randn(2, *task.latent_shape)
    assert task.images(z).shape == (2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"expected \[B, 4, 4, 4\]"):
        task.reward(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prompt id -1"):
        task.reward(z, torch.tensor([0, -1]))


def test_the_committed_models_are_decent_and_far_from_perfect():
    """The committed autoencoder keeps rendered scenes readable; the committed flow model satisfies some, not all,
    prompts (fixed-seed ODE samples, one per prompt, 8 training prompts per category)."""
    from progrpo_ref.algorithm.rollout import sample
    from progrpo_ref.scenes.checker import geneval_scores
    from progrpo_ref.scenes.render import render
    from progrpo_ref.scenes.task import fixed_prompts

    task = ScenesTask()
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor(TRAIN[1::5][:200])
    renders = torch.stack([render(SPECS[i], g, 24)[0] for i in ids.tolist()])
    with torch.no_grad():
        assert geneval_scores(task.images(task.autoencoder.encode(renders)), ids)[1].float().mean() > 0.9
        p = torch.tensor([i for v in fixed_prompts(8, 5, held_out=False).values() for i in v])
        latents = sample(task.policy(), FlowSDE(10, noise_level=0.0), p, noise=0, latent_shape=task.latent_shape)
    accuracy = geneval_scores(task.images(latents), p)[1].float().mean()
    assert 0.15 < accuracy < 0.8, accuracy
