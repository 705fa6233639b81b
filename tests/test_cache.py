"""Stored results (study/cache.py, study/experiments.py): exact round trips, keys that answer one question, the
three modes, and the committed runs of every notebook re-run for a sample and found the same (bit for bit on the
machine that stored them; within the last bits another CPU model moves, tests/tolerance.py)."""
import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from progrpo_ref.study.cache import RUNS, Results, decode, encode, key_of
from tolerance import mismatches

REPO = Path(__file__).resolve().parents[1]


def test_tensors_and_floats_round_trip_exactly():
    g = torch.Generator().manual_seed(0)
    value = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(5, generator=g, dtype=torch.float64) * 1e-8,
             "c": torch.randint(0, 9, (2, 2), generator=g), "d": [1.0 / 3, {"e": torch.tensor(float("nan"))}], "f": (1, 2)}
    back = decode(json.loads(json.dumps(encode(value))))
    assert torch.equal(back["a"], value["a"]) and back["a"].dtype == torch.float32
    assert torch.equal(back["b"], value["b"]) and back["b"].dtype == torch.float64
    assert torch.equal(back["c"], value["c"]) and back["c"].dtype == torch.int64
    assert back["d"][0] == 1.0 / 3 and math.isnan(back["d"][1]["e"].item()) and back["f"] == [1, 2]


def test_a_key_answers_one_question():
    assert key_of("train", {"a": 1, "b": [1, 2]}) == key_of("train", {"b": [1, 2], "a": 1})  # order of a dict's keys
    assert key_of("train", {"a": 1}) != key_of("train", {"a": 2}) != key_of("measure", {"a": 2})


def test_modes_read_rebuild_and_off(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.tensor([1.5, 2.5])}

    rebuilt = Results("nb", mode="rebuild", folder=tmp_path)
    assert torch.equal(rebuilt.get("m", {"k": 1}, compute)["x"], torch.tensor([1.5, 2.5])) and len(calls) == 1
    path = rebuilt.save()
    first = path.read_bytes()
    rebuilt.save()
    assert path.read_bytes() == first  # the same results give the same bytes (no time stamp in the gzip header)
    read = Results("nb", mode="read", folder=tmp_path)
    assert torch.equal(read.get("m", {"k": 1}, compute)["x"], torch.tensor([1.5, 2.5])) and len(calls) == 1  # read
    read.get("m", {"k": 2}, compute)
    assert len(calls) == 2 and read.save() is None and read.hits == 1 and read.misses == 1  # computed, not stored
    off = Results("nb", mode="off", folder=tmp_path)
    off.get("m", {"k": 1}, compute)
    assert len(calls) == 3 and off.save() is None
    with pytest.raises(ValueError, match="PROGRPO_RESULTS='sometimes' must be one of"):
        Results("nb", mode="sometimes", folder=tmp_path)


def test_a_study_trains_only_what_is_not_stored(tmp_path, monkeypatch):
    from progrpo_ref import arm_config
    from progrpo_ref.digits import DigitsTask
    from progrpo_ref.study import experiments

    task = DigitsTask(eval_per_class=1, eval_group=2)
    configs = {"a": arm_config("flow_grpo", num_updates=1, prompts_per_update=1, eval_every=1, seed=0),
               "b": arm_config("flash", num_updates=1, prompts_per_update=1, eval_every=1, seed=0)}
    first = experiments.Study("nb", profile="full", workers=1, results=Results("nb", mode="rebuild", folder=tmp_path))
    runs = first.runs(configs, task)
    first.results.save()
    trained = []
    real = experiments.run_many
    monkeypatch.setattr(experiments, "run_many", lambda configs, *a, **k: trained.append(sorted(configs)) or real(configs, *a, **k))
    again = experiments.Study("nb", profile="full", workers=1, results=Results("nb", mode="read", folder=tmp_path))
    changed = {**configs, "c": arm_config("flow_grpo", num_updates=1, prompts_per_update=1, eval_every=1, seed=1)}
    read = again.runs(changed, task)
    assert trained == [["c"]]  # the stored two were read, the changed config was trained
    assert read["a"] == runs["a"]  # the stored history, timings included
    # a measurement of a trained policy needs the policy only when nothing stored answers it
    value = again.on_trained("mean weight", configs["a"], task, {}, lambda p: sum(v.sum() for v in p.state_dict().values()))
    assert torch.isfinite(torch.as_tensor(value))


def committed_entries():
    """(notebook, key, entry) of a sample of the committed runs: per notebook, its first stored training run in key
    order, and its first stored measurement of the pretrained model."""
    out = []
    for path in sorted(RUNS.glob("*.json.gz")):
        with gzip.open(path, "rt") as f:
            entries = json.load(f)["entries"]
        train = [k for k in sorted(entries) if entries[k]["kind"] == "train"]
        if train:
            out.append(pytest.param(path.name, train[0], entries[train[0]], id=f"{path.name[:2]}-train"))
    return out


@pytest.mark.parametrize("name, key, entry", committed_entries())
def test_a_committed_run_comes_out_the_same(name, key, entry):
    """Re-run the first two updates of a stored run from its stored inputs: the same rewards, losses, NFE and the same
    first evaluation (timings aside; bit for bit on the machine that stored them, within ``tolerance.close`` on another
    CPU model), and the stored key is the hash of the stored inputs."""
    from progrpo_ref import TrainConfig, train
    from progrpo_ref.digits import DigitsTask
    from progrpo_ref.machinery.run import strip_timings

    assert key_of(entry["kind"], entry["inputs"]) == key
    stored = decode(entry["value"])
    config = TrainConfig(**{**entry["inputs"]["config"], "num_updates": 2})
    from progrpo_ref.scenes.task import ScenesTask

    Task = ScenesTask if entry["inputs"]["task"]["name"] == "scenes" else DigitsTask
    task = Task(**{k: v for k, v in entry["inputs"]["task"].items() if k != "name"})
    torch.set_num_threads(1)  # as Study.runs trains: one thread per worker process
    try:
        again = strip_timings(train(config, task))
    finally:
        torch.set_num_threads(2)
    want = strip_timings(stored)
    # A JPEG size is a step function of the pixels: once the parameters differ in their last bits (on another CPU model,
    # after one Adam step), a sample can cross a step, and the second update's rewards move by whole bytes. Runs on it
    # are compared over the update made with the committed checkpoint's parameters. GenEval's score (scenes) is a step
    # function of the pixels too.
    n = 1 if entry["inputs"]["task"]["reward_name"].startswith("jpeg") or Task is ScenesTask else 2
    assert not mismatches(again["updates"][:n], want["updates"][:n])
    assert not mismatches(again["evals"][:1], want["evals"][:1])


def test_every_study_notebook_has_its_committed_runs():
    names = {p.name.split(".")[0] for p in RUNS.glob("*.json.gz")}
    studies = {p.stem for p in (REPO / "notebooks").glob("*.ipynb")} - {"00_pro_grpo_from_scratch", "06_real_pipelines"}
    assert studies <= names, sorted(studies - names)
