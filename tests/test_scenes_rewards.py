"""The scenes' learned reward (an attribute model's prompt log-likelihood) and its twin: the count algebra against
brute force, the committed models against rendered scenes, blank and noise images, and bad inputs."""
import itertools

import pytest
import torch

from progrpo_ref.scenes.attributes import (MAX_COUNT, AttributeConfig, AttributeModel, _sum_log_probs, count_labels,
                                           load_attribute_reward, prompt_log_likelihood)
from progrpo_ref.scenes.grammar import COLORS, HELD_OUT, PROMPTS, SHAPES, SPECS, TRAIN, prompt_id
from progrpo_ref.scenes.render import render


def test_the_count_of_a_shape_in_any_colour_is_the_convolution_of_its_colours():
    g = torch.Generator().manual_seed(0)
    log_p = torch.randn(2, 3, MAX_COUNT + 1, generator=g).log_softmax(-1)
    brute = torch.zeros(2, 3 * MAX_COUNT + 1, dtype=torch.float64)
    for ns in itertools.product(range(MAX_COUNT + 1), repeat=3):  # every combination of the three counts
        brute[:, sum(ns)] += sum(log_p[:, k, n].double() for k, n in enumerate(ns)).exp()
    assert torch.allclose(_sum_log_probs(log_p).exp().double(), brute, atol=1e-6)


def test_a_certain_model_gives_zero_for_the_truth_and_a_large_penalty_otherwise():
    """A 'model' that puts probability ~1 on the true counts of a rendered layout."""
    g = torch.Generator().manual_seed(1)
    for pid in (prompt_id("a circle"), prompt_id("two blue triangles"), prompt_id("three squares"),
                prompt_id("a red circle left of a cyan triangle")):
        _, layout = render(SPECS[pid], g, 24)
        certain = torch.full((1, len(COLORS), len(SHAPES), MAX_COUNT + 1), -30.0)
        certain.scatter_(-1, count_labels(layout)[None, ..., None], 0.0)
        certain = certain.log_softmax(-1)
        assert prompt_log_likelihood(certain, torch.tensor([pid])).item() > -1e-6
        wrong = prompt_id("four circles") if pid != prompt_id("three squares") else prompt_id("a square")
        assert prompt_log_likelihood(certain, torch.tensor([wrong])).item() < -10


@pytest.mark.parametrize("name", ["reward", "heldout"])
def test_the_committed_models_prefer_the_right_prompt_and_cannot_be_gamed(name):
    reward = load_attribute_reward(name)
    g = torch.Generator().manual_seed(7)
    ids = torch.tensor((TRAIN if name == "reward" else HELD_OUT)[::5][:150])
    images = torch.stack([render(SPECS[i], g, 24)[0] for i in ids.tolist()])
    right, wrong = reward(images, ids), reward(images, ids.roll(1))
    assert (right > wrong).float().mean() > 0.95
    for junk in (-torch.ones_like(images), torch.rand(images.shape, generator=g) * 2 - 1,
                 torch.randn(images.shape, generator=g).clamp(-1, 1)):  # blank, uniform and Gaussian noise
        assert reward(junk, ids).max() < right.median()
        assert reward(junk, ids).mean() < wrong.mean()


def test_bad_inputs_are_refused():
    reward = load_attribute_reward("reward")
    with pytest.raises(ValueError, match=r"expected \[B, 3, S, S\]"):
        reward(torch.zeros(2, 1, 24, 24), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="range"):
        reward(torch.full((2, 3, 24, 24), 255.0), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prompt id 5000"):
        reward(torch.zeros(2, 3, 24, 24), torch.tensor([0, 5000]))
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        reward(torch.zeros(1, 3, 24, 24), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="kind='rnn'"):
        AttributeModel(AttributeConfig(kind="rnn"))
    with pytest.raises(ValueError, match="name='best'"):
        load_attribute_reward("best")
    assert len(PROMPTS) == 1194
