"""The digits task: scikit-learn's 8x8 digits, a tiny SD3 flow model, a small UNet diffusion model,
classifier rewards, pretraining.

Everything here sits around the method and imports it; the method never imports this folder.
``DigitsTask`` is what ``train(config, task)`` takes; ``python -m progrpo_ref.digits.pretrain``
regenerates the committed checkpoints in ``checkpoints/``.
"""
from .task import DigitsTask

__all__ = ["DigitsTask"]
