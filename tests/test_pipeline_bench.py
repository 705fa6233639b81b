"""The GPU timing script's CPU rehearsal: one arm, one layer, tiny images; the adapter-overhead timer;
the README table from measured rows."""
import json

import pytest

pytest.importorskip("peft")

from progrpo_ref.study import pipeline_bench  # noqa: E402


def test_one_arm_measures_and_writes_its_json(tmp_path):
    row = pipeline_bench.measure("flash", "cpu", layers=1, resolution=16, small=True, device_batch=8, out=tmp_path,
                                 prompts=1, clip_tokens=8, t5_tokens=4)
    saved = json.loads((tmp_path / "flash.json").read_text())
    assert saved == row
    P = 1
    assert row["nfe_per_prompt"] == 2 * 188  # the Flash schedule, both guidance branches
    assert row["vae_decodes"] == P * (24 + 16 + 12)  # previews at calls 5 and 7, then the 12 survivors
    assert row["update_s"] == pytest.approx(row["sampling_s"] + row["optimisation_s"])
    assert row["sampling_trajectory_steps_per_s"] == pytest.approx(P * 188 / row["sampling_s"])
    assert row["training_trajectory_steps_per_s"] == pytest.approx(P * 12 * 9 / row["optimisation_s"])
    table = pipeline_bench.table([row])
    assert "| flash |" in table and "0.60x" in table and "0.59x" in table


def test_the_adapter_overhead_timer_runs():
    r = pipeline_bench.overhead("cpu", reps=1, layers=1, side=4)
    assert r["direct"] > 0 and r["adapter"] > 0 and r["rows"] == 8
