"""What the model zoo (issue #11) forced: each fix, tested on a small model built in a few lines.

The zoo's models are CNNs nobody here wrote (timm, keras.applications); the matrix
that runs them through the whole API joins these tests.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

import convlens as cl
from convlens.cli import main
from convlens.heatmaps import METHODS, explain
from convlens.report import ReportImage, build_report

from cam_reference import CAM_PEERS, TOLERANCE, Logit, difference, peer_cam
from zoo_models import ZOO, ZooEntry


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exited.value.code or 0, captured.out, captured.err


# -- what the zoo forced: a report that leaves out what does not apply ------------------------------

class GeluFlattenNet(torch.nn.Module):
    """conv -> GELU -> flatten -> linear: no GAP head (CAM does not apply), no ReLU (guided backprop neither)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.act = torch.nn.GELU()
        self.fc = torch.nn.Linear(4 * 16 * 16, 3)

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


def test_report_leaves_out_the_methods_that_do_not_apply_and_says_why(tmp_path):
    from convlens.models.loading import from_module

    torch.manual_seed(0)
    model = from_module(GeluFlattenNet(), labels=["a", "b", "c"], input_size=16)
    mask = np.zeros((16, 16), dtype=bool)
    mask[4:12, 4:12] = True
    picture = Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8))
    path = build_report(model, [ReportImage("masked", picture, mask)], tmp_path / "r.html",
                        methods=["cam", "gradcam", "guided_backprop"], evaluation_methods=["cam", "gradcam"],
                        filter_steps=1, filter_count=2, classes=[0])
    html = path.read_text()
    heatmaps = html[html.index('<section id="heatmaps">'):html.index('<section id="activations">')]
    assert ("Left out, as they do not apply to this model: cam: CAM needs layer &#39;act&#39; followed by global "
            "average pooling and a linear head") in heatmaps
    assert "; guided_backprop: guided backpropagation needs ReLU layers" in heatmaps
    assert len(re.findall(r"<img ", heatmaps)) == 2  # the image and its one applicable map (gradcam)
    evaluation = html[html.index('<section id="evaluation">'):]
    assert "Left out, as they do not apply to this model: cam: CAM needs" in evaluation
    assert "<td>gradcam</td>" in evaluation and "<td>cam</td>" not in evaluation
    # the dense head reads a 16 x 16 map only: the class model, optimised through jitter and rescaling,
    # cannot run (unless the model is marked fixed-size), and the report says so instead of aborting
    filters = html[html.index('<section id="filters">'):html.index('<section id="evaluation">')]
    assert "Left out, as the model cannot run them: class models: the model cannot run on a" in filters
    model.info["fixed_input_size"] = True
    html = build_report(model, [ReportImage("masked", picture, mask)], tmp_path / "fixed.html", methods=["gradcam"],
                        filter_steps=1, filter_count=2, classes=[0]).read_text()
    assert "Left out" not in html and "class-model images" in html


# -- what the zoo forced: a fixed-size Keras model keeps its size in filter patterns and class models -------

@pytest.fixture(scope="module")
def fixed_keras():
    pytest.importorskip("keras")
    from zoo_models import flatten_dense_keras

    return flatten_dense_keras(32)


def test_fit_crops_or_pads_back_to_the_size_around_the_centre():
    from convlens.inside.transforms import fit

    images = torch.arange(2 * 8 * 4, dtype=torch.float32).view(1, 2, 8, 4)
    fitted = fit((5, 7))(images, torch.Generator())
    assert fitted.shape == (1, 2, 5, 7)
    torch.testing.assert_close(fitted[..., 1:5], images[..., 1:6, :])  # 1 row off the top, 2 off the bottom
    assert (fitted[..., :1] == 0.5).all() and (fitted[..., 5:] == 0.5).all()  # 1 gray column left, 2 right


def test_filter_patterns_and_class_models_run_at_a_fixed_size_keras_models_size(fixed_keras):
    model = cl.load_model(fixed_keras)
    assert model.info["fixed_input_size"] and model.input_size == (32, 32)
    # the standard transforms pad, jitter, rescale and rotate; the dense layer still sees 32 x 32
    patterns = cl.filter_patterns(model, "logits", filters=[0, 2], steps=4, seed=0)
    assert patterns.images.shape == (2, 3, 32, 32)
    assert (patterns.activations > patterns.initial_activations).all()
    classes = cl.class_model(model, [1], steps=4, seed=0)
    assert classes.images.shape == (1, 3, 32, 32) and classes.logits[0] > classes.initial_logits[0]
    with pytest.raises(cl.ConvlensError) as err:
        cl.filter_patterns(model, "logits", filters=[0], size=40, steps=1)
    message = _one_line(err)
    assert "cannot run on a 40x40 image" in message and "takes 32x32 images only" in message
    convolutional = cl.filter_patterns(model, "conv", filters=[0], size=40, steps=1)  # before the Flatten: any size
    assert convolutional.images.shape == (1, 3, 40, 40)


