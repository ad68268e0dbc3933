"""The model zoo (issue #11): convlens on CNNs nobody here wrote, and the fixes they forced.

Every entry of :data:`zoo_models.ZOO` (timm CNN families at 96 px, keras.applications
at their default sizes; seeded random weights, nothing downloads) goes through the
whole API: the layer table and its ``auto`` layer, ``predict``, every heatmap method
(a method that does not apply must refuse in one line that says why), activations,
filter patterns, and the HTML report. On the timm models every CAM method is
compared with pytorch-grad-cam (see ``cam_reference``).

One image per model, the documented speed options of the slow methods, and one
model built per module (the fixture is module-scoped): ``pytest tests/test_zoo.py
--durations=20`` shows where the time goes; ``-k timm-`` or ``-k keras-`` runs one side.
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
from convlens.heatmaps import METHODS, explain
from convlens.report import ReportImage, build_report
from convlens.report.sections import REPORT_METHODS

from cam_reference import CAM_PEERS, TOLERANCE, WHOLE_MODEL, Logit, difference, peer_cam
from zoo_models import ZOO, ZooEntry


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# -- the matrix -----------------------------------------------------------------------------------------

#: the documented speed options the slow methods run with here
FAST = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"steps": 2}, "scorecam": {"top_k": 8},
        "ablationcam": {"batch_size": 512}, "smoothgrad_sq": {"n_samples": 2}, "vargrad": {"n_samples": 2},
        "gradient_shap": {"n_samples": 2}, "occlusion": {"window": 64, "stride": 64},
        "feature_ablation": {"n_segments": 8}, "shapley_sampling": {"n_segments": 4, "n_samples": 1},
        "deeplift_shap": {"n_baselines": 1}, "lime": {"n_segments": 8, "n_samples": 3},
        "kernel_shap": {"n_segments": 8, "n_samples": 3},
        "smoothgradcam++": {"n_samples": 2}, "sscam": {"n_samples": 1, "top_k": 4},
        "iscam": {"n_samples": 1, "top_k": 4}}
PERTURBATION = {"scorecam", "ablationcam"}
#: The Keras rows run at their fixed 224-299 px, so each method costs seconds there: every method runs on
#: this one, the report's fourteen on every Keras row, and each method's refusals everywhere (the CI budget;
#: the other methods' Keras values are checked in test_heatmaps_reference on a small Keras CNN).
KERAS_EVERY_METHOD = "MobileNetV2"


@dataclass
class Loaded:
    entry: ZooEntry
    model: cl.Model
    image: Image.Image
    x: torch.Tensor  # the preprocessed image, in the model's layout
    summary: object
    logits: torch.Tensor  # (1, K), the final softmax skipped

    @property
    def early_layer(self) -> str:
        """The second convolution with a spatial output: filter patterns and grids there stay cheap."""
        types = {row.name: row.type for row in self.summary.rows}
        convolutions = [name for name in self.summary.spatial_layers if "conv" in types[name].lower()]
        return convolutions[1] if len(convolutions) > 1 else self.summary.spatial_layers[1]  # a ViT has one


@pytest.fixture(scope="module", params=ZOO, ids=str)
def zoo(request) -> Loaded:
    entry = request.param
    pytest.importorskip("timm" if entry.framework == "timm" else "keras")
    model = entry.build()
    image = cl.sample_image("chelsea")
    x = model.preprocess([image])
    with cl.capture(model, rewrite=model.logit_rewrites()) as rec, torch.no_grad():
        logits = model.scores(rec.forward(model.to_internal(x)))
    return Loaded(entry, model, image, x, cl.summarize(model), logits)


class SelectOutput(torch.nn.Module):
    """One output of a multi-output module, for a reference that reads a single tensor."""

    def __init__(self, module: torch.nn.Module, key):
        super().__init__()
        self.module, self.key = module, key

    def forward(self, x):
        return self.module(x)[self.key]


def test_auto_layer_is_a_spatial_map_and_predict_ranks_the_logits(zoo):
    model, summary = zoo.model, zoo.summary
    row = next(r for r in summary.rows if r.name == summary.auto_layer)
    if zoo.entry.tokens:  # a ViT's token sequence read on its patch grid, not heads x tokens x dims
        assert row.layout == "tokens" and len(row.output_shape) == 3, row
        side = int(round((row.output_shape[1] - zoo.entry.tokens) ** 0.5))
        assert side ** 2 == row.output_shape[1] - zoo.entry.tokens and side >= 3, row
    else:
        assert row.output_shape is not None and len(row.output_shape) == 4, row
        height, width = row.output_shape[1:3] if model.layout == "channels_last" else row.output_shape[2:]
        assert height * width > 1 and min(height, width) >= 3, row  # a map, not a token tensor or a pooled vector
    predictions = model.predict(zoo.x, top_k=3)[0]
    probabilities = zoo.logits.softmax(dim=1)[0]
    assert [p.index for p in predictions] == probabilities.topk(3).indices.tolist()
    assert [p.probability for p in predictions] == pytest.approx(probabilities.topk(3).values.tolist(), abs=1e-5)


def test_keras_preprocessing_is_read_from_the_model(zoo):
    if zoo.entry.framework != "keras":
        pytest.skip("torch models are loaded with ImageNet preprocessing")
    model = zoo.model
    assert model.info["preprocessing"] == zoo.entry.preprocessing, model.info["preprocessing_reason"]
    white = model.preprocess(np.full((32, 32, 3), 255, dtype=np.uint8))
    assert float(white.max()) == (255.0 if zoo.entry.preprocessing == "raw" else 1.0)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_explains_or_says_why_not(zoo, method):
    reason = zoo.entry.refuses.get(method)
    if (zoo.entry.framework == "keras" and zoo.entry.name != KERAS_EVERY_METHOD and reason is None
            and method not in REPORT_METHODS):
        pytest.skip(f"{method} runs on the Keras {KERAS_EVERY_METHOD} row (see KERAS_EVERY_METHOD)")
    if reason is not None:
        with pytest.raises(cl.ConvlensError) as err:
            explain(zoo.model, zoo.x, method=method, layer=zoo.summary.auto_layer, **FAST.get(method, {}))
        assert reason in _one_line(err)
        return
    result = explain(zoo.model, zoo.x, method=method, layer=zoo.summary.auto_layer, **FAST.get(method, {}))
    size = tuple(zoo.model.to_internal(zoo.x).shape[-2:])
    assert result.maps.shape == (1, *size) and result.maps.dtype == torch.float32
    assert torch.isfinite(result.maps).all() and torch.isfinite(result.raw).all()
    assert float(result.maps.min()) == 0.0 and float(result.maps.max()) == (0.0 if result.flat[0] else 1.0)
    assert result.targets == [int(zoo.logits.argmax())]  # top-1 by default
    if METHODS[method].uses_layer:
        assert result.layer == zoo.summary.auto_layer


def _ablation_by_hand(model: cl.Model, x: torch.Tensor, layer: str, target: int) -> torch.Tensor:
    """Ablation-CAM's raw map by the paper's definition: copy ``k`` of the image runs with channel ``k`` zeroed."""
    module = model.named_layers()[layer]
    with torch.no_grad(), cl.capture(model, [layer]) as rec:
        base = rec.forward(x)[0, target]
        acts = rec.outputs[layer][0]
    channels = acts.shape[0]

    def zero_one_channel_per_copy(mod, inputs, output):
        keep = 1 - torch.eye(channels, dtype=output.dtype).view(channels, channels, 1, 1)
        return output * keep

    with torch.no_grad(), cl.capture(model, rewrite={module: zero_one_channel_per_copy}) as rec:
        scores = rec.forward(x.expand(channels, -1, -1, -1))[:, target]
    return torch.einsum("k,khw->hw", (base - scores) / base, acts).unsqueeze(0)


@pytest.mark.parametrize("method", list(CAM_PEERS))
def test_cam_methods_match_pytorch_grad_cam(zoo, method):
    entry, model = zoo.entry, zoo.model
    if entry.framework != "timm":
        pytest.skip("compared on the torch models (the Keras comparison is in test_heatmaps_reference)")
    if method in entry.refuses:
        pytest.skip(f"{method} does not apply to {entry.name} (its refusal is tested above)")
    layer = entry.narrow_layer if method in PERTURBATION else zoo.summary.auto_layer
    ours = explain(model, zoo.x, method=method, layer=layer, **CAM_PEERS[method][1])
    layer_module = model.named_layers()[layer]
    if entry.tokens and method == "ablationcam":
        pytest.skip("pytorch-grad-cam ablates ViT tokens at min - 1e7, class token included; the paper's zeroing "
                    "of the patch grid is checked by hand in test_field_models")
    if entry.tokens and method == "shapleycam":
        pytest.skip("pytorch-grad-cam's ShapleyCAM weights the activations before its reshape_transform and fails "
                    "on tokens; its second-order term is checked by hand in test_cam_variants")
    module, reshape = model.module, None
    if entry.output is not None:  # the peer reads one tensor: hand it the module's class-score output
        module = SelectOutput(model.module, entry.output)
    if entry.tokens and method not in WHOLE_MODEL:  # FullGrad reads the patch embedding's conv: a map already
        h, w = ours.raw.shape[-2:]
        reshape = lambda t: t[:, entry.tokens:].reshape(t.shape[0], h, w, t.shape[2]).permute(0, 3, 1, 2)  # noqa: E731
    if method == "ablationcam":
        with torch.no_grad(), cl.capture(model, [layer]) as rec:
            rec.forward(zoo.x)
        if float(rec.outputs[layer].min()) != 0.0:
            # pytorch-grad-cam zeroes a channel only where the layer's minimum is 0 (after a ReLU); elsewhere
            # it sets it to min - 1e7, departing from the paper on purpose. Here the paper's zeroing is the
            # reference, computed channel by channel.
            expected = _ablation_by_hand(model, zoo.x, layer, ours.targets[0])
            torch.testing.assert_close(ours.raw, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)
            return
    theirs = peer_cam(method, module, layer_module, zoo.x, [Logit(t) for t in ours.targets],
                      tuple(ours.raw.shape[-2:]), reshape)
    gap = difference(method, ours.raw, theirs)
    assert gap <= TOLERANCE, f"{method} on {entry.name} at {layer}: {gap}"


def test_activations_and_filter_patterns(zoo):
    model = zoo.model
    maps = cl.activations(model, zoo.image)
    spatial = zoo.summary.spatial_layers
    assert maps and list(maps) == [name for name in spatial if name in maps]  # in forward order
    assert spatial.index(list(maps)[-1]) <= spatial.index(zoo.summary.auto_layer)
    rows = {row.name: row for row in zoo.summary.rows}
    for name, value in maps.items():
        shape, layout = rows[name].output_shape, rows[name].layout
        if layout == "tokens":  # (N, P + h*w, C) -> (N, C, h, w)
            expected = (shape[2], *value.shape[2:])
            assert value.shape[2] * value.shape[3] == shape[1] - zoo.entry.tokens, name
        elif model.layout == "channels_first" and layout == "channels_first":
            expected = shape[1:]
        else:
            expected = tuple(np.take(shape, [3, 1, 2]))
        assert tuple(value.shape) == (1, *expected) and torch.isfinite(value).all(), name
    patterns = cl.filter_patterns(model, zoo.early_layer, filters=[0, 1], steps=2, seed=0)
    side = model.input_size if model.info.get("fixed_input_size") else (128, 128)
    assert patterns.images.shape == (2, 3, *side)
    assert 0 <= float(patterns.images.min()) and float(patterns.images.max()) <= 1
    assert torch.isfinite(patterns.activations).all() and patterns.filters == [0, 1]


def test_report_is_written_and_names_what_does_not_apply(zoo, tmp_path):
    layer = zoo.early_layer
    path = build_report(zoo.model, [ReportImage("cat", zoo.image)], tmp_path / "r.html", methods=["cam"],
                        activation_layers=[layer], filter_layers=[layer], filter_steps=0, filter_count=2,
                        classes=[0])  # no steps: the optimisation itself is tested above
    html = path.read_text()
    for section in ("model", "predictions", "heatmaps", "concepts", "activations", "filters"):
        assert f'<section id="{section}">' in html
    shown = 0 if "cam" in zoo.entry.refuses else 1
    # thumbnail, original + heatmap (no block at all when no method applies), the image's concepts figure,
    # every class's map, one activation grid, one filter grid, the class models
    classes = zoo.logits.shape[1]  # 10: one Grad-CAM per class for the first image
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 1 + 2 * shown + 1 + classes + 1 + 1 + 1
    if "cam" in zoo.entry.refuses:
        assert "Left out, as they do not apply to this model: cam: CAM needs" in html
    else:
        assert "Left out" not in html


# -- what the zoo forced: XGrad-CAM's near-zero denominators --------------------------------------------

class CancellingChannels(torch.nn.Module):
    """The input itself is the layer (``features``); GAP; logit 0 = the sum of the two channel means."""

    def __init__(self):
        super().__init__()
        self.features = torch.nn.Identity()
        self.fc = torch.nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 0.0]]))

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_xgradcam_divides_a_cancelling_channel_by_its_sum_plus_the_references_epsilon():
    """Channel 0 sums to 2^-24 (as SiLU/GELU channels of timm CNNs nearly do), channel 1 to 6.

    dS/dA = 1/3 everywhere, so w_k = sum_ij A G / (sum A + eps) = (1/3) S_k / (S_k + 1e-7): channel 0 gets
    0.125, not the 1/3 that dividing by S_0 alone gives, and the map is no longer channel 1's alone.
    """
    x = torch.tensor([[[[0.5, -0.5, 2.0 ** -24]], [[1.0, 2.0, 3.0]]]])
    ours = explain(CancellingChannels(), x, method="xgradcam", layer="features", target=0)
    sums = x.double().sum((2, 3))[0]
    weights = sums / 3 / (sums + 1e-7)
    expected = (weights.view(2, 1, 1) * x[0].double()).sum(0).float()
    torch.testing.assert_close(ours.raw[0], expected)
    model = CancellingChannels()
    theirs = peer_cam("xgradcam", model, model.features, x.clone().requires_grad_(), [Logit(0)], (1, 3))
    assert difference("xgradcam", ours.raw, theirs) <= TOLERANCE


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
    heatmaps = html[html.index('<section id="heatmaps">'):html.index('<section id="concepts">')]
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


def test_filters_and_class_model_commands_on_a_fixed_size_keras_file(cli, fixed_keras, tmp_path):
    path = tmp_path / "small.keras"
    fixed_keras.save(path)
    code, _, err = cli("filters", path, "--layers", "logits", "--grid", "1x2", "--steps", 2,
                       "--out", tmp_path / "filters")
    assert code == 0, err
    record = json.loads((tmp_path / "filters" / "logits.json").read_text())
    assert record["size"] == 32 and [f["index"] for f in record["filters"]] == [0, 1]
    code, _, err = cli("class-model", path, "--classes", "0,2", "--steps", 2, "--out", tmp_path / "cm")
    assert code == 0, err
    assert Image.open(tmp_path / "cm" / "class_model.png").size[0] > 0
    code, _, err = cli("filters", path, "--layers", "logits", "--size", 40, "--steps", 1,
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


def test_layers_and_predict_say_which_preprocessing_and_why(cli, tmp_path):
    pytest.importorskip("keras")
    from zoo_models import flatten_dense_keras

    path = tmp_path / "convnext_like.keras"
    flatten_dense_keras(32, _preprocessing_cases()["normalization_255"][0]).save(path)
    line = ("preprocessing: raw (the model starts with Normalization(mean=123.7, 116.3, 103.5) "
            "and takes 0-255 pixels)")
    code, out, err = cli("layers", path)
    assert code == 0, err
    assert line in out
    picture = tmp_path / "cat.png"
    cl.sample_image("chelsea").resize((40, 30)).save(picture)
    code, out, err = cli("predict", path, picture, "--json", "--top", "2")
    assert code == 0, err
    assert len(json.loads(out)[0]["predictions"]) == 2  # stdout is still pure JSON
    assert line in err
    code, out, err = cli("predict", path, picture, "--preprocessing", "tf")
    assert code == 0, err
    assert "preprocessing: tf (as requested)" in out


def test_a_keras_model_without_a_declared_size_takes_224_by_default_and_any_other():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    # keras.applications built without input_shape (MobileNetV3) declare (None, None, None, 3)
    any_size = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(4, 3, name="conv"),
                                 keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2, name="logits")])
    model = cl.load_model(any_size)
    assert model.input_size == (224, 224) and not model.info["fixed_input_size"]
    assert model.preprocess(np.zeros((10, 20, 3), dtype=np.uint8)).shape == (1, 224, 224, 3)
    heatmap = explain(model, torch.rand(1, 40, 40, 3), method="gradcam", layer="conv")
    assert heatmap.maps.shape == (1, 40, 40) and heatmap.layer == "conv"
    assert cl.filter_patterns(model, "conv", filters=[0], steps=1).images.shape == (1, 3, 128, 128)

