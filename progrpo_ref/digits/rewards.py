"""Reward models. One interface: ``reward(images [B, 1, 8, 8], prompts [B]) -> rewards [B]``.

Every reward first *decodes*: it clamps the images to [-1, 1], as a VAE decode does at scale (SDE
samples and one-step previews x0_hat leave that range), then scores them. Rewards come back as
float32 on the images' device; a non-finite image or reward raises ``ValueError``.

| name | what it measures | role |
|---|---|---|
| ``margin`` | requested logit minus the best other logit of the reward classifier | **headline reward** (trained on) |
| ``prob`` | classifier probability of the requested digit | accuracy metric (saturates near 1) |
| ``logprob`` | log of that probability | saturates like ``prob`` |
| ``margin_heldout`` | the same margin from an independent MLP classifier | out-of-domain evaluation, never trained on |
| ``jpeg_incompressibility`` | JPEG size in kB (DDPO) | DDPO's reward, near-constant here |
| ``jpeg_compressibility`` | minus that size | DDPO's reward |

Why the margin is the headline reward: on the pretrained model the probability saturates (mean 0.977,
92% of a group within half a std of its mean), while the margin keeps a spread within every group (a PickScore-like continuous preference),
and a blank or a noise image gets a far lower margin than a real digit, so it cannot be gamed that way.
"""
from __future__ import annotations

import io

import torch
from torch.nn import functional as F

from .classifier import load_classifier
from .model import check_images, check_prompts

HEADLINE_REWARD = "margin"
JPEG_UPSCALE = 8  # an 8x8 JPEG is mostly header: encode at 64x64 (nearest-neighbour upscale)
JPEG_QUALITY = 95


class Reward:
    """Base class: validates, decodes (clamps to [-1, 1]), scores, validates the output."""

    name = "reward"

    def __call__(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        check_images(images)
        check_prompts(prompts)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        rewards = self.score(decode(images), prompts.to(images.device)).to(torch.float32).to(images.device)
        if not torch.isfinite(rewards).all():
            raise ValueError(f"reward {self.name} returned non-finite values: {rewards[~torch.isfinite(rewards)][:4].tolist()}")
        return rewards

    def score(self, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def decode(images: torch.Tensor) -> torch.Tensor:
    """The decode step every reward applies first: clamp to the image range [-1, 1]."""
    return images.clamp(-1.0, 1.0)


class ClassifierReward(Reward):
    """A function of a frozen digit classifier's logits ``[B, 10]`` at the requested class."""

    def __init__(self, kind: str = "margin", classifier: str = "reward", device="cpu"):
        if kind not in ("margin", "prob", "logprob"):
            raise ValueError(f"kind={kind!r} must be 'margin', 'prob' or 'logprob'")
        self.kind, self.name = kind, kind if classifier == "reward" else f"{kind}_{classifier}"
        self.classifier = load_classifier(classifier, device=device)

    @torch.no_grad()
    def score(self, images, prompts):
        logits = self.classifier(images.to(next(self.classifier.parameters()).device).float())
        logits = logits.to(images.device)
        requested = logits.gather(1, prompts[:, None]).squeeze(1)
        if self.kind == "margin":  # requested logit minus the best other logit
            others = logits.scatter(1, prompts[:, None], float("-inf"))
            return requested - others.max(dim=1).values
        logp = F.log_softmax(logits, dim=1).gather(1, prompts[:, None]).squeeze(1)
        return logp if self.kind == "logprob" else logp.exp()


class JpegReward(Reward):
    """DDPO's JPEG reward: encoded size in kB at quality 95 (``sign=-1`` for compressibility)."""

    def __init__(self, sign: int = 1):
        self.sign = sign
        self.name = "jpeg_incompressibility" if sign > 0 else "jpeg_compressibility"

    def score(self, images, prompts):
        from PIL import Image

        pixels = ((images + 1) * 127.5).round().to(torch.uint8).cpu()
        pixels = pixels.repeat_interleave(JPEG_UPSCALE, 2).repeat_interleave(JPEG_UPSCALE, 3)
        sizes = []
        for img in pixels[:, 0].numpy():
            buf = io.BytesIO()
            Image.fromarray(img, mode="L").save(buf, format="JPEG", quality=JPEG_QUALITY)
            sizes.append(buf.tell() / 1000.0)
        return self.sign * torch.tensor(sizes)


REWARDS = {
    "margin": lambda device: ClassifierReward("margin", "reward", device),
    "prob": lambda device: ClassifierReward("prob", "reward", device),
    "logprob": lambda device: ClassifierReward("logprob", "reward", device),
    "margin_heldout": lambda device: ClassifierReward("margin", "heldout", device),
    "jpeg_incompressibility": lambda device: JpegReward(+1),
    "jpeg_compressibility": lambda device: JpegReward(-1),
}


def get_reward(name: str = HEADLINE_REWARD, device="cpu") -> Reward:
    """A reward by name (see the table in this module's docstring)."""
    if name not in REWARDS:
        raise ValueError(f"reward {name!r} is unknown; choose one of {sorted(REWARDS)}")
    return REWARDS[name](device)
