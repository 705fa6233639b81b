"""Advantages, the clipped loss, the KL, the objective's gradient against an independent computation,
on-policy ratios and one update's effect."""
import pytest
import torch
from torch.distributions import Normal, kl_divergence

from progrpo_ref.algorithm.grpo import clipped_policy_loss, gaussian_kl, group_advantages, grpo_objective, step_log_prob
from progrpo_ref.algorithm.rollout import rollout
from progrpo_ref.algorithm.samplers import FlowSDE


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
    with pytest.raises(ValueError, match="eps=0 and clip=5.0 must be > 0"):
        group_advantages(R, eps=0)


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


def test_on_policy_ratio_is_exactly_one_and_splits_agree(flow_model, sde):
    g = torch.Generator().manual_seed(0)
    ro = rollout(flow_model, sde, torch.tensor([3, 7]), 8, 0, latent_shape=(1, 8, 8))
    lat, c, old = ro.latents, ro.prompts, ro.log_probs
    with torch.no_grad():
        for t in range(10):
            lp = step_log_prob(flow_model, sde, lat, c, t).log_prob  # same batch as the rollout
            assert torch.equal(lp, old[:, t])
            for chunk in torch.randperm(16, generator=g).chunk(3):  # other mini-batch compositions
                lp = step_log_prob(flow_model, sde, lat[chunk], c[chunk], t).log_prob
                assert (lp - old[chunk, t]).abs().max() < 1e-5


class Affine(torch.nn.Module):
    """A tiny parametric velocity model: v = w[c] * x + u[c] * sigma (two prompts)."""

    def __init__(self, w, u):
        super().__init__()
        self.w, self.u = torch.nn.Parameter(torch.tensor(w)), torch.nn.Parameter(torch.tensor(u))

    def forward(self, x, sigma, prompts):
        return self.w[prompts].view(-1, 1, 1, 1) * x + self.u[prompts].view(-1, 1, 1, 1) * sigma.view(-1, 1, 1, 1)


def independent_J(model, ref, sampler, lat, prompts, old, adv, steps, eps, beta):
    """J written out term by term with torch.distributions: per trajectory b and step t,
    r = exp(log N(x_{t+1}; mu_theta, s) - old), min(r A, clip(r) A), KL(N(mu_theta, s) || N(mu_ref, s))."""
    terms, kls = [], []
    for b in range(len(prompts)):
        for t in steps:
            x, y = lat[b:b + 1, t], lat[b:b + 1, t + 1]
            sigma = sampler.sigmas[t].view(1)
            mu = sampler.step(model(x, sigma, prompts[b:b + 1]), x, t, prev_sample=y).mean
            s = sampler.step(model(x, sigma, prompts[b:b + 1]), x, t, prev_sample=y).std
            with torch.no_grad():
                mu_ref = sampler.step(ref(x, sigma, prompts[b:b + 1]), x, t, prev_sample=y).mean
            logp = Normal(mu, s).log_prob(y).mean()
            r = torch.exp(logp - old[b, t])
            terms.append(torch.minimum(r * adv[b], r.clamp(1 - eps, 1 + eps) * adv[b]))
            kls.append(kl_divergence(Normal(mu, s), Normal(mu_ref, s)).mean())
    n = len(terms)
    return sum(terms) / n - beta * sum(kls) / n


