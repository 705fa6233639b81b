"""Scenes: a compositional text-to-image testbed in the manner of GenEval, beside ``digits/`` (notebook 08).

The prompt grammar (``grammar``: GenEval's six categories, held-out colour-shape pairs), the scene renderer
(``render``), the rule-based checker and GenEval's reward (``checker``), the autoencoder whose latents the flow model
generates (``autoencoder``, SD3's VAE in miniature), the text-conditioned flow model (``model``: a small text encoder
and SD3's transformer, classifier-free guidance), the learned reward and its twin (``attributes``), their pretraining
(``pretrain``, one command, the checkpoints committed in ``checkpoints/``) and the task behind the method's ``Task``
seam (``task.ScenesTask``).
"""
from .grammar import CATEGORIES, PROMPTS, Spec, parse, prompt_id

__all__ = ["CATEGORIES", "PROMPTS", "Spec", "parse", "prompt_id"]
