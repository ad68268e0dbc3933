"""DeepDream: it amplifies the chosen layer, octaves re-inject the lost detail exactly, bad input is one line."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens.render.grid import to_pil
from convlens.inside import input_normalizer
from torchvision.transforms.functional import pil_to_tensor


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return cl.sample_image("chelsea").resize((48, 40))


def _layer_energy(model: cl.Model, picture: Image.Image, layer: str) -> float:
    rgb = pil_to_tensor(picture).float().div(255).unsqueeze(0)
    return cl.activations(model, input_normalizer(model)(rgb), [layer])[layer].pow(2).mean().item()


def test_dream_amplifies_the_chosen_layer_and_keeps_the_size(photo):
    model = cl.load_model(small_cnn())
    dream = to_pil(cl.deepdream(model, photo, ["4"], octaves=2, steps=8, lr=0.02))
    assert dream.size == photo.size
    assert _layer_energy(model, dream, "4") > 1.5 * _layer_energy(model, photo, "4")


def test_without_steps_the_octaves_give_back_the_original(photo):
    # each enlargement adds back exactly what shrinking lost, so zero steps reproduce the photo
    dream = to_pil(cl.deepdream(small_cnn(), photo, ["1"], octaves=3, octave_scale=1.5, steps=0))
    difference = np.abs(np.asarray(dream).astype(int) - np.asarray(photo).astype(int))
    assert difference.max() <= 1


def test_seed_reproduces(photo):
    first = cl.deepdream(small_cnn(), photo, ["1"], octaves=2, steps=3, seed=3)
    again = cl.deepdream(small_cnn(), photo, ["1"], octaves=2, steps=3, seed=3)
    assert torch.equal(first, again)


@pytest.mark.parametrize("kwargs, message", [
    (dict(layers=["9"]), "unknown layer"),
    (dict(layers=[]), "no layers given"),
    (dict(layers=["4"], octaves=6, octave_scale=2.0), "too small for DeepDream"),
    (dict(layers=["1"], octave_scale=1.0), "octave scale > 1"),
])
def test_bad_input_is_one_clear_error(photo, kwargs, message):
    with pytest.raises(cl.ConvlensError, match=message):
        cl.deepdream(small_cnn(), photo, **kwargs)