def test_objective_gradient_matches_an_independent_computation():
    sampler = FlowSDE(4, 0.7)
    g = torch.Generator().manual_seed(0)
    policy, ref = Affine([-0.3, 0.2], [0.5, -0.4]), Affine([-0.2, 0.1], [0.4, -0.5])
    prompts = torch.tensor([0, 1, 1, 0, 1])
    ro = rollout(ref, sampler, prompts, 1, 0, latent_shape=(1, 3, 3))
    lat = ro.latents
    # old log-probs: the policy's own, moved by -3e-3, 0 or +3e-3, so that about two thirds of the
    # ratios leave the clip range 1e-3 (both signs) and a third stay inside
    with torch.no_grad():
        now = torch.stack([step_log_prob(policy, sampler, lat, prompts, t).log_prob for t in range(4)], 1)
    old = now + 3e-3 * ((torch.arange(5)[:, None] + torch.arange(4)[None]) % 3 - 1)
    adv = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.6])
    steps, eps, beta = [0, 1, 2], 1e-3, 0.3
    out = grpo_objective(policy, sampler, lat, prompts, old, adv, steps, eps, beta, ref)
    assert 0 < out.clipped < 5 * len(steps)  # both branches of the min are exercised
    grad = torch.autograd.grad(out.loss, [policy.w, policy.u])
    J = independent_J(policy, ref, sampler, lat, prompts, old, adv, steps, eps, beta)
    want = torch.autograd.grad(-J, [policy.w, policy.u])
    assert out.loss.item() == pytest.approx(-J.item(), rel=1e-5, abs=1e-7)
    for a, b in zip(grad, want):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a, b)
    # finite differences where J is smooth (a clip range no ratio reaches), fp32 math: a coarse check
    wide = grpo_objective(policy, sampler, lat, prompts, old, adv, steps, 1.0, beta, ref)
    assert wide.clipped == 0
    dw = torch.autograd.grad(wide.loss, policy.w)[0][1].item()
    h = 1e-2
    with torch.no_grad():
        policy.w[1] += h
        up = independent_J(policy, ref, sampler, lat, prompts, old, adv, steps, 1.0, beta)
        policy.w[1] -= 2 * h
        down = independent_J(policy, ref, sampler, lat, prompts, old, adv, steps, 1.0, beta)
        policy.w[1] += h
    assert -(up - down).item() / (2 * h) == pytest.approx(dw, rel=0.02, abs=1e-4)
    # step-by-step backward gives the same gradient; a passed count rescales the loss
    policy.zero_grad()
    lazy = grpo_objective(policy, sampler, lat, prompts, old, adv, steps, eps, beta, ref, backward=True)
    assert lazy.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    for p, a in zip((policy.w, policy.u), grad):
        assert torch.allclose(p.grad, a, rtol=1e-5, atol=1e-8)
    double = grpo_objective(policy, sampler, lat, prompts, old, adv, steps, eps, beta, ref, count=2 * 5 * 3)
    assert double.loss.item() == pytest.approx(out.loss.item() / 2, rel=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.1, reference=None), "needs a reference policy"),
    (dict(steps=[4]), r"steps=\[4\] must be a non-empty subset of 0..3"),
    (dict(steps=[]), "non-empty"),
    (dict(count=0), "count=0 must be >= 1"),
    (dict(advantages=torch.zeros(3)), "shapes disagree"),
])
def test_objective_rejects_bad_input(kwargs, match):
    sampler = FlowSDE(4, 0.7)
    policy = Affine([0.1, 0.2], [0.3, 0.4])
    args = dict(policy=policy, sampler=sampler, latents=torch.zeros(2, 5, 1, 2, 2), prompts=torch.tensor([0, 1]),
                old_log_probs=torch.zeros(2, 4), advantages=torch.zeros(2), steps=[0], clip_range=1e-3) | kwargs
    with pytest.raises(ValueError, match=match):
        grpo_objective(**args)


def test_one_update_raises_advantage_weighted_log_prob(sde):
    from progrpo_ref.digits.model import load_flow_model

    model = load_flow_model()
    g = torch.Generator().manual_seed(0)
    ro = rollout(model, sde, torch.tensor([1, 5]), 8, 0, latent_shape=(1, 8, 8))
    A = group_advantages(torch.randn(2, 8, generator=g)).flatten()
    lat, c = ro.latents, ro.prompts

    def objective():
        with torch.no_grad():
            return sum((A * step_log_prob(model, sde, lat, c, t).log_prob).mean() for t in range(10)).item()

    before = objective()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    grpo_objective(model, sde, lat, c, ro.log_probs, A, range(10), 1.0, backward=True)
    opt.step()
    assert objective() > before
