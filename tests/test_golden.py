"""The trainer reproduces committed short histories (tests/data/golden_histories.json).

Tolerance: ``tolerance.close`` (the last bits a different CPU model moves, no more). Why this is enough and not too
loose: the refactor that introduced ``grpo_objective`` changed only the order of a summation (sum / (B T) instead of
per-step means / T); that moved rewards and evaluations by at most 2e-7 relative and the loss by 1.2e-7 absolute on
this machine, the same last-bit size of difference a different CPU model's matmul kernels cause.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_golden_histories import run  # noqa: E402  (the same runner that wrote the file)
from tolerance import mismatches  # noqa: E402

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_histories.json").read_text())


@pytest.mark.parametrize("arm", sorted(GOLDEN["histories"]))
def test_trainer_reproduces_the_golden_history(arm):
    torch.set_num_threads(GOLDEN["threads"])
    got, want = run(arm, GOLDEN["settings"]), GOLDEN["histories"][arm]
    for part in ("updates", "evals"):
        bad = mismatches(got[part], want[part])
        assert not bad, (arm, part, bad)
