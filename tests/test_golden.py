"""The trainer reproduces committed short histories (tests/data/golden_histories.json).

Tolerance: each logged number within 1e-4 relative or 1e-6 absolute, whichever is larger (the
loss is a near-cancelling sum of about 1e-4, so for it the absolute bound is the one that acts),
except ``clip_frac``, which counts (trajectory, step) terms whose ratio left the clip range and
may flip by one term when the last bits of a log-prob move (absolute 0.005, about 2 of 480 terms).
Why this is enough and not too loose: the refactor that introduced ``grpo_objective`` changed only
the order of a summation (sum / (B T) instead of per-step means / T); that moved rewards and
evaluations by at most 2e-7 relative and the loss by 1.2e-7 absolute on this machine, the same
last-bit size of difference a different CPU model's matmul kernels cause. Three updates amplify such
differences little; a wrong formula moves these numbers by percents.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "data"))
from make_golden_histories import run  # noqa: E402  (the same runner that wrote the file)

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_histories.json").read_text())


def close(a, b, key):
    if key == "clip_frac":
        return abs(a - b) <= 0.005
    return a == pytest.approx(b, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("arm", sorted(GOLDEN["histories"]))
def test_trainer_reproduces_the_golden_history(arm):
    torch.set_num_threads(GOLDEN["threads"])
    got, want = run(arm, GOLDEN["settings"]), GOLDEN["histories"][arm]
    for part in ("updates", "evals"):
        assert len(got[part]) == len(want[part])
        for g, w in zip(got[part], want[part]):
            assert set(g) == set(w), (part, sorted(set(g) ^ set(w)))
            bad = {k: (g[k], w[k]) for k in w if not close(g[k], w[k], k)}
            assert not bad, (arm, part, w["update"], bad)
