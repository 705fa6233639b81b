"""The scenes testbed's grammar, renderer and checker (issue 20's first part): the checker read against the rendered
ground truth, against images built by hand, against gaming by blank and noise images, and bad inputs refused."""
import itertools

import pytest
import torch

from progrpo_ref.scenes import grammar
from progrpo_ref.scenes.checker import Found, check, detect, geneval_scores
from progrpo_ref.scenes.grammar import PROMPTS, SPECS, parse, prompt_id, relations
from progrpo_ref.scenes.render import RGB, render, sprite


def test_every_prompt_parses_back_to_its_own_words():
    assert len(PROMPTS) == len(set(PROMPTS)) > 1000
    for p, s in zip(PROMPTS, SPECS):
        words = [c for c in (s.objects[0][1], s.objects[0][0]) if c]
        assert all(w in p for w in words), (p, s)
        assert prompt_id(p) == PROMPTS.index(p)
    # every category, and each category's count from the grammar's own sizes (3 shapes, 6 colours, 4 relations,
    # 3 numbers): pairs of different shapes, with or without a colour each
    n = {c: sum(s.category == c for s in SPECS) for c in grammar.CATEGORIES}
    assert n == {"single_object": 3, "two_object": 6, "counting": 3 * 3 + 3 * 6 * 3, "colors": 18,
                 "position": 6 * 4 + 18 * 12 * 4, "color_attr": 18 * 12}


def test_a_prompt_says_what_it_asks_for():
    assert parse("three red circles") == grammar.Spec("counting", (("circle", "red", 3),))
    s = parse("a blue square left of a red triangle")
    assert s.category == "position" and s.relation == "left of"
    assert s.objects == (("square", "blue", 1), ("triangle", "red", 1))
    assert parse("a circle and a square").category == "two_object"
    assert parse("a cyan triangle").category == "colors"


@pytest.mark.parametrize("prompt, message", [
    ("", "empty"), ("   ", "empty"), ("a purple circle", "'purple' is not in the vocabulary"),
    ("a circle and a circle", "outside the grammar"), ("circle", "outside the grammar"),
    ("a blue square left of a triangle", "outside the grammar"), ("five circles", "'five'"),
    ("a red circle left of a red circle", "outside the grammar"),
])
def test_a_prompt_outside_the_grammar_is_refused_by_name(prompt, message):
    with pytest.raises(ValueError, match=message):
        prompt_id(prompt)


def test_held_out_prompts_name_a_held_out_pair_and_training_renders_never_show_one():
    held = set(grammar.HELD_OUT_PAIRS)
    assert set(grammar.TRAIN).isdisjoint(grammar.HELD_OUT) and len(grammar.TRAIN) + len(grammar.HELD_OUT) == len(PROMPTS)
    assert all(SPECS[i].pairs() & held for i in grammar.HELD_OUT)
    g = torch.Generator().manual_seed(0)
    for i in grammar.TRAIN[::7]:
        _, layout = render(SPECS[i], g)
        assert not {(c, s) for s, c, _ in layout} & held, PROMPTS[i]


def test_relations_by_hand():
    box = lambda x, y: (x, y, x + 5, y + 5)  # noqa: E731
    assert relations(box(0, 5), box(10, 5)) == {"left of"}
    assert relations(box(10, 5), box(0, 5)) == {"right of"}
    assert relations(box(5, 0), box(5, 10)) == {"above"}
    assert relations(box(5, 10), box(5, 0)) == {"below"}
    assert relations(box(0, 0), box(10, 10)) == {"left of", "above"}  # a diagonal names both: 9 / 14.1 = 0.64 > 0.5
    assert relations(box(0, 0), box(10, 4)) == {"left of"}  # (-9, -3) / 10.8: -0.83 and -0.28
    assert relations(box(5, 5), box(6, 5)) == set()  # within the threshold: too close to tell


@pytest.mark.parametrize("size", [16, 24])
def test_the_checker_reads_rendered_scenes_correctly(size):
    """At least 99% of rendered ground-truth scenes satisfy their own prompt (here: all of 1,200 per size, every
    category), and the found objects are exactly the rendered ones."""
    g = torch.Generator().manual_seed(size)
    ids = torch.randint(len(PROMPTS), (1200,), generator=g)
    rendered = [render(SPECS[i], g, size) for i in ids.tolist()]
    images = torch.stack([r[0] for r in rendered])
    scores, strict = geneval_scores(images, ids)
    assert strict.float().mean() >= 0.99 and strict.all()
    assert torch.equal(scores, torch.ones(len(ids)))
    for (_, layout), found in zip(rendered[:200], detect(images[:200])):
        assert sorted((s, c, b) for s, c, b in layout) == sorted((f.shape, f.colour, f.box) for f in found)


def paint(objects, size=16):
    """An image with sprites at given corners: [(shape, colour, x, y)]."""
    image = -torch.ones(3, size, size)
    for shape, colour, x, y in objects:
        m = sprite(shape, 5)
        for ch, v in enumerate(RGB[colour]):
            image[ch, y:y + 5, x:x + 5][m] = 2 * v - 1
    return image


def score(prompt, objects):
    s, ok = geneval_scores(paint(objects)[None], torch.tensor([prompt_id(prompt)]))
    return round(s.item(), 4), bool(ok)


