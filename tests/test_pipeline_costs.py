"""The FLOP count of one update per arm: counts by direct enumeration, FlopCounterMode against a closed
form, and the table's ratios at SD3.5-Medium size (measured on meta: a few seconds)."""
import pytest
import torch
from torch import nn

from progrpo_ref.algorithm.pro_grpo import PruneSchedule
from progrpo_ref.study.pipeline_costs import count_flops, epoch_costs, flop_table, per_pass_flops

FAKE = {"network_forward": 1_000_003, "network_backward": 2_000_029, "vae_decode": 30_011, "reward": 401}


def enumerate_update(schedule, prompts, trained_steps, cfg, beta):
    """Walk the funnel call by call: the c-th call is made by every live trajectory, and at a prune
    step c each of them is previewed (decoded and scored) before the cut."""
    rows = 2 if cfg else 1
    fwd = bwd = decodes = 0
    for _ in range(prompts):
        live = schedule.group_sizes[0]
        sizes = iter(schedule.group_sizes[1:])
        for call in range(1, schedule.num_steps + 1):
            fwd += rows * live
            if call in schedule.prune_steps:
                decodes += live
                live = next(sizes)
        decodes += live  # the final samples
        for _trajectory in range(live):
            for _step in range(trained_steps):
                fwd += rows * (2 if beta > 0 else 1)  # policy forward (+ reference)
                bwd += rows
    return fwd, bwd, decodes


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_counts_match_a_walk_through_the_funnel(cfg, beta):
    schedule = PruneSchedule((8, 4, 2), (2, 3), 5)
    c = epoch_costs(schedule, prompts=3, trained_steps=4, cfg=cfg, beta=beta, per_pass=FAKE)
    fwd, bwd, decodes = enumerate_update(schedule, 3, 4, cfg, beta)
    assert (c["network_forward_rows"], c["network_backward_rows"], c["vae_decodes"], c["reward_calls"]) == (fwd, bwd, decodes, decodes)
    rows = 2 if cfg else 1
    want = (fwd // rows) * FAKE["network_forward"] + (bwd // rows) * FAKE["network_backward"] + decodes * (FAKE["vae_decode"] + FAKE["reward"])
    assert c["total_flops"] == want


def test_flop_counter_on_a_linear_model_matches_the_closed_form():
    n_in, n_out, batch = 7, 5, 3
    with torch.device("meta"):
        net = nn.Linear(n_in, n_out)
        x = torch.empty(batch, n_in, requires_grad=True)
    out = []
    assert count_flops(lambda: out.append(net(x))) == 2 * n_in * n_out * batch
    assert count_flops(lambda: out[0].sum().backward()) == 2 * (2 * n_in * n_out * batch)  # grad of input and of weight


def test_sd35_per_pass_flops_and_the_table():
    guided, plain = per_pass_flops(True), per_pass_flops(False)
    assert guided["network_forward"] == 2 * plain["network_forward"] > 0
    full = per_pass_flops(True, lora=False)
    # a full fine-tune's backward computes input and weight gradients (2 matmuls per forward matmul); with frozen
    # weights (LoRA) only the input gradients (1 per matmul; attention's two bmm's still need 2 each)
    assert 1.9 < full["network_backward"] / full["network_forward"] < 2.1
    assert 1.0 < guided["network_backward"] / guided["network_forward"] < 1.3
    assert guided["vae_decode"] == plain["vae_decode"] > 0 and guided["reward"] == plain["reward"] > 0
    rows = {line.split("|")[1].strip(): [s.strip() for s in line.split("|")[1:-1]] for line in flop_table().splitlines()[2:]}
    assert set(rows) == {"flow_grpo", "standard", "flash"}
    assert rows["flow_grpo"][6] == "1.00x" and rows["flow_grpo"][1] == "240" and rows["standard"][1] == "324"
    ratios = {arm: float(r[6].rstrip("x")) for arm, r in rows.items()}
    assert 0.5 < ratios["flash"] < ratios["standard"] < 1.0


def test_the_default_trained_steps_is_flow_grpos():
    from progrpo_ref.machinery.config import TrainConfig

    assert TrainConfig(train_steps_fraction=0.99).trained_steps == 9
