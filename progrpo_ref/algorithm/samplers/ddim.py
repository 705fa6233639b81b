r"""DDPO's DDIM sampler for diffusion models: one stochastic DDIM step with its exact Gaussian log-prob.

A diffusion model is trained on x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps, where
alpha_bar_t = prod_{s <= t} (1 - beta_s) falls from nearly 1 (t = 0, clean) to nearly 0 (t = N - 1,
noise). Sampling walks a subsequence of timesteps t > t' (t' = next, less noisy). From the model's
noise estimate eps_hat at (x_t, t, c) and the noise scale eta:

    x0_hat  = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t)          (the preview; not clipped)
    s_t     = eta * sqrt((1 - alpha_bar_t') / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_t')
    mu      = sqrt(alpha_bar_t') x0_hat + sqrt(1 - alpha_bar_t' - s_t^2) eps_hat
    x_t'    = mu + s_t z,  z ~ N(0, I)
    log pi  = mean over C, H, W of  -(x_t' - mu)^2 / (2 s_t^2) - log s_t - log sqrt(2 pi)

eta = 1 is DDPM's posterior variance (DDPO's setting), eta = 0 the deterministic DDIM step (no
log-prob). eta must lie in [0, 1]: above 1, 1 - alpha_bar_t' - s_t^2 can turn negative. A
v-prediction model's output v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 is turned into
eps_hat = sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t first.

The schedule is what diffusers' ``DDIMScheduler(clip_sample=False, set_alpha_to_one=False,
timestep_spacing="trailing")`` walks (tested against it): timesteps t_i = round(N - i N / T) - 1 for
i = 0 .. T-1, step i going from t_i to t_{i+1}, and the last one to alpha_bar_0 = 1 - beta_0 (not to 1,
which would make the last step deterministic). When T does not divide N, diffusers steps to
t_i - N // T, which is not the timestep it evaluates next; we step to t_{i+1}, so the steps agree
with diffusers' exactly when T divides N (tested at 10, 20 and 50 of 1000; the timesteps themselves
agree for any T for which diffusers returns T of them). ``spacing="leading"`` with ``steps_offset`` gives the
timesteps k N // T + offset of Stable Diffusion v1's scheduler config (981, ..., 1 in 50 steps: DDPO's and
DanceGRPO's), whose steps are N // T apart, so they agree with diffusers' exactly (tested at 7, 20 and 50,
including the last step). Its defaults would clip x0_hat to [-1, 1] and end
on a zero-variance step; neither reaches training here. The betas are computed in torch exactly as
diffusers does for "linear" and "scaled_linear" (Stable Diffusion's), so the method does not need
diffusers; ``DDIM.from_scheduler_config`` reads them from a diffusers scheduler's config dict.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch

from .base import Sampler, SamplerStep, check_pair, gaussian_step, per_sample

PREDICTION_TYPES = ("epsilon", "v_prediction")
SPACINGS = ("trailing", "leading")
BETA_SCHEDULES = ("linear", "scaled_linear")


def ddim_step_with_logprob(
    noise_pred: torch.Tensor,
    sample: torch.Tensor,
    alpha_bar: torch.Tensor | float,
    alpha_bar_next: torch.Tensor | float,
    eta: float = 1.0,
    prev_sample: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> SamplerStep:
    """Take (or, when ``prev_sample`` is given, score) one DDIM step from x_t (module docstring).

    noise_pred (eps_hat), sample (x_t): ``[B, C, H, W]``; alpha_bar (at t) and alpha_bar_next (at t',
    the less noisy step): floats or ``[B]`` with 0 < alpha_bar < alpha_bar_next <= 1. The step's noise
    z is ``noise`` if given, else drawn from ``generator``. All the math in fp32. A step to
    alpha_bar_next = 1 (diffusers' ``set_alpha_to_one``) has s_t = 0: it is deterministic and its
    ``log_prob`` is ``None``, as at eta = 0.
    """
    _check_eta(eta)
    check_pair(noise_pred, sample, "noise_pred")
    a, a_next = per_sample(alpha_bar, sample, "alpha_bar"), per_sample(alpha_bar_next, sample, "alpha_bar_next")
    for name, v in (("alpha_bar", a), ("alpha_bar_next", a_next)):
        bad = ~((v > 0) & (v <= 1))
        if bad.any():
            raise ValueError(f"{name}={v[bad].flatten()[0].item():.6g} must lie in (0, 1]")
    bad = ~(a_next > a)
    if bad.any():
        raise ValueError(f"alpha_bar_next={a_next[bad].flatten()[0].item():.6g} must be larger than alpha_bar="
                         f"{a[bad].flatten()[0].item():.6g}: alpha_bar increases toward the clean end")
    last = a_next == 1
    if last.any() and not last.all():
        raise ValueError("alpha_bar_next must be 1 for all samples or for none (the step to 1 is deterministic)")
    eps, x = noise_pred.float(), sample.float()
    x0_hat = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    return _step(eps, x0_hat, x, alpha_bar, alpha_bar_next, eta, prev_sample, generator, noise, eta == 0 or bool(last.all()))


def _check_eta(eta) -> None:
    if isinstance(eta, bool) or not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
        raise ValueError(f"eta={eta!r} must be in [0, 1] (1 is DDPM's variance, DDPO's setting; 0 deterministic DDIM)")


def _step(eps, x0_hat, x, alpha_bar, alpha_bar_next, eta, prev_sample, generator, noise, deterministic) -> SamplerStep:
    """The step from fp32 (eps_hat, x0_hat, x_t), for alpha_bars already known to be valid (``DDIM``
    validates its schedule once); ``deterministic`` when eta = 0 or alpha_bar_next = 1."""
    a, a_next = per_sample(alpha_bar, x, "alpha_bar"), per_sample(alpha_bar_next, x, "alpha_bar_next")
    for name, t in (("prev_sample", prev_sample), ("noise", noise)):
        if t is not None:
            check_pair(t, x, name)
    std = eta * torch.sqrt((1 - a_next) / (1 - a)) * torch.sqrt(1 - a / a_next)
    mean = torch.sqrt(a_next) * x0_hat + torch.sqrt((1 - a_next - std**2).clamp_min(0)) * eps

    if deterministic:  # DDIM at eta = 0, or the step to alpha_bar = 1
        return SamplerStep(mean if prev_sample is None else prev_sample.float(), None, mean, std)
    return gaussian_step(mean, std, prev_sample, generator, noise)


def betas_for(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    """beta_0 .. beta_{N-1} ``[N]`` fp32, as diffusers' schedulers compute them."""
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # Stable Diffusion
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    raise ValueError(f"beta_schedule={beta_schedule!r} must be one of {BETA_SCHEDULES}")


@dataclass(frozen=True)
class DDIM(Sampler):
    """DDPO's stochastic DDIM step (eta = 1 by default) on T trailing (or leading) timesteps of an N-step training schedule."""

    num_steps: int = 20
    """T: sampling steps"""
    eta: float = 1.0
    """noise scale: 1 is DDPM's posterior variance (DDPO), 0 deterministic DDIM"""
    num_train_timesteps: int = 1000
    """N: timesteps of the training schedule"""
    beta_start: float = 1e-4
    """first beta of the training schedule"""
    beta_end: float = 0.02
    """last beta of the training schedule"""
    beta_schedule: str = "linear"
    """"linear" (DDPM) or "scaled_linear" (Stable Diffusion)"""
    prediction_type: str = "epsilon"
    """what the network predicts: "epsilon" (the noise) or "v_prediction" """
    spacing: str = "trailing"
    """the sampling timesteps: "trailing" (N - 1 first) or "leading" (k N // T + steps_offset, diffusers'
    spacing in Stable Diffusion v1's scheduler config, which DDPO and DanceGRPO sample with)"""
    steps_offset: int = 0
    """added to "leading" timesteps (SD-v1: 1, so 50 steps walk 981, 961, ..., 1)"""

    def __post_init__(self):
        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not integer(self.num_train_timesteps) or self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be an integer >= 2")
        if not integer(self.num_steps) or not 1 <= self.num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps={self.num_steps!r} must be an integer in [1, {self.num_train_timesteps}]")
        if not (0 < self.beta_start <= self.beta_end < 1):
            raise ValueError(f"beta_start={self.beta_start!r}, beta_end={self.beta_end!r} must satisfy 0 < start <= end < 1")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={self.prediction_type!r} is not supported; use one of {PREDICTION_TYPES}")
        _check_eta(self.eta)
        if self.spacing not in SPACINGS:
            raise ValueError(f"spacing={self.spacing!r} must be one of {SPACINGS}")
        if not integer(self.steps_offset) or self.steps_offset < 0 or (self.spacing == "trailing" and self.steps_offset):
            raise ValueError(f"steps_offset={self.steps_offset!r} must be an integer >= 0, and 0 with trailing spacing")
        if self.spacing == "leading" and (self.num_steps - 1) * (self.num_train_timesteps // self.num_steps) + self.steps_offset >= self.num_train_timesteps:
            raise ValueError(f"steps_offset={self.steps_offset} puts the first leading timestep beyond N - 1 = "
                             f"{self.num_train_timesteps - 1}")
        betas_for(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)  # validates the name
        ab = self.alpha_bars
        if not ab[0] > 0:
            raise ValueError(f"alpha_bar at the first timestep {int(self.timesteps[0])} underflows to 0 in fp32 "
                             f"(beta_end={self.beta_end}): zero-terminal-SNR schedules are not supported")
        if not bool((ab[1:] > ab[:-1]).all()):
            raise ValueError(f"num_steps={self.num_steps} leaves a step whose alpha_bar does not increase "
                             f"(the last timestep is already 0); use fewer steps")

    @classmethod
    def from_scheduler_config(cls, config: dict, num_steps: int = 20, eta: float = 1.0, follow_spacing: bool = False) -> "DDIM":
        """From a diffusers scheduler's ``config`` (DDPM, DDIM, PNDM ...): the model's training schedule
        (betas) and prediction type. The sampling timesteps are the trailing ones unless ``follow_spacing``:
        then the config's ``timestep_spacing`` ("leading" or "trailing") and ``steps_offset`` (Stable
        Diffusion v1's scheduler walks "leading" timesteps 981 ... 1 in 50 steps). ``set_alpha_to_one`` is
        not used: the last step goes to alpha_bar_0 (module docstring)."""
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")
        if config.get("trained_betas") is not None:
            raise ValueError("schedulers with explicit trained_betas are not supported")
        if config.get("rescale_betas_zero_snr"):
            raise ValueError("rescale_betas_zero_snr=True (zero terminal SNR) is not supported")
        spacing = {}
        if follow_spacing:
            name = config.get("timestep_spacing", "leading")
            if name not in SPACINGS:
                raise ValueError(f"timestep_spacing={name!r} is not supported; use one of {SPACINGS}")
            spacing = dict(spacing=name, steps_offset=int(config.get("steps_offset", 0)) if name == "leading" else 0)
        return cls(num_steps=num_steps, eta=eta, **{k: config[k] for k in keys if k in config}, **spacing)

    @cached_property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar_t for t = 0 .. N - 1 ``[N]``, fp32 (diffusers' ``alphas_cumprod``)."""
        return torch.cumprod(1.0 - betas_for(self.num_train_timesteps, self.beta_start, self.beta_end,
                                             self.beta_schedule), dim=0)

    @cached_property
    def timesteps(self) -> torch.Tensor:
        """The T sampling timesteps, noisy first ``[T]`` long. "trailing" spacing (N-1 is the first) is
        computed as diffusers does with ``np.arange(N, 0, -N / T)``: round(N + i delta) - 1 in float64
        with delta = (N - N / T) - N, halves to even."""
        N, T = self.num_train_timesteps, self.num_steps
        if self.spacing == "leading":  # diffusers: (arange(T) * (N // T)).round()[::-1] + steps_offset
            return (torch.arange(T) * (N // T)).flip(0) + self.steps_offset
        delta = (N - N / T) - N  # numpy's arange step, rounded as numpy rounds it
        return (torch.round(N + torch.arange(T, dtype=torch.float64) * delta) - 1).long()

    @cached_property
    def alpha_bars(self) -> torch.Tensor:
        """alpha_bar at each sampling timestep, then after the last step ``[T + 1]``: increasing, ending
        at alpha_bar_0 = 1 - beta_0. Step i goes from alpha_bars[i] to alpha_bars[i + 1]."""
        ac = self.alphas_cumprod
        return torch.cat([ac[self.timesteps], ac[:1]])

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def model_time(self, i: int) -> torch.Tensor:
        """The integer timestep t_i the network is conditioned on."""
        self.check_step(i)
        return self.timesteps[i]

    def eps_and_x0(self, out: torch.Tensor, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps_hat, x0_hat) from the network output at step i, fp32. For v-prediction both come straight
        from v (v = sqrt(a) eps - sqrt(1 - a) x0), as in diffusers: no division by sqrt(a), which is
        0.006 at the first timestep."""
        check_pair(out, x, "model output")
        a = self.alpha_bars[i]
        out, x = out.float(), x.float()
        if self.prediction_type == "epsilon":
            return out, (x - (1 - a).sqrt() * out) / a.sqrt()
        return a.sqrt() * out + (1 - a).sqrt() * x, a.sqrt() * x - (1 - a).sqrt() * out

    def step(self, out, x, i, noise=None, prev_sample=None, generator=None) -> SamplerStep:
        self.check_step(i)
        eps, x0_hat = self.eps_and_x0(out, x, i)
        return _step(eps, x0_hat, x.float(), self.alpha_bars[i], self.alpha_bars[i + 1], self.eta, prev_sample,
                     generator, noise, self.eta == 0)

    def preview(self, out, x, i) -> torch.Tensor:
        """x0_hat = (x_t - sqrt(1 - alpha_bar_t) eps_hat) / sqrt(alpha_bar_t), not clipped (fp32)."""
        self.check_step(i)
        return self.eps_and_x0(out, x, i)[1]

    def deterministic(self) -> "DDIM":
        return replace(self, eta=0.0)
