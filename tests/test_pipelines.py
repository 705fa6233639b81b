"""Pipeline tasks on tiny diffusers pipelines built from configuration (nothing downloaded).

Each check compares against something computed another way: the network called directly (a forward
hook counts its rows; the two guidance branches called separately), the stored log-probs of the
rollout, the weights before the update, a fresh pipeline with ``load_lora_weights``, transformers'
own CLIP logits."""
import json
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from progrpo_ref.adapters.image_rewards import ClipReward, JpegCompressibility  # noqa: E402
from progrpo_ref.adapters.lora import ADAPTER, LoRA, export_lora  # noqa: E402
from progrpo_ref.adapters.pipeline_task import SD3PipelineTask, SDPipelineTask  # noqa: E402
from progrpo_ref.adapters.presets import sd14_config, sd35_config  # noqa: E402
from progrpo_ref.adapters.tiny import clip_tokenizer, tiny_sd3_pipeline, tiny_sd_pipeline  # noqa: E402
from progrpo_ref.machinery.checkpoint import load_training_checkpoint  # noqa: E402
from progrpo_ref.algorithm.grpo import step_log_prob  # noqa: E402
from progrpo_ref.algorithm.pro_grpo import PruneSchedule  # noqa: E402
from progrpo_ref.algorithm.rollout import rollout  # noqa: E402
from progrpo_ref.machinery.config import TrainConfig
from progrpo_ref.machinery.run import strip_timings
from progrpo_ref.machinery.trainer import train  # noqa: E402

PROMPTS = ["a red cat", "a blue dog", "a green bird on grass", "a small fish", "a photo of a big dog"]
KINDS = ("sd3", "sd")


def make_task(kind, guidance=1.0, lora=None, **kw):
    if kind == "sd3":
        return SD3PipelineTask(tiny_sd3_pipeline(), PROMPTS, JpegCompressibility(), guidance_scale=guidance, lora=lora,
                               max_sequence_length=8, **kw)
    return SDPipelineTask(tiny_sd_pipeline(), PROMPTS, JpegCompressibility(), guidance_scale=guidance, lora=lora, **kw)


def config(task, kind, schedule=PruneSchedule((4,), (), 4), **kw):
    fields = dict(arm="tiny", schedule=schedule, sampler=task.sampler(schedule.num_steps), num_updates=1,
                  prompts_per_update=2, lr=1e-2, eval_every=1, progress=False,
                  train_steps_fraction=0.75 if kind == "sd3" else 1.0)
    return TrainConfig(**{**fields, **kw})


def row_counter(net):
    """Counts the rows the network itself sees (a forward hook; independent of NFECounter)."""
    seen = {"rows": 0, "calls": 0}

    def hook(module, args, kwargs, out):
        x = kwargs.get("hidden_states", args[0] if args else kwargs.get("sample"))
        seen["rows"] += x.shape[0]
        seen["calls"] += 1

    return seen, net.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("kind", KINDS)
