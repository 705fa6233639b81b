"""The training loop: every arm runs on the digits task, configs are validated, checkpoints resume exactly."""
import json
from pathlib import Path

import pytest
import torch

from progrpo_ref.digits import DigitsTask
from progrpo_ref.algorithm.pro_grpo import PruneSchedule
from progrpo_ref.algorithm.samplers import FlowSDE
from progrpo_ref.machinery.config import ARMS, TrainConfig, arm_config
from progrpo_ref.machinery.run import strip_timings
from progrpo_ref.machinery.trainer import train

TINY = dict(num_updates=2, prompts_per_update=2, eval_every=2, progress=False)
TASK = DigitsTask(eval_per_class=2, eval_group=4)


DIFFUSION_TASK = DigitsTask(model="diffusion", eval_per_class=2, eval_group=4)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_trains(arm):
    cfg = arm_config(arm)
    # the update-0 evaluation must equal another arm's of the same model (the same eval seed, no training yet)
    task, base = ((DIFFUSION_TASK, "standard_sd14" if arm == "dance_grpo" else "dance_grpo") if cfg.sampler.__class__.__name__ == "DDIM"
                  else (TASK, "flow_grpo" if arm == "g12" else "g12"))
    h = train(arm_config(arm, **TINY), task)
    for row in h["updates"]:
        placed = row.get("placement")  # the adaptive arm samples with the audit's placement
        nfe = PruneSchedule(tuple(placed["group_sizes"]), tuple(placed["prune_steps"]), 10).nfe() if placed else cfg.schedule.nfe()
        assert row["nfe_per_prompt"] == nfe
        assert row["trained_per_prompt"] == cfg.trained_group_size
        assert 0 <= row["cluster_frac"] <= 1 and row["ratio_dev_first"] < 1e-5
    assert [e["update"] for e in h["evals"]] == [0, 2]
    assert h["task"] == task.describe() and h["config"]["arm"] == arm
    json.dumps(h)  # the history is plain JSON
    assert h["evals"][0]["eval_margin"] == pytest.approx(train(arm_config(base, **{**TINY, "num_updates": 0}), task)["evals"][0]["eval_margin"])


def test_resume_reproduces_the_history(tmp_path):
    base = dict(TINY, num_updates=4, schedule=PruneSchedule((8, 4), (5,), 10), beta=0.01)
    full = train(arm_config("standard", **base), TASK)
    ckpt = tmp_path / "run.safetensors"
    train(arm_config("standard", **{**base, "num_updates": 2, "checkpoint_path": str(ckpt)}), TASK)
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed, not left behind
    resumed = train(arm_config("standard", **{**base, "checkpoint_path": str(ckpt)}), TASK, resume=True)
    assert strip_timings(resumed) == strip_timings(full)


def test_resume_refuses_a_different_config_and_names_bad_files(tmp_path):
    ckpt = tmp_path / "run.safetensors"
    base = dict(TINY, num_updates=1, checkpoint_path=str(ckpt))
    train(arm_config("flow_grpo", **base), TASK)
    with pytest.raises(ValueError, match=r"config differs .* lr: checkpoint 0.0001, now 0.0002; seed: checkpoint 0, now 3"):
        train(arm_config("flow_grpo", **{**base, "lr": 2e-4, "seed": 3, "num_updates": 2}), TASK, resume=True)
    with pytest.raises(ValueError, match="task.reward_name: checkpoint 'margin', now 'prob'"):
        train(arm_config("flow_grpo", **{**base, "num_updates": 2}), DigitsTask(reward_name="prob", eval_per_class=2, eval_group=4), resume=True)
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError, match="absent.safetensors"):
        train(arm_config("flow_grpo", **{**base, "checkpoint_path": str(missing)}), TASK, resume=True)
    bad = tmp_path / "truncated.safetensors"
    bad.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.safetensors is unreadable"):
        train(arm_config("flow_grpo", **{**base, "checkpoint_path": str(bad)}), TASK, resume=True)


