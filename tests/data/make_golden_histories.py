"""Write tests/data/golden_histories.json: 3 updates of flow_grpo, ovf and standard on the digits task.

These histories pin the trainer's behaviour across refactors: tests/test_golden.py re-runs the same
configs and compares. Regenerate only when a change is *meant* to move the numbers, in a commit of
its own that says so:   python tests/data/make_golden_histories.py
"""
import json
from pathlib import Path

import torch

from progrpo_ref.digits import DigitsTask
from progrpo_ref.machinery.config import arm_config
from progrpo_ref.machinery.run import strip_timings
from progrpo_ref.machinery.trainer import train

GOLDEN = Path(__file__).with_name("golden_histories.json")
SETTINGS = dict(num_updates=3, prompts_per_update=4, eval_every=3, eval_per_class=2, eval_group=8, beta=0.01,
                seed=7, progress=False)
TASK_KEYS = ("eval_per_class", "eval_group")  # the rest are TrainConfig fields
ARMS = ("flow_grpo", "ovf", "standard")


def run(arm: str, settings: dict = SETTINGS) -> dict:
    task = DigitsTask(**{k: settings[k] for k in TASK_KEYS})
    return strip_timings(train(arm_config(arm, **{k: v for k, v in settings.items() if k not in TASK_KEYS}), task))


def main():
    torch.set_num_threads(2)
    out = {"settings": SETTINGS, "threads": 2, "histories": {arm: run(arm) for arm in ARMS}}
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main()
