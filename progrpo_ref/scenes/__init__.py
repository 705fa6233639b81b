"""Scenes: a compositional text-to-image testbed in the manner of GenEval, beside ``digits/`` (issue 20, in progress).

Here: the prompt grammar (``grammar``), the scene renderer (``render``), the rule-based checker and its reward
(``checker``), the text-conditioned flow model (``model``: a small text encoder and SD3's transformer), its
pretraining (``pretrain``) and the task behind the method's ``Task`` seam (``task``). Not yet: a committed pretrained
checkpoint (``ScenesTask()`` refuses to start without one and names the command that makes it), the learned reward
and its twin, the study and its notebook.
"""
from .grammar import CATEGORIES, PROMPTS, Spec, parse, prompt_id

__all__ = ["CATEGORIES", "PROMPTS", "Spec", "parse", "prompt_id"]