@pytest.mark.parametrize("overrides, match", [
    (dict(selection="best"), "selection='best' must be 'all' or one of"),
    (dict(select_k=30, selection="ovf"), r"select_k=30 must be in \[2, 24\]"),
    (dict(prune_strategy="median"), "prune_strategy='median'"),
    (dict(lr=0), r"lr=0 must be a finite number in \(0, 1\]"),
    (dict(lr=float("nan")), "lr=nan"),
    (dict(clip_range=-1e-3), "clip_range=-0.001"),
    (dict(beta=-0.1), r"beta=-0.1 must be a finite number in \[0, inf\)"),
    (dict(num_minibatches=0), "num_minibatches=0 must be an integer >= 1"),
    (dict(num_minibatches=100, prompts_per_update=2), "num_minibatches=100 must be <= the 48 trajectories"),
    (dict(train_steps_fraction=1.5), r"train_steps_fraction=1.5 must be a finite number in \(0, 1\]"),
    (dict(train_steps_fraction=0), "train_steps_fraction=0"),
    (dict(prompts_per_update=0), "prompts_per_update=0 must be an integer >= 1"),
    (dict(num_updates=-1), "num_updates=-1"),
    (dict(num_updates=2.5), "num_updates=2.5 must be an integer"),
    (dict(eval_every=0), "eval_every=0"),
    (dict(adv_clip=0), "adv_clip=0"),
    (dict(adv_eps=0), r"adv_eps=0 must be a finite number in \(0, 1\]"),
    (dict(max_grad_norm=0), "max_grad_norm=0"),
    (dict(seed=-1), "seed=-1"),
    (dict(device="gpu0"), "device='gpu0' is not a torch device"),
    (dict(sampler=FlowSDE(10, 0.0)), "deterministic: a trainable run needs a stochastic sampler"),
    (dict(sampler=FlowSDE(20)), "the sampler has 20 steps but the schedule 10"),
    (dict(sampler="sde"), "sampler='sde' must be a Sampler"),
    (dict(checkpoint_every=-2), "checkpoint_every=-2"),
])
def test_config_errors_name_the_value_and_the_rule(overrides, match):
    with pytest.raises(ValueError, match=match):
        arm_config("flow_grpo", **overrides)


def test_other_bad_input():
    with pytest.raises(ValueError, match="arm='grpo' must be one of"):
        arm_config("grpo")
    with pytest.raises(ValueError, match="task dict lacks"):
        train(arm_config("flow_grpo", **TINY), {})
    with pytest.raises(ValueError, match="reward 'pickscore' is unknown"):
        DigitsTask(reward_name="pickscore")
    with pytest.raises(ValueError, match="eval_group=1 must be an integer >= 2"):
        DigitsTask(eval_group=1)
    with pytest.raises(ValueError, match="resume=True needs config.checkpoint_path"):
        train(arm_config("flow_grpo", **TINY), TASK, resume=True)
    with pytest.raises(ValueError, match="noise_level=True"):
        FlowSDE(10, True)


def test_resume_edge_cases(tmp_path):
    ckpt = str(tmp_path / "run.safetensors")
    base = dict(TINY, num_updates=3, eval_every=2, prompts_per_update=1, checkpoint_path=ckpt)
    done = train(arm_config("g12", **base), TASK)
    assert [e["update"] for e in done["evals"]] == [0, 2, 3]  # the end-of-run evaluation, off the grid
    again = train(arm_config("g12", **base), TASK, resume=True)  # nothing left to do: the history as it was
    assert strip_timings(again) == strip_timings(done)
    with pytest.raises(ValueError, match="num_updates=2 is fewer than the 3 updates"):
        train(arm_config("g12", **{**base, "num_updates": 2}), TASK, resume=True)
    longer = train(arm_config("g12", **{**base, "num_updates": 4}), TASK, resume=True)
    assert [e["update"] for e in longer["evals"]] == [0, 2, 4]