def test_prompts_go_through_encode_prompt_and_shapes_fit(kind):
    task = make_task(kind, guidance=3.0, encode_batch=3)  # the table is built in chunks of 3 prompts
    policy = task.policy()
    n = len(PROMPTS) + len(task.eval_prompts)
    assert policy.table["prompt_embeds"].shape[0] == n and policy.negative["prompt_embeds"].shape[0] == 1
    pipe = task.pipeline
    # the pipeline's own encoding of one prompt, in isolation, with its negative branch for guidance
    if kind == "sd3":
        direct, negative = pipe.encode_prompt(PROMPTS[4], None, None, do_classifier_free_guidance=True,
                                              negative_prompt="", max_sequence_length=8)[:2]
    else:
        direct, negative = pipe.encode_prompt([PROMPTS[4]], "cpu", 1, True, [""])
    torch.testing.assert_close(policy.table["prompt_embeds"][4:5], direct, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(policy.negative["prompt_embeds"], negative, rtol=1e-5, atol=1e-6)
    C, h, w = task.latent_shape
    assert (h, w) == (8, 8) and C == (16 if kind == "sd3" else 4)
    x = torch.randn(3, *task.latent_shape)
    t = task.sampler(4).model_time(1).expand(3)
    assert policy(x, t, torch.tensor([0, 1, 2])).shape == x.shape
    images = task.decode(x)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32 and 0 <= images.min() <= images.max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_guidance_is_both_branches_in_one_call_and_counts_two_nfe(kind):
    w = 4.5
    task = make_task(kind, guidance=w)
    policy = task.policy()
    x, ids = torch.randn(3, *task.latent_shape), torch.tensor([0, 3, 1])
    t = task.sampler(4).model_time(2).expand(3)
    seen, handle = row_counter(policy.net)
    with torch.no_grad():
        guided = policy(x, t, ids)
    assert seen == {"rows": 6, "calls": 1}
    handle.remove()
    with torch.no_grad():  # each branch on its own, in a separate call
        cond = policy.call_net(x, t, policy.embeds(ids, "cpu"))
        uncond = policy.call_net(x, t, policy.embeds(ids, "cpu", negative=True))
    torch.testing.assert_close(guided, uncond + w * (cond - uncond), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_nfe_and_exact_rescoring_in_the_rollouts_batch(kind, guidance):
    task = make_task(kind, guidance=guidance, lora=LoRA(4, 8.0))
    policy = task.policy()
    sampler, P, G = task.sampler(4), 2, 3
    seen, handle = row_counter(policy.net)
    with torch.no_grad():
        r = rollout(policy, sampler, torch.tensor([0, 4]), G, noise=7, latent_shape=task.latent_shape)
    handle.remove()
    passes = 2 if guidance > 1 else 1
    assert r.nfe == P * G * sampler.num_steps * passes == seen["rows"]
    assert seen["calls"] == sampler.num_steps
    latents, prompts = r.latents, r.prompts
    for t in range(sampler.trainable_steps):
        with torch.no_grad():
            again = step_log_prob(policy, sampler, latents, prompts, t).log_prob
        assert torch.equal(again, r.log_probs[:, t]), f"step {t}: log-ratio not exactly 0"


@pytest.mark.parametrize("kind", KINDS)
def test_one_update_changes_only_the_lora_and_the_reference_stays(kind):
    task = make_task(kind, guidance=2.0, lora=LoRA(4, 12.0))
    policy = task.policy()
    reference = task.reference(policy)
    before = {k: v.detach().clone() for k, v in policy.net.named_parameters()}
    x, ids = torch.randn(4, *task.latent_shape), torch.tensor([0, 1, 2, 3])
    t = task.sampler(4).model_time(1).expand(4)
    with torch.no_grad():
        ref_before = reference(x, t, ids)
    trainable = {k for k, p in policy.net.named_parameters() if p.requires_grad}
    assert trainable and all(f".{ADAPTER}." in k for k in trainable)
    train(config(task, kind, beta=0.1, num_updates=2), task, model=policy)
    after = dict(policy.net.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    assert changed and changed <= trainable, f"non-adapter weights changed: {sorted(changed - trainable)[:3]}"
    with torch.no_grad():
        assert torch.equal(reference(x, t, ids), ref_before)
        assert not torch.equal(policy(x, t, ids), ref_before)


def test_full_finetune_reference_is_a_frozen_copy():
    task = make_task("sd", lora=None)
    policy = task.policy()
    reference = task.reference(policy)
    x, ids = torch.randn(2, *task.latent_shape), torch.tensor([0, 1])
    t = task.sampler(4).model_time(0).expand(2)
    with torch.no_grad():
        ref_before = reference(x, t, ids)
    h = train(config(task, "sd", beta=0.1), task, model=policy)
    assert h["updates"][0]["kl"] > 0  # the second mini-batch is off the reference
    with torch.no_grad():
        assert torch.equal(reference(x, t, ids), ref_before) and not torch.equal(policy(x, t, ids), ref_before)


@pytest.mark.parametrize("kind", KINDS)
def test_expand_and_prune_through_the_pipeline(kind):
    task = make_task(kind, guidance=3.0, lora=LoRA(2, 4.0))
    schedule = PruneSchedule((6, 4, 2), (2, 3), 4)
    h = train(config(task, kind, schedule=schedule, num_updates=1), task)
    u = h["updates"][0]
    P = 2
    assert u["nfe_per_prompt"] == 2 * (6 * 2 + 4 * 1 + 2 * 1)  # both guidance branches
    assert u["trained_per_prompt"] == 2
    assert u["task_vae_decodes"] == P * (6 + 4 + 2)  # previews at both prunes, then the survivors' finals
    assert u["task_reward_images"] == P * (6 + 4 + 2)


@pytest.mark.parametrize("kind", KINDS)
def test_resume_restores_the_adapter_exactly(kind, tmp_path):
    path = tmp_path / "run.safetensors"
    full_task = make_task(kind, guidance=2.0, lora=LoRA(3, 5.0))
    full = train(config(full_task, kind, num_updates=3, checkpoint_path=str(path)), full_task)
    final = {k: v.detach().clone() for k, v in full_task.network.named_parameters() if f".{ADAPTER}." in k}
    saved = {k.removeprefix("net."): v for k, v in load_training_checkpoint(path)["model"].items()}
    assert set(saved) == set(final) and all(torch.equal(saved[k], final[k]) for k in final)  # only the adapter

    part_path = tmp_path / "part.safetensors"
    task = make_task(kind, guidance=2.0, lora=LoRA(3, 5.0))
    train(config(task, kind, num_updates=1, checkpoint_path=str(part_path)), task)
    fresh = make_task(kind, guidance=2.0, lora=LoRA(3, 5.0))  # a new process: a new pipeline
    resumed = train(config(fresh, kind, num_updates=3, checkpoint_path=str(part_path)), fresh, resume=True)
    assert strip_timings(resumed) == strip_timings(full)
    for k, v in fresh.network.named_parameters():
        if f".{ADAPTER}." in k:
            assert torch.equal(v.detach(), final[k]), k
    other = make_task(kind, guidance=2.0, lora=LoRA(3, 5.0))  # other base weights, the same configuration
    with torch.no_grad():
        next(other.network.parameters()).add_(1e-3)
    other = type(other)(other.pipeline, PROMPTS, JpegCompressibility(), guidance_scale=2.0, lora=LoRA(3, 5.0),
                        **({"max_sequence_length": 8} if kind == "sd3" else {}))
    with pytest.raises(ValueError, match="network_weights_sha"):
        train(config(other, kind, num_updates=3, checkpoint_path=str(part_path)), other, resume=True)


@pytest.mark.parametrize("kind", KINDS)
def test_exported_lora_reloads_exactly_with_alpha_not_rank(kind, tmp_path):
    task = make_task(kind, guidance=2.0, lora=LoRA(4, 16.0))  # alpha / r = 4
    train(config(task, kind, num_updates=2, lr=5e-2), task)
    component = task.component
    export_lora(task.pipeline, component, tmp_path / "with")
    export_lora(task.pipeline, component, tmp_path / "without", metadata=False)

    torch.manual_seed(3)
    x = torch.randn(2, *task.latent_shape)
    net = task.network
    if kind == "sd3":
        args = dict(encoder_hidden_states=torch.randn(2, 24, 32), pooled_projections=torch.randn(2, 32),
                    timestep=torch.tensor([700.0, 300.0]))
        call = lambda m: m(hidden_states=x, return_dict=False, **args)[0]
        fresh = lambda: tiny_sd3_pipeline()
    else:
        args = dict(encoder_hidden_states=torch.randn(2, 16, 16))
        call = lambda m: m(x, torch.tensor([700, 300]), return_dict=False, **args)[0]
        fresh = lambda: tiny_sd_pipeline()
    with torch.no_grad():
        trained = call(net)
        net.disable_adapters()
        base = call(net)
        net.enable_adapters()
    assert (trained - base).abs().max() > 1e-4  # the adapter does something
    reloaded = {}
    for name in ("with", "without"):
        pipe = fresh()
        pipe.load_lora_weights(str(tmp_path / name))
        with torch.no_grad():
            reloaded[name] = call(getattr(pipe, component))
    torch.testing.assert_close(reloaded["with"], trained, rtol=0, atol=1e-6)
    # without the metadata alpha is lost: the update comes back scaled by r / alpha = 1/4
    lossy_error = (reloaded["without"] - trained).abs().max()
    assert lossy_error > 100 * (reloaded["with"] - trained).abs().max() + 1e-5
    meta = json.loads(__import__("safetensors").safe_open(str(tmp_path / "with" / "pytorch_lora_weights.safetensors"),
                                                          "pt").metadata()["lora_adapter_metadata"])
    assert meta[f"{component}.lora_alpha"] == 16.0 and meta[f"{component}.r"] == 4


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_network_fp32_adapter_and_sampler_math(kind):
    task = make_task(kind, guidance=2.0, lora=LoRA(4, 8.0), bf16=True)
    policy = task.policy()
    dtypes = {(f".{ADAPTER}." in k, p.dtype) for k, p in policy.net.named_parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    sampler = task.sampler(4)
    x = torch.randn(2, *task.latent_shape)
    out = policy(x, sampler.model_time(0).expand(2), torch.tensor([0, 1]))
    assert out.dtype == torch.float32
    assert sampler.step(out, x, 0).log_prob.dtype == torch.float32
    h = train(config(task, kind), task, model=policy)
    assert math.isfinite(h["updates"][0]["loss"])


def test_gradient_checkpointing_gives_the_same_gradient():
    grads = []
    for checkpointing in (False, True):
        task = make_task("sd3", guidance=2.0, lora=LoRA(4, 8.0), gradient_checkpointing=checkpointing)
        policy = task.policy()
        torch.manual_seed(0)
        x = torch.randn(2, *task.latent_shape)
        policy(x, torch.tensor([0.7, 0.3]), torch.tensor([0, 1])).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in policy.parameters() if p.requires_grad]))
    assert policy.net.is_gradient_checkpointing
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_sd35_preset_previews_at_the_pipelines_sigmas(capsys):
    task = make_task("sd3")
    config = sd35_config(task, "standard")
    printed = capsys.readouterr().out
    assert "call 5 (sigma 0.790)" in printed and "call 7 (sigma 0.602)" in printed
    # the grid in closed form: shift 3 applied to linspace(1, shift(1/1000), 10), then 0
    shift = lambda s: 3 * s / (1 + 2 * s)
    u = torch.linspace(1.0, shift(1e-3), 10, dtype=torch.float64)
    torch.testing.assert_close(config.sampler.sigmas[:-1].double(), shift(u), rtol=0, atol=1e-6)
    assert config.trained_steps == 9 and config.schedule.group_sizes == (48, 24, 12)
    # and the sigmas the pipeline itself samples with when asked for 10 steps
    task.pipeline(PROMPTS[:1], num_inference_steps=10, height=16, width=16, output_type="latent", max_sequence_length=8)
    torch.testing.assert_close(config.sampler.sigmas, task.pipeline.scheduler.sigmas.float(), rtol=0, atol=1e-6)
    sd = sd14_config(make_task("sd"), "standard_sd14")
    assert sd.sampler.num_steps == 50 and "call 30" in capsys.readouterr().out
    assert config.lr == 1e-5 and sd35_config(make_task("sd3", lora=LoRA(4, 8.0)), verbose=False).lr == 3e-4


def test_clip_reward_matches_transformers_logits():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=200, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))
    tokenizer = clip_tokenizer()
    reward = ClipReward(model, tokenizer)
    images, prompts = torch.rand(3, 3, 32, 32), ["a cat", "a red dog", "a bird"]
    got = reward(images, prompts)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    pixels = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # already 32 px: resizing is the identity
    tokens = tokenizer(prompts, padding="max_length", return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels).logits_per_image
    torch.testing.assert_close(got, logits.diagonal(), rtol=1e-4, atol=1e-4)


