"""The demo model shipped in convlens/assets: loads by name, classifies fresh shapes images."""

import json

import numpy as np
import pytest
import torch

import convlens
from convlens.assets import demo_metrics_path, demo_model_path
from convlens.data import SHAPE_CLASSES, shape_sample

#: the bundled model was trained on seed 0; these images come from a seed it never saw
HELD_OUT_SEED = 12345


@pytest.fixture(scope="module")
def model():
    return convlens.load_model("shapes")


def test_bundled_model_is_small_and_documented(model):
    assert demo_model_path().stat().st_size < 3 * 2 ** 20
    # class folders are read in sorted order, which is SHAPE_CLASSES's: output k is sample.label k
    assert model.labels == list(SHAPE_CLASSES) == sorted(SHAPE_CLASSES) and model.output == "logits"
    metrics = json.loads(demo_metrics_path().read_text())
    assert metrics["accuracy"] >= 0.95 and metrics["classes"] == model.labels


def test_bundled_model_classifies_held_out_images(model):
    samples = [shape_sample(i, HELD_OUT_SEED, 128) for i in range(160)]
    x = model.preprocess([s.image for s in samples])
    with torch.inference_mode():
        predicted = model.probabilities(model(x)).argmax(1).numpy()
    labels = np.array([s.label for s in samples])
    accuracy = float((predicted == labels).mean())
    assert accuracy >= 0.90, accuracy
    assert set(predicted.tolist()) == set(range(len(SHAPE_CLASSES)))  # it tells every class apart


def test_load_model_by_name_and_by_path_agree(model):
    by_path = convlens.load_model(demo_model_path())
    x = torch.rand(2, 3, *model.input_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x), by_path(x))
    assert convlens.load_model("shapes").name == "shapes"