def test_every_minibatch_steps_the_optimizer(monkeypatch):
    steps = []
    original = torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: steps.append(1) or original(self, *a, **k))
    # 12 trajectories in 5 mini-batches: chunk() would give 4 parts, tensor_split gives 5 (3, 3, 2, 2, 2)
    train(arm_config("g12", **{**TINY, "num_updates": 1, "prompts_per_update": 1, "num_minibatches": 5}), TASK)
    assert len(steps) == 5


def test_only_trainable_parameters_are_trained():
    model = TASK.policy()
    model.prompt_tokens.requires_grad_(False)  # as a LoRA setup freezes the base weights
    frozen, other = model.prompt_tokens.weight.clone(), model.prompt_pooled.weight.clone()
    train(arm_config("g12", **{**TINY, "num_updates": 1, "prompts_per_update": 1}), TASK, model=model)
    assert torch.equal(model.prompt_tokens.weight, frozen) and not torch.equal(model.prompt_pooled.weight, other)
    with pytest.raises(ValueError, match="has no parameter with requires_grad=True"):
        train(arm_config("g12", **TINY), TASK, model=TASK.policy().requires_grad_(False))


def test_trained_steps_follow_flow_grpo_counting():
    assert arm_config("flow_grpo").trained_steps == 10
    assert arm_config("flow_grpo", train_steps_fraction=0.99).trained_steps == 9  # skips the last, nearly clean step
    assert arm_config("flow_grpo", train_steps_fraction=0.01).trained_steps == 1


def test_config_round_trips_through_json():
    c = arm_config("standard", beta=0.01)
    d = json.loads(json.dumps(c.to_dict()))
    assert d["schedule"] == {"group_sizes": [48, 24, 12], "prune_steps": [5, 7], "num_steps": 10}
    assert d["sampler"] == {"family": "FlowSDE", "num_steps": 10, "noise_level": 0.7, "shift": 1.0, "grid": None}
    assert TrainConfig(**d) == c  # rebuilt from JSON: schedule and sampler included
    with pytest.raises(ValueError, match="sampler family 'DPMSolver' is unknown"):
        TrainConfig(**{**d, "sampler": {"family": "DPMSolver", "num_steps": 10}})
    ddim = arm_config("standard_sd14").to_dict()
    assert ddim["sampler"]["family"] == "DDIM" and TrainConfig(**json.loads(json.dumps(ddim))) == arm_config("standard_sd14")
    p = arm_config("flow_grpo", device=torch.device("cpu"), checkpoint_path=Path("/tmp/x.safetensors"))
    assert p.device == "cpu" and p.checkpoint_path == "/tmp/x.safetensors" and json.dumps(p.to_dict())


def test_a_checkpoint_from_before_a_field_was_added_still_resumes(tmp_path):
    """Checkpoints written before FlowSDE.grid and the audit fields existed lack them; at their defaults they resume."""
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "old.safetensors"
    base = dict(num_updates=1, prompts_per_update=2, eval_every=1, progress=False, checkpoint_path=str(path))
    train(arm_config("flow_grpo", **base), TASK)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = _json.loads(meta["state"])
    del state["config"]["sampler"]["grid"]
    for k in ("audit_every", "audit_prompts", "adaptive", "fidelity_target", "fidelity_z"):
        del state["config"][k]
    save_file(tensors, str(path), metadata={**meta, "state": _json.dumps(state)})
    h = train(arm_config("flow_grpo", **{**base, "num_updates": 2}), TASK, resume=True)
    assert len(h["updates"]) == 2
    with pytest.raises(ValueError, match="audit_every"):  # a real difference is still refused
        train(arm_config("flow_grpo", **{**base, "num_updates": 3, "audit_every": 1}), TASK, resume=True)


def test_a_logged_statistic_may_change_on_resume(tmp_path):
    """cluster_delta changes only the logged clustering fraction: a resume with another one is not refused, and the
    rewards and weights go on exactly as in an uninterrupted run."""
    ckpt = str(tmp_path / "run.safetensors")
    base = dict(TINY, num_updates=2, prompts_per_update=1, eval_every=1)
    full = train(arm_config("g12", **base), TASK)
    train(arm_config("g12", **{**base, "num_updates": 1, "checkpoint_path": ckpt}), TASK)
    resumed = train(arm_config("g12", **{**base, "checkpoint_path": ckpt, "cluster_delta": 0.25}), TASK, resume=True)
    assert resumed["updates"][1]["reward_mean"] == full["updates"][1]["reward_mean"]
    assert resumed["evals"][-1]["eval_margin"] == full["evals"][-1]["eval_margin"]


