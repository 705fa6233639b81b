"""The training loop: every arm runs, the evaluation is selection-independent, resume is exact."""
import pytest

from progrpo_ref.pro_grpo import PruneSchedule
from progrpo_ref.trainer import ARMS, arm_config, strip_timings, train

TINY = dict(num_updates=2, prompts_per_update=2, eval_every=2, eval_per_class=2, eval_group=4, progress=False)


@pytest.mark.parametrize("arm", sorted(ARMS))
def test_every_arm_trains(arm):
    h = train(arm_config(arm, **TINY))
    cfg = arm_config(arm)
    for row in h["updates"]:
        assert row["nfe_per_prompt"] == cfg.schedule.nfe()
        assert row["trained_per_prompt"] == cfg.trained_group_size
        assert 0 <= row["cluster_frac"] <= 1 and row["ratio_dev_first"] < 1e-5
    assert [e["update"] for e in h["evals"]] == [0, 2]
    assert h["evals"][0]["eval_margin"] == pytest.approx(train(arm_config("g12", **{**TINY, "num_updates": 0}))["evals"][0]["eval_margin"])


def test_resume_reproduces_the_history(tmp_path):
    base = dict(TINY, num_updates=4, schedule=PruneSchedule((8, 4), (5,), 10), beta=0.01)
    full = train(arm_config("standard", **base))
    ckpt = tmp_path / "run.pt"
    train(arm_config("standard", **{**base, "num_updates": 2, "checkpoint_path": str(ckpt)}))
    resumed = train(arm_config("standard", **{**base, "checkpoint_path": str(ckpt)}), resume=True)
    assert strip_timings(resumed) == strip_timings(full)


def test_config_errors():
    with pytest.raises(ValueError, match="selection='best'"):
        arm_config("ovf", selection="best")
    with pytest.raises(ValueError, match="select_k=30 must be in \\[2, 24\\]"):
        arm_config("ovf", select_k=30)
    with pytest.raises(ValueError, match="arm='grpo'"):
        arm_config("grpo")


def test_trained_steps_follow_flow_grpo_counting():
    assert arm_config("flow_grpo").trained_steps == 10
    assert arm_config("flow_grpo", train_steps_fraction=0.99).trained_steps == 9  # skips the last, nearly clean step
    assert arm_config("flow_grpo", train_steps_fraction=0.01).trained_steps == 1