def test_jpeg_reward_prefers_flat_images():
    r = JpegCompressibility()(torch.cat([torch.full((1, 3, 16, 16), 0.5), torch.rand(1, 3, 16, 16)]), ["a", "b"])
    assert r.shape == (2,) and r[0] > r[1]


def test_bad_inputs_raise_naming_the_value():
    pipe = tiny_sd_pipeline()
    with pytest.raises(ValueError, match="prompts"):
        SDPipelineTask(pipe, "a cat", JpegCompressibility())
    with pytest.raises(ValueError, match="guidance_scale=0.5"):
        SDPipelineTask(pipe, PROMPTS, JpegCompressibility(), guidance_scale=0.5)
    with pytest.raises(ValueError, match="resolution=15"):
        SDPipelineTask(pipe, PROMPTS, JpegCompressibility(), resolution=15)
    with pytest.raises(ValueError, match="decode_batch=0"):
        SDPipelineTask(pipe, PROMPTS, JpegCompressibility(), decode_batch=0)
    with pytest.raises(ValueError, match="rank=0"):
        LoRA(0)
    task = SDPipelineTask(pipe, PROMPTS, lambda images, prompts: torch.zeros(len(images) + 1))
    with pytest.raises(ValueError, match="reward_fn returned shape"):
        task.reward(torch.randn(2, *task.latent_shape), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs DDIM"):
        train(TrainConfig(num_updates=1, progress=False), task)
    with pytest.raises(ValueError, match="rectified flow"):
        sd3 = make_task("sd3")
        train(TrainConfig(schedule=PruneSchedule((4,), (), 20), sampler=task.sampler(20), num_updates=1, progress=False), sd3)


@pytest.mark.parametrize("kind", KINDS)
def test_a_pipeline_loaded_in_bf16(kind):
    low = (tiny_sd3_pipeline() if kind == "sd3" else tiny_sd_pipeline()).to(torch.bfloat16)
    kw = dict(max_sequence_length=8) if kind == "sd3" else {}
    Task = SD3PipelineTask if kind == "sd3" else SDPipelineTask
    with pytest.raises(ValueError, match="pass bf16=True"):
        Task(low, PROMPTS, JpegCompressibility(), lora=LoRA(4, 8.0), **kw).policy()
    task = Task(low, PROMPTS, JpegCompressibility(), guidance_scale=2.0, lora=LoRA(4, 8.0), bf16=True, **kw)
    h = train(config(task, kind), task)
    assert math.isfinite(h["updates"][0]["loss"]) and math.isfinite(h["evals"][-1]["eval_reward"])
    full = Task((tiny_sd3_pipeline() if kind == "sd3" else tiny_sd_pipeline()).to(torch.bfloat16), PROMPTS,
                JpegCompressibility(), bf16=True, **kw)
    assert {p.dtype for p in full.policy().parameters()} == {torch.float32}  # a full fine-tune's weights for Adam


def test_policy_twice_gives_the_same_fresh_adapter_and_host_embeddings_change_nothing():
    task = make_task("sd3", guidance=2.0, lora=LoRA(4, 8.0))
    first = {k: v.detach().clone() for k, v in task.policy().named_parameters() if v.requires_grad}
    host = make_task("sd3", guidance=2.0, lora=LoRA(4, 8.0), embeddings_device="cpu", decode_batch=1)
    second = host.policy()
    assert {k: v for k, v in second.named_parameters() if v.requires_grad}.keys() == first.keys()
    assert all(torch.equal(v, first[k]) for k, v in second.named_parameters() if v.requires_grad)
    x, ids = torch.randn(3, *task.latent_shape), torch.tensor([4, 0, 2])
    with torch.no_grad():
        assert torch.equal(task.policy()(x, torch.full((3,), 0.5), ids), second(x, torch.full((3,), 0.5), ids))
    # the evaluation's noise follows the prompt's position, not the micro-batch (decode_batch 8 vs 1)
    sampler = task.sampler(4)
    a, b = task.evaluate(task.policy(), sampler)["eval_reward"], host.evaluate(second, sampler)["eval_reward"]
    assert abs(a - b) < 1e-4


def test_the_flow_grid_is_checked():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from progrpo_ref.algorithm.samplers import FlowSDE

    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        FlowSDE.from_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 10)
    with pytest.raises(ValueError, match="grid has 2 sigmas but num_steps=3"):
        FlowSDE(num_steps=3, grid=(1.0, 0.5))
    with pytest.raises(ValueError, match="strictly decreasing"):
        FlowSDE(num_steps=3, grid=(1.0, 0.5, 0.6))
    with pytest.warns(UserWarning, match="does not sample on the pipeline scheduler's sigmas"):
        make_task("sd3").check_sampler(FlowSDE(10))