def test_processes_wait_for_a_checkpoint_only_when_one_is_written(tmp_path, monkeypatch):
    from progrpo_ref.machinery.parallel import Processes

    waits = []
    monkeypatch.setattr(Processes, "barrier", lambda self: waits.append(1))
    cfg = arm_config("g12", **{**TINY, "num_updates": 5, "prompts_per_update": 1, "eval_every": 5,
                               "checkpoint_every": 2, "checkpoint_path": str(tmp_path / "run.safetensors")})
    train(cfg, TASK)
    assert len(waits) == 3  # saved after updates 2, 4 and 5 (the end); no barrier after 1 and 3
    waits.clear()
    train(arm_config("g12", **{**TINY, "prompts_per_update": 1}), TASK)
    assert waits == []  # no checkpoint, no barrier


def test_a_task_without_the_optional_members_trains():
    """check_sampler, costs and a policy's passes_per_sample are optional: their defaults apply."""
    from progrpo_ref.algorithm.task import check_sampler, passes_per_sample, task_costs

    class Bare:  # only the required members, delegated to the digits task
        latent_shape = TASK.latent_shape
        describe, sample_prompts, policy, reference = TASK.describe, TASK.sample_prompts, TASK.policy, TASK.reference
        reward, evaluate = TASK.reward, TASK.evaluate

    bare = Bare()
    assert task_costs(bare) == {} and passes_per_sample(bare.policy()) == 1 and check_sampler(bare, FlowSDE()) is None
    with pytest.raises(ValueError, match="the flow model needs FlowSDE or FlowCPS"):
        check_sampler(TASK, arm_config("dance_grpo").sampler)
    h = train(arm_config("flash", **{**TINY, "num_updates": 1, "prompts_per_update": 1}), bare)
    assert h["updates"][0]["nfe_per_prompt"] == 188 and not any(k.startswith("task_") for k in h["updates"][0])


@pytest.mark.parametrize("argv, names", [
    (["--updates", "-3"], "argument --updates: num_updates=-3 must be an integer >= 0"),
    (["--prompts", "0"], "argument --prompts: prompts_per_update=0 must be an integer >= 1"),
    (["--set", "lr=abc"], "argument --set: 'lr=abc': VALUE must be JSON"),
    (["--set", "lr=2"], "argument --set lr: lr=2 must be a finite number in (0, 1]"),
    (["--set", "learning_rate=0.1"], "argument --set: 'learning_rate=0.1' must be NAME=VALUE with NAME a TrainConfig field"),
    (["--task", "diffusion"], "argument --arm flow_grpo with --task diffusion: the diffusion model needs DDIM"),
    (["--set", 'schedule={"sizes": [8, 4]}'], "argument --set schedule: "),
])
def test_the_command_line_reports_a_bad_argument_in_one_line(argv, names, capsys):
    from progrpo_ref.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m progrpo_ref train: error: ") and names in last, err


def test_a_checkpoint_is_synced_then_renamed_then_its_folder_synced(tmp_path, monkeypatch):
    import os
    import stat

    from progrpo_ref.machinery import checkpoint

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", fsync)
    monkeypatch.setattr(checkpoint.os, "replace", lambda a, b: events.append(("replace",)) or real_replace(a, b))
    model = TASK.policy()
    checkpoint.save_training_checkpoint(tmp_path / "c.safetensors", model, torch.optim.Adam(model.parameters()), {"x": 1})
    assert events == [("fsync", "file"), ("replace",), ("fsync", "folder")]
    assert checkpoint.load_training_checkpoint(tmp_path / "c.safetensors")["state"] == {"x": 1}
