"""The fidelity audit and the adaptive prune schedule: the rule on scripted fidelity curves, and in the
trainer that the audit never reaches the loss, that its NFE is counted apart, that the placement is
logged and sampled with (measured NFE), and that resume restores it."""
import math

import pytest
import torch

from progrpo_ref.beyond_paper.adaptive import decide
from progrpo_ref.digits import DigitsTask
from progrpo_ref.beyond_paper.fidelity import audit
from progrpo_ref.algorithm.noise import TrajectoryNoise
from progrpo_ref.algorithm.pro_grpo import PRESETS, PruneSchedule
from progrpo_ref.machinery.config import TrainConfig
from progrpo_ref.machinery.run import strip_timings
from progrpo_ref.machinery.trainer import train

STANDARD = PRESETS["standard"]  # 48 -> 24 -> 12 at calls 5 and 7 of 10
TASK = DigitsTask(eval_per_class=1, eval_group=4)
SMALL = PruneSchedule((8, 6, 4), (5, 7), 10)


def curve(f, se):
    return {c: {"mean": f(c), "se": se} for c in range(1, 10)}


def test_prune_points_move_earlier_on_evidence_and_stay_ordered():
    p = decide(STANDARD, (5, 7), curve(lambda c: c / 10, 0.01), target=0.45)
    assert p.schedule.prune_steps == (5, 6) and p.selection == "all"  # 5 is the first call to clear 0.45 + 1.645 se
    p = decide(STANDARD, (5, 7), curve(lambda c: c / 10, 0.01), target=0.25)
    assert p.schedule.prune_steps == (3, 4) and p.moves == ("earlier 5 -> 3", "earlier 7 -> 4")


def test_no_call_good_enough_means_select_on_final_rewards():
    p = decide(STANDARD, (5, 7), curve(lambda c: 0.1, 0.01), target=0.5)
    assert p.schedule.group_sizes == (48,) and p.selection == "ovf" and p.select_k == 12  # static OVF 12 of 48
    assert p.moves == ("drops 5", "drops 7") and p.calls == (None, None)
    only_first = decide(STANDARD, (5, 7), curve(lambda c: 0.9 if c == 5 else 0.1, 0.01), target=0.5)
    assert only_first.schedule == PruneSchedule((48, 24), (5,), 10) and only_first.selection == "ovf"  # 12 of 24
    back = decide(STANDARD, (5, None), curve(lambda c: c / 10, 0.01), target=0.45)
    assert back.schedule.prune_steps == (5, 6) and back.moves[1] == "returns at 6"


def test_a_noisy_estimate_does_not_move_a_prune_point():
    noisy = curve(lambda c: 0.2, 0.5)  # lower bound -0.6, upper 1.0: neither shown good nor shown bad
    assert decide(STANDARD, (5, 7), noisy, target=0.5).moves == ("stays 5", "stays 7")
    bad_here = curve(lambda c: 0.1 if c < 8 else 0.9, 0.01)  # 5 and 7 shown bad, 8 and 9 shown good
    assert decide(STANDARD, (5, 7), bad_here, target=0.5).schedule.prune_steps == (8, 9)
    unmeasured = {c: {"mean": math.nan, "se": math.nan} for c in range(1, 10)}
    assert decide(STANDARD, (5, 7), unmeasured, target=0.5).schedule.prune_steps == (5, 7)
    one_group = {2: {"mean": 0.9, "se": None, "n": 1}, **{c: {"mean": 0.1, "se": None, "n": 1} for c in (5, 7)}}
    assert decide(STANDARD, (5, 7), one_group, target=0.5).moves == ("stays 5", "stays 7")  # no standard error: no evidence


@pytest.mark.parametrize("target", [1.5, -1.01, "0.5", True])
def test_bad_targets_raise_naming_the_value(target):
    with pytest.raises(ValueError, match="fidelity_target="):
        decide(STANDARD, (5, 7), curve(lambda c: 0.5, 0.1), target=target)
    with pytest.raises(ValueError, match="fidelity_target="):
        TrainConfig(schedule=SMALL, audit_every=1, adaptive=True, fidelity_target=target)


