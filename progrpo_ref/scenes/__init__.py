"""Scenes: a compositional text-to-image testbed in the manner of GenEval (prompts of objects, counts, colours and
positions; a rule-based checker), beside ``digits/``. Issue 20 builds it in steps: the grammar, the renderer and
the checker are here; the text-conditioned flow model, the task and the study are not yet."""
from .grammar import CATEGORIES, PROMPTS, Spec, parse, prompt_id

__all__ = ["CATEGORIES", "PROMPTS", "Spec", "parse", "prompt_id"]