def test_partial_credit_by_hand():
    # two of three circles: count entry 1 - 1/3
    assert score("three circles", [("circle", "red", 0, 0), ("circle", "blue", 8, 8)]) == (round(2 / 3, 4), False)
    # right count, one of two colours right: (1 + 1/2) / 2
    assert score("two red squares", [("square", "red", 0, 0), ("square", "cyan", 8, 8)]) == (0.75, False)
    # wrong count: the colour entry is 0: (1 - 1/2 + 0) / 2
    assert score("two red squares", [("square", "red", 0, 0)]) == (0.25, False)
    # both objects, wrong side: (1 + 1 + 0) / 3
    assert score("a circle left of a square", [("circle", "red", 10, 5), ("square", "red", 0, 5)]) == (round(2 / 3, 4), False)
    assert score("a circle left of a square", [("circle", "red", 0, 5), ("square", "red", 10, 5)]) == (1.0, True)
    # colours and position: the second object's colour wrong, so the relation is not checked: (1 + 1 + 1 + 0 + 0) / 5
    assert score("a red circle above a blue triangle", [("circle", "red", 5, 0), ("triangle", "green", 5, 10)]) == (0.6, False)
    # objects the prompt does not name do not count against it (GenEval checks only named classes)
    assert score("a triangle", [("triangle", "red", 0, 0), ("square", "blue", 8, 8)]) == (1.0, True)
    # too many: four circles for "two circles": 1 - 2/2 = 0
    four = [("circle", "red", x, y) for x, y in itertools.product((0, 8), (0, 8))]
    assert score("two circles", four) == (0.0, False)


def test_blank_and_noise_images_cannot_game_it():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(len(PROMPTS), (400,), generator=g)
    blank_score, blank_strict = geneval_scores(-torch.ones(400, 3, 16, 16), ids)
    assert blank_score.max() <= 0 and not blank_strict.any()
    for noise in (torch.rand(400, 3, 16, 16, generator=g) * 2 - 1, torch.randn(400, 3, 16, 16, generator=g).clamp(-1, 1)):
        s, ok = geneval_scores(noise, ids)
        assert s.mean() < 0.1 and ok.float().mean() < 0.01
    white = torch.ones(400, 3, 16, 16)  # a full-frame block is one large square, never a scene
    s, ok = geneval_scores(white, ids)
    assert ok.float().mean() < 0.01


def test_check_of_found_objects():
    f = lambda s, c, x: Found(s, c, (x, 0, x + 5, 5), 25)  # noqa: E731
    spec = parse("a square right of a circle")
    assert check(spec, [f("square", "red", 10), f("circle", "red", 0)]) == (1.0, True)
    assert check(spec, [f("square", "red", 0), f("circle", "red", 10)]) == (2 / 3, False)


@pytest.mark.parametrize("images, message", [
    (torch.zeros(2, 1, 16, 16), r"\[B, 3, S, S\]"), (torch.zeros(3, 16, 16), r"\[B, 3, S, S\]"),
    (torch.zeros(2, 3, 16, 8), r"\[B, 3, S, S\]"), (torch.full((2, 3, 16, 16), 255.0), "range"),
    (torch.full((2, 3, 16, 16), float("nan")), "finite"), (torch.zeros(2, 3, 16, 16, dtype=torch.long), "floating"),
])
def test_bad_images_are_refused_by_name(images, message):
    with pytest.raises(ValueError, match=message):
        geneval_scores(images, torch.zeros(len(images), dtype=torch.long))


def test_bad_prompt_ids_are_refused_by_name():
    images = -torch.ones(2, 3, 16, 16)
    with pytest.raises(ValueError, match="prompt id 5000"):
        geneval_scores(images, torch.tensor([0, 5000]))
    with pytest.raises(ValueError, match="3 prompts for 2 images"):
        geneval_scores(images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="long tensor"):
        geneval_scores(images, torch.tensor([0.0, 1.0]))


def test_components_match_scipys_labelling():
    """The connected components (4-neighbours, one colour) equal scipy.ndimage.label's on random colour maps."""
    from scipy import ndimage

    from progrpo_ref.scenes.checker import components

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (20, 16, 16), generator=g)  # dense: long, winding components
    ids = components(labels)
    for b in range(len(labels)):
        want = torch.zeros(16, 16, dtype=torch.long)
        offset = 0
        for colour in (1, 2):
            lab, n = ndimage.label((labels[b] == colour).numpy())
            lab = torch.from_numpy(lab).long()
            want += torch.where(lab > 0, lab + offset, 0)
            offset += n
        # the same partition: a one-to-one map between the two sets of ids
        pairs = set(zip(ids[b].flatten().tolist(), want.flatten().tolist()))
        assert len(pairs) == len({a for a, _ in pairs}) == len({w for _, w in pairs})


def test_at_24_pixels_the_checker_reads_blurred_and_noisy_scenes():
    """Generated images are soft and noisy: at 24 pixels (the model's size) a 3x3 binomial blur or noise of std 0.2
    leaves every scene read correctly; at 16 pixels the blur breaks most shapes (the reason the model is 24 x 24)."""
    from torch.nn import functional as F

    g = torch.Generator().manual_seed(3)
    kernel = (torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16).expand(3, 1, 3, 3)
    for size, floor in ((24, 0.99), (16, 0.0)):
        ids = torch.randint(len(PROMPTS), (300,), generator=g)
        images = torch.stack([render(SPECS[i], g, size)[0] for i in ids.tolist()])
        blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
        ok_blur = geneval_scores(blurred, ids)[1].float().mean()
        ok_noise = geneval_scores((images + 0.2 * torch.randn(images.shape, generator=g)).clamp(-1, 1), ids)[1].float().mean()
        assert ok_noise >= 0.99
        if size == 24:
            assert ok_blur >= floor
        else:
            assert ok_blur < 0.7