def test_adaptive_needs_an_audit_and_a_pruned_schedule():
    with pytest.raises(ValueError, match="audit_every > 0"):
        TrainConfig(schedule=SMALL, adaptive=True)
    with pytest.raises(ValueError, match="a pruned schedule"):
        TrainConfig(schedule=PRESETS["flow_grpo"], audit_every=1, adaptive=True)
    with pytest.raises(ValueError, match="audit_prompts >= 2"):
        TrainConfig(schedule=SMALL, audit_every=1, adaptive=True, audit_prompts=1)


def test_audit_counts_and_a_faithful_last_call(flow_model, sde, margin_reward):
    a = audit(flow_model, sde, margin_reward, torch.tensor([3, 7, 1]), 8, 4, TrajectoryNoise(0, 1, stream="audit"),
              latent_shape=(1, 8, 8))
    assert a["nfe"] == 3 * 8 * 10 and a["reward_images"] == 3 * 8 * 10  # 9 previews and the final, per trajectory
    assert set(a["fidelity"]) == {str(c) for c in range(1, 10)} and a["chance"] == 0.5
    assert a["fidelity"]["9"]["mean"] > a["fidelity"]["1"]["mean"]  # one step from the end beats the first call
    assert all(e["n"] == 3 for e in a["fidelity"].values())


def config(**kw):
    base = dict(arm="adaptive", schedule=SMALL, num_updates=3, prompts_per_update=2, eval_every=3, progress=False,
                audit_prompts=2, select_k=4)
    return TrainConfig(**{**base, **kw})


def test_the_audit_never_reaches_the_loss_and_is_counted_apart():
    plain = train(config(), TASK)
    audited = train(config(audit_every=2), TASK)
    rows = strip_timings(audited)["updates"]
    assert [u["update"] for u in rows if "audit" in u] == [1, 3]
    stripped = {"updates": [{k: v for k, v in u.items() if k != "audit"} for u in rows], "evals": strip_timings(audited)["evals"]}
    assert stripped == strip_timings(plain)  # every reward, loss, KL, NFE and evaluation is the same
    a = rows[0]["audit"]
    assert a["nfe"] == 2 * 8 * 10 and rows[0]["nfe_per_prompt"] == SMALL.nfe()  # the audit's NFE is not the update's


def test_adaptive_placement_is_logged_sampled_with_and_resumed(tmp_path, monkeypatch):
    # target -1 is cleared by every call: both prune points move to the earliest calls, 1 and 2
    h = train(config(audit_every=2, adaptive=True, fidelity_target=-1.0), TASK)
    first = h["updates"][0]
    assert first["placement"]["prune_steps"] == [1, 2] and first["placement"]["selection"] == "all"
    assert first["nfe_per_prompt"] == PruneSchedule((8, 6, 4), (1, 2), 10).nfe()  # measured with the new schedule
    # a scripted audit in which every call is shown bad: expand to 8 and select 4 on final rewards (static OVF)
    import progrpo_ref.machinery.run as run

    scripted = {"fidelity": {str(c): {"mean": 0.1, "se": 0.01, "n": 2} for c in range(1, 10)}, "nfe": 0}
    monkeypatch.setattr(run, "audit", lambda *args, **kw: dict(scripted))
    h = train(config(audit_every=2, adaptive=True, fidelity_target=0.5), TASK)
    assert h["updates"][0]["placement"]["group_sizes"] == [8] and h["updates"][0]["nfe_per_prompt"] == 80
    assert h["updates"][0]["trained_per_prompt"] == 4 and h["updates"][0]["placement"]["moves"] == ["drops 5", "drops 7"]
    # resume: update 4 has no audit of its own (audits at 1 and 3), so it samples with the restored placement
    kw = dict(audit_every=2, adaptive=True, fidelity_target=0.5, num_updates=4)
    full = train(config(**kw, checkpoint_path=str(tmp_path / "full.safetensors")), TASK)
    part = tmp_path / "part.safetensors"
    train(config(**{**kw, "num_updates": 3}, checkpoint_path=str(part)), TASK)
    resumed = train(config(**kw, checkpoint_path=str(part)), TASK, resume=True)
    assert "audit" not in resumed["updates"][3] and resumed["updates"][3]["nfe_per_prompt"] == 80
    assert strip_timings(resumed) == strip_timings(full)