def test_filters_and_class_model_commands_on_a_fixed_size_keras_file(capsys, fixed_keras, tmp_path):
    path = tmp_path / "small.keras"
    fixed_keras.save(path)
    code, _, err = run_cli(capsys, "filters", path, "--layers", "logits", "--grid", "1x2", "--steps", 2,
                           "--out", tmp_path / "filters")
    assert code == 0, err
    record = json.loads((tmp_path / "filters" / "logits.json").read_text())
    assert record["size"] == 32 and [f["index"] for f in record["filters"]] == [0, 1]
    code, _, err = run_cli(capsys, "class-model", path, "--classes", "0,2", "--steps", 2, "--out", tmp_path / "cm")
    assert code == 0, err
    assert Image.open(tmp_path / "cm" / "class_model.png").size[0] > 0
    code, _, err = run_cli(capsys, "filters", path, "--layers", "logits", "--size", 40, "--steps", 1,
                           "--out", tmp_path / "bad")
    assert code == 2 and "takes 32x32 images only" in err and err.count("\n") == 1
    assert not (tmp_path / "bad").exists()


# -- what the zoo forced: a Keras model's own preprocessing layers decide its input scaling -----------

def _preprocessing_cases():
    import keras

    layers = keras.layers
    imagenet_255 = dict(mean=[123.675, 116.28, 103.53], variance=[3409.98, 3262.69, 3291.89])
    imagenet_01 = dict(mean=[0.485, 0.456, 0.406], variance=[0.0524, 0.0502, 0.0506])
    return {
        # keras.applications ConvNeXt: 0-255 ImageNet statistics, no Rescaling
        "normalization_255": ((layers.Normalization(**imagenet_255),), "raw", "Normalization(mean=123.7, 116.3, 103.5)"),
        # EfficientNetV2, behind augmentation and inside a nested model
        "nested": ((layers.RandomFlip(), keras.Sequential([layers.Rescaling(1 / 255), layers.Normalization(**imagenet_01)])),
                   "raw", "Rescaling(scale=0.003922, offset=0) + Normalization(mean=0.485, 0.456, 0.406)"),
        # MobileNetV3
        "rescaling_tf": ((layers.Rescaling(1 / 127.5, offset=-1),), "raw", "Rescaling(scale=0.007843, offset=-1)"),
        # statistics of 0-1 pixels: the model expects x/255
        "normalization_01": ((layers.Normalization(**imagenet_01),), "rescale", "statistics of 0-1 pixels"),
        "none": ((), "rescale", "no Rescaling or Normalization layer"),
    }


@pytest.mark.parametrize("case", ["normalization_255", "nested", "rescaling_tf", "normalization_01", "none"])
def test_keras_preprocessing_follows_the_models_own_layers(case):
    pytest.importorskip("keras")
    from zoo_models import flatten_dense_keras

    preprocessing_layers, mode, words = _preprocessing_cases()[case]
    model = cl.load_model(flatten_dense_keras(32, preprocessing_layers))
    assert model.info["preprocessing"] == mode and words in model.info["preprocessing_reason"]
    white = model.preprocess(np.full((8, 8, 3), 255, dtype=np.uint8))
    assert float(white.min()) == float(white.max()) == (255.0 if mode == "raw" else 1.0)


def test_keras_preprocessing_names_the_applications_mode_and_obeys_the_caller():
    pytest.importorskip("keras")
    from zoo_models import flatten_dense_keras

    resnet_like = cl.load_model(flatten_dense_keras(32, name="resnet50"))
    assert resnet_like.info["preprocessing"] == "rescale"
    assert "keras.applications' ResNet expects --preprocessing caffe" in resnet_like.info["preprocessing_reason"]
    asked = cl.load_model(flatten_dense_keras(32, _preprocessing_cases()["normalization_255"][0]), preprocessing="tf")
    assert asked.info["preprocessing"] == "tf" and asked.info["preprocessing_reason"] == "as requested"


def test_layers_and_predict_say_which_preprocessing_and_why(capsys, tmp_path):
    pytest.importorskip("keras")
    from zoo_models import flatten_dense_keras

    path = tmp_path / "convnext_like.keras"
    flatten_dense_keras(32, _preprocessing_cases()["normalization_255"][0]).save(path)
    line = ("preprocessing: raw (the model starts with Normalization(mean=123.7, 116.3, 103.5) "
            "and takes 0-255 pixels)")
    code, out, err = run_cli(capsys, "layers", path)
    assert code == 0, err
    assert line in out
    picture = tmp_path / "cat.png"
    cl.sample_image("chelsea").resize((40, 30)).save(picture)
    code, out, err = run_cli(capsys, "predict", path, picture, "--json", "--top", "2")
    assert code == 0, err
    assert len(json.loads(out)[0]["predictions"]) == 2  # stdout is still pure JSON
    assert line in err
    code, out, err = run_cli(capsys, "predict", path, picture, "--preprocessing", "tf")
    assert code == 0, err
    assert "preprocessing: tf (as requested)" in out
