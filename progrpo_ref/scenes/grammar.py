"""The scenes' prompts: a small grammar in GenEval's six categories, parsed into what a scene must contain.

| category | template | example |
|---|---|---|
| ``single_object`` | a {shape} | a circle |
| ``two_object`` | a {shape} and a {shape} | a circle and a square |
| ``counting`` | {n} [{colour}] {shape}s | three triangles, two red squares |
| ``colors`` | a {colour} {shape} | a blue circle |
| ``position`` | a [{colour}] {shape} {relation} a [{colour}] {shape} | a red circle left of a blue square |
| ``color_attr`` | a {colour} {shape} and a {colour} {shape} | a green square and a yellow triangle |

A prompt parses into a ``Spec``: the requirements ``(shape, colour or None, count)`` and, for ``position``, the
relation of the first to the second ("A left of B"), as GenEval's metadata does. As in GenEval, the two objects of a
prompt are of different kinds (shapes), so that each requirement counts its own shape. ``PROMPTS`` lists every prompt
the grammar makes (1,194 with the three shapes and six colours below; 342 of them held out); a prompt's id is its
index there, which is what the task passes around as ``prompts [B]``.

Held-out combinations: ``HELD_OUT_PAIRS`` are (colour, shape) pairs that no training prompt mentions; a prompt that
names one is held out, never seen in pretraining or in GRPO, and measures compositional generalisation (the
model has seen each colour and each shape, never the pair).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import product

SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow", "magenta", "cyan")
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {"two": 2, "three": 3, "four": 4}
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
HELD_OUT_PAIRS = (("green", "triangle"), ("yellow", "circle"), ("blue", "square"))
PLURAL = {s: s + "s" for s in SHAPES}


@dataclass(frozen=True)
class Spec:
    """What a scene must contain. ``objects[i] = (shape, colour or None, count)``; ``relation`` says where
    ``objects[0]`` is relative to ``objects[1]`` (``position`` prompts only)."""

    category: str
    objects: tuple[tuple[str, str | None, int], ...]
    relation: str | None = None

    def pairs(self) -> set[tuple[str, str]]:
        """The (colour, shape) pairs the prompt names."""
        return {(c, s) for s, c, _ in self.objects if c is not None}


def _object(words: list[str]) -> tuple[str, str | None] | None:
    """``[colour] shape`` -> (shape, colour), or None."""
    if len(words) == 1 and words[0] in SHAPES:
        return words[0], None
    if len(words) == 2 and words[0] in COLORS and words[1] in SHAPES:
        return words[1], words[0]
    return None


def parse(prompt: str) -> Spec:
    """The ``Spec`` of a prompt; ``ValueError`` naming the prompt (and the first unknown word) if the grammar does
    not make it."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt {prompt!r} is empty; prompts look like {PROMPTS[0]!r} or {PROMPTS[-1]!r}")
    words = prompt.split()
    vocabulary = set(VOCABULARY)
    unknown = [w for w in words if w not in vocabulary]
    if unknown:
        raise ValueError(f"prompt {prompt!r}: {unknown[0]!r} is not in the vocabulary {sorted(vocabulary)}")
    spec = _parse(words)
    if spec is None:
        raise ValueError(f"prompt {prompt!r} is outside the grammar (see progrpo_ref.scenes.grammar)")
    return spec


