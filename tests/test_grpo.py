"""Advantages, the clipped loss, the KL, on-policy ratios and one update's effect."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from progrpo_ref.grpo import clipped_policy_loss, gaussian_kl, group_advantages, step_log_prob
from progrpo_ref.model import sigma_schedule
from progrpo_ref.rollout import rollout


def test_group_advantages_by_hand():
    R = torch.tensor([[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0]])
    A = group_advantages(R)
    mu, sd = 3.0, (sum((r - 3.0) ** 2 for r in [1, 2, 3, 6]) / 4) ** 0.5  # population std
    assert torch.allclose(A[0], (R[0] - mu) / (sd + 1e-4))
    assert torch.equal(A[1], torch.zeros(4))  # a zero-std group has no signal
    Ag = group_advantages(R, global_std=True)
    assert torch.allclose(Ag[0], (R[0] - mu) / (R.std(unbiased=False) + 1e-4))
    spiky = torch.tensor([[0.0] * 99 + [1.0]])
    assert group_advantages(spiky).max() == 5.0  # clipped (unclipped it would be ~9.9)
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="K >= 2"):
        group_advantages(torch.tensor([[1.0]]))


def test_clipped_loss_by_hand():
    old = torch.zeros(4)
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 1.0005]))
    A = torch.tensor([1.0, 1.0, -1.0, 2.0])
    loss, clipped = clipped_policy_loss(new, old, A, 0.2)
    # A > 0, r = 1.5: min(1.5, 1.2) -> 1.2; A > 0, r = 0.5: min(0.5, 0.8) -> 0.5;
    # A < 0, r = 1.5: min(-1.5, -1.2) -> -1.5; inside the range: r A
    assert torch.allclose(loss, -torch.tensor([1.2, 0.5, -1.5, 2.001]), atol=1e-5)
    assert clipped.tolist() == [True, True, True, False]


def test_gaussian_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    m, r = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    s = torch.tensor([0.1, 0.2, 0.3]).view(3, 1, 1, 1)
    ref = kl_divergence(Normal(m, s), Normal(r, s)).mean(dim=(1, 2, 3))
    assert torch.allclose(gaussian_kl(m, r, s), ref, atol=1e-5)


def test_on_policy_ratio_is_exactly_one_and_splits_agree(flow_model):
    sigmas = sigma_schedule(10)
    g = torch.Generator().manual_seed(0)
    ro = rollout(flow_model, torch.tensor([3, 7]), 8, sigmas, 0.7, g)
    lat, c, old = ro.latents.flatten(0, 1), ro.prompts.flatten(), ro.log_probs.flatten(0, 1)
    with torch.no_grad():
        for t in range(10):
            lp, _, _ = step_log_prob(flow_model, lat, c, sigmas, t, 0.7)  # same batch as the rollout
            assert torch.equal(lp, old[:, t])
            for chunk in torch.randperm(16, generator=g).chunk(3):  # other mini-batch compositions
                lp, _, _ = step_log_prob(flow_model, lat[chunk], c[chunk], sigmas, t, 0.7)
                assert (lp - old[chunk, t]).abs().max() < 1e-5


def test_one_update_raises_advantage_weighted_log_prob():
    from progrpo_ref.model import load_flow_model

    model = load_flow_model()
    sigmas = sigma_schedule(10)
    g = torch.Generator().manual_seed(0)
    ro = rollout(model, torch.tensor([1, 5]), 8, sigmas, 0.7, g)
    A = group_advantages(torch.randn(2, 8, generator=g)).flatten()
    lat, c = ro.latents.flatten(0, 1), ro.prompts.flatten()

    def objective():
        with torch.no_grad():
            return sum((A * step_log_prob(model, lat, c, sigmas, t, 0.7)[0]).mean() for t in range(10)).item()

    before = objective()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    loss = sum(clipped_policy_loss(step_log_prob(model, lat, c, sigmas, t, 0.7)[0], ro.log_probs.flatten(0, 1)[:, t], A, 1.0)[0].mean() for t in range(10))
    loss.backward()
    opt.step()
    assert objective() > before
