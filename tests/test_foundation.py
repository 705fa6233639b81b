"""Data, model, checkpoints, classifiers and rewards, checked against independent computations."""
import io
import shutil

import pytest
import torch

from progrpo_ref.digits.classifier import heldout_accuracy, load_classifier
from progrpo_ref.digits.data import load_digits_tensors, load_split
from progrpo_ref.digits.model import FlowModel, FlowModelConfig, load_flow_model
from progrpo_ref.digits.pretrain import PretrainConfig, pretrain_flow, sample_accuracy
from progrpo_ref.digits.rewards import HEADLINE_REWARD, REWARDS, decode, get_reward


def test_data_shape_range_and_split():
    x, y = load_digits_tensors()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert x.min() == -1 and x.max() == 1
    xt, yt = load_split("train")
    xh, yh = load_split("heldout")
    assert len(yt) + len(yh) == 1797 and len(yh) == 359
    # disjoint: no held-out image appears among the train images (digits has few exact duplicates)
    flat_t = {tuple(v.tolist()) for v in xt.flatten(1)}
    overlap = sum(tuple(v.tolist()) in flat_t for v in xh.flatten(1))
    assert overlap <= 2
    assert torch.equal(load_split("heldout")[1], yh)  # fixed split
    with pytest.raises(ValueError, match="split='test'"):
        load_split("test")


def test_model_forward_shapes_and_prompt_conditioning():
    torch.manual_seed(0)
    m = FlowModel(FlowModelConfig())
    x = torch.randn(6, 1, 8, 8)
    v = m(x, torch.rand(6), torch.arange(6))
    assert v.shape == (6, 1, 8, 8)
    assert m(x, 0.5, torch.arange(6)).shape == (6, 1, 8, 8)  # float sigma broadcasts
    tokens, pooled = m.encode_prompts(torch.arange(6))
    assert tokens.shape == (6, 4, 32) and pooled.shape == (6, 32)


def test_short_pretraining_lowers_the_loss():
    _, losses = pretrain_flow(PretrainConfig(steps=120, batch_size=64, lr=2e-3), progress=False)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)


def test_committed_classifiers_heldout_accuracy():
    assert heldout_accuracy(load_classifier("reward")) >= 0.98
    assert heldout_accuracy(load_classifier("heldout")) >= 0.97


def test_committed_flow_model_meets_the_95_percent_bar(flow_model):
    acc = sample_accuracy(flow_model, load_classifier("reward"), per_class=100, num_steps=10, seed=0)
    assert acc >= 0.95, acc


def test_decode_clamps_to_image_range():
    x = torch.tensor([-3.0, -1.0, 0.2, 1.0, 4.0]).view(1, 1, 1, 5).expand(1, 1, 8, 5)
    assert decode(x).min() == -1 and decode(x).max() == 1


def test_classifier_rewards_match_the_logits():
    clf = load_classifier("reward")
    x, y = load_split("heldout")
    x, y = x[:32], y[:32]
    logits = clf(x)
    probs = logits.softmax(1)
    idx = torch.arange(32)
    others = torch.stack([torch.cat([logits[i, : y[i]], logits[i, y[i] + 1 :]]).max() for i in idx])
    assert torch.allclose(get_reward("margin")(x, y), logits[idx, y] - others, atol=1e-5)
    assert torch.allclose(get_reward("prob")(x, y), probs[idx, y], atol=1e-6)
    assert torch.allclose(get_reward("logprob")(x, y), probs[idx, y].log(), atol=1e-5)


def test_jpeg_reward_is_the_encoded_size():
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    blank = -torch.ones(1, 1, 8, 8)
    noise = torch.rand(1, 1, 8, 8, generator=g) * 2 - 1
    inc = get_reward("jpeg_incompressibility")
    assert inc(blank, torch.tensor([0])) < inc(noise, torch.tensor([0]))  # a blank image compresses smaller
    assert get_reward("jpeg_compressibility")(noise, torch.tensor([0])) == -inc(noise, torch.tensor([0]))
    # independent encode of the same 64x64 image
    pix = ((noise[0, 0] + 1) * 127.5).round().to(torch.uint8).numpy().repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    Image.fromarray(pix, mode="L").save(buf, format="JPEG", quality=95)
    assert inc(noise, torch.tensor([0])).item() == pytest.approx(buf.tell() / 1000)


def test_headline_reward_ranks_real_digits_above_blank_and_noise():
    r = get_reward(HEADLINE_REWARD)
    x, y = load_split("heldout")
    real = r(x, y)
    blank = r(-torch.ones_like(x), y)
    noise = r(torch.randn(x.shape, generator=torch.Generator().manual_seed(0)), y)
    assert real.median() > blank.max() and real.median() > noise.max()
    assert real.mean() - max(blank.mean(), noise.mean()) > 5


def test_rewards_are_float32_on_the_images_device(flow_model):
    x, y = load_split("heldout")
    for name in REWARDS:
        out = get_reward(name)(x[:4], y[:4])
        assert out.dtype == torch.float32 and out.shape == (4,) and out.device == x.device


@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (torch.zeros(2, 8, 8), torch.tensor([1, 2]), r"shape \(2, 8, 8\)"),
        (torch.zeros(2, 3, 8, 8), torch.tensor([1, 2]), r"shape \(2, 3, 8, 8\)"),
        (torch.full((2, 1, 8, 8), float("nan")), torch.tensor([1, 2]), "non-finite"),
        (torch.zeros(2, 1, 8, 8), torch.tensor([1, 10]), "prompt 10 is outside"),
        (torch.zeros(2, 1, 8, 8), torch.tensor([-1, 3]), "prompt -1 is outside"),
        (torch.zeros(2, 1, 8, 8), torch.tensor([1.0, 2.0]), "integer tensor"),
        (torch.zeros(2, 1, 8, 8), torch.tensor([1, 2, 3]), "3 prompts for 2 images"),
    ],
)
def test_bad_input_raises(images, prompts, match, margin_reward):
    with pytest.raises(ValueError, match=match):
        margin_reward(images, prompts)


def test_unknown_reward_is_named():
    with pytest.raises(ValueError, match="reward 'pickscore' is unknown"):
        get_reward("pickscore")


def test_non_finite_reward_raises():
    from progrpo_ref.digits.rewards import Reward

    class Broken(Reward):
        name = "broken"

        def score(self, images, prompts):
            return torch.full((len(images),), float("inf"))

    with pytest.raises(ValueError, match="broken returned non-finite"):
        Broken()(torch.zeros(2, 1, 8, 8), torch.tensor([0, 1]))


def test_missing_and_corrupted_checkpoints_name_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m progrpo_ref.digits.pretrain"):
        load_flow_model(tmp_path / "absent.safetensors")
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(RuntimeError, match="could not be loaded.*python -m progrpo_ref.digits.pretrain"):
        load_flow_model(bad)
    # a classifier checkpoint where a flow model is expected is refused too
    from progrpo_ref.digits.classifier import CLASSIFIER_CHECKPOINTS

    wrong = tmp_path / "wrong.safetensors"
    shutil.copy(CLASSIFIER_CHECKPOINTS["reward"], wrong)
    with pytest.raises(RuntimeError, match="could not be loaded"):
        load_flow_model(wrong)