def _parse(w: list[str]) -> Spec | None:
    if w[0] in NUMBERS and len(w) in (2, 3):  # counting: {n} [colour] shapes
        colour = w[1] if len(w) == 3 else None
        shape = next((s for s, p in PLURAL.items() if p == w[-1]), None)
        if shape is None or (colour is not None and colour not in COLORS):
            return None
        return Spec("counting", ((shape, colour, NUMBERS[w[0]]),))
    if w[0] != "a":
        return None
    for rel in RELATIONS:  # position: a [colour] shape REL a [colour] shape
        r = rel.split()
        for i in range(2, len(w) - len(r)):
            if w[i:i + len(r)] == r and w[i + len(r)] == "a":
                a, b = _object(w[1:i]), _object(w[i + len(r) + 1:])
                if a and b and a[0] != b[0] and (a[1] is None) == (b[1] is None):
                    return Spec("position", ((*a, 1), (*b, 1)), rel)
                return None
    if "and" in w:  # two_object / color_attr: a X and a Y
        i = w.index("and")
        if i + 1 < len(w) and w[i + 1] == "a":
            a, b = _object(w[1:i]), _object(w[i + 2:])
            if a and b and a[0] != b[0] and (a[1] is None) == (b[1] is None):
                return Spec("two_object" if a[1] is None else "color_attr", ((*a, 1), (*b, 1)))
        return None
    one = _object(w[1:])  # single_object / colors
    if one:
        return Spec("single_object" if one[1] is None else "colors", ((*one, 1),))
    return None


def _all_prompts() -> list[str]:
    out = [f"a {s}" for s in SHAPES]
    out += [f"a {s} and a {t}" for s, t in product(SHAPES, SHAPES) if s != t]
    out += [f"{n} {PLURAL[s]}" for n, s in product(NUMBERS, SHAPES)]
    out += [f"{n} {c} {PLURAL[s]}" for n, c, s in product(NUMBERS, COLORS, SHAPES)]
    out += [f"a {c} {s}" for c, s in product(COLORS, SHAPES)]
    out += [f"a {s} {r} a {t}" for s, r, t in product(SHAPES, RELATIONS, SHAPES) if s != t]
    objects = [(c, s) for c, s in product(COLORS, SHAPES)]
    out += [f"a {c} {s} {r} a {d} {t}" for (c, s), r, (d, t) in product(objects, RELATIONS, objects) if s != t]
    out += [f"a {c} {s} and a {d} {t}" for (c, s), (d, t) in product(objects, objects) if s != t]
    return out


VOCABULARY = ("a", "and", "of", "left", "right", "above", "below", *NUMBERS, *COLORS, *SHAPES, *PLURAL.values())
PROMPTS = _all_prompts()
SPECS = [parse(p) for p in PROMPTS]
HELD_OUT = [i for i, s in enumerate(SPECS) if s.pairs() & set(HELD_OUT_PAIRS)]
TRAIN = [i for i, s in enumerate(SPECS) if not s.pairs() & set(HELD_OUT_PAIRS)]


def prompt_id(prompt: str) -> int:
    """The id of a prompt (its index in ``PROMPTS``); ``ValueError`` naming it if the grammar does not make it."""
    parse(prompt)
    return PROMPTS.index(prompt)  # the grammar enumerates every prompt it parses (tests/test_scenes.py)


def relations(box_a: tuple[float, float, float, float], box_b: tuple[float, float, float, float],
              threshold: float = 0.1) -> set[str]:
    """Where box A lies relative to box B, by GenEval's rule. Boxes are ``(x0, y0, x1, y1)`` in pixels, y downward.
    With centres c and sizes d, the offset o = c_A - c_B is shrunk by ``threshold`` (d_A + d_B) towards zero on each
    axis, then divided by |o|; a component beyond 0.5 names the relation ("left of" for x < -0.5, "above" for
    y < -0.5). Boxes whose shrunk offset is zero have no relation."""
    ca = ((box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2)
    cb = ((box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2)
    da = (box_a[2] - box_a[0], box_a[3] - box_a[1])
    db = (box_b[2] - box_b[0], box_b[3] - box_b[1])
    o = (ca[0] - cb[0], ca[1] - cb[1])
    shrunk = [max(abs(o[i]) - threshold * (da[i] + db[i]), 0.0) * (1 if o[i] > 0 else -1) for i in (0, 1)]
    norm = (o[0] ** 2 + o[1] ** 2) ** 0.5
    if norm == 0 or max(abs(shrunk[0]), abs(shrunk[1])) < 1e-3:
        return set()
    dx, dy = shrunk[0] / norm, shrunk[1] / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out
