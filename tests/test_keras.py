"""A Keras 3 model (torch backend) and the same network in PyTorch agree to 1e-5."""

import numpy as np
import pytest
import torch
from torch import nn

import convlens as cl
from convlens.capture import capture
from convlens.models import summarize

keras = pytest.importorskip("keras")


def chollet_cats_vs_dogs(size: int = 48):
    """The small Conv2D/MaxPooling2D/Dense binary classifier of Chollet's book, shrunk."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Conv2D(8, 3, activation="relu", name="conv2d"),
        keras.layers.MaxPooling2D(2, name="max_pooling2d"),
        keras.layers.Conv2D(16, 3, activation="relu", name="conv2d_1"),
        keras.layers.MaxPooling2D(2, name="max_pooling2d_1"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(16, activation="relu", name="dense"),
        keras.layers.Dense(1, activation="sigmoid", name="dense_1"),
    ])


class TorchTwin(nn.Module):
    def __init__(self, kmodel):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 8, 3)
        self.conv2d_1 = nn.Conv2d(8, 16, 3)
        size = kmodel.get_layer("flatten").output.shape[1]
        self.dense = nn.Linear(size, 16)
        self.dense_1 = nn.Linear(16, 1)
        with torch.no_grad():
            for name in ("conv2d", "conv2d_1"):
                kernel, bias = (torch.as_tensor(np.asarray(w)) for w in kmodel.get_layer(name).get_weights())
                getattr(self, name).weight.copy_(kernel.permute(3, 2, 0, 1))
                getattr(self, name).bias.copy_(bias)
            for name in ("dense", "dense_1"):
                kernel, bias = (torch.as_tensor(np.asarray(w)) for w in kmodel.get_layer(name).get_weights())
                getattr(self, name).weight.copy_(kernel.T)
                getattr(self, name).bias.copy_(bias)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.conv2d(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2d_1(x)), 2)
        x = x.permute(0, 2, 3, 1).flatten(1)  # Keras flattens channels-last
        return torch.sigmoid(self.dense_1(torch.relu(self.dense(x))))


@pytest.fixture(scope="module")
def kmodel():
    return chollet_cats_vs_dogs()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras_file_matches_torch_twin(kmodel, tmp_path, suffix):
    path = tmp_path / f"catsdogs{suffix}"
    kmodel.save(path)
    model = cl.load_model(path, labels=["cat", "dog"])
    twin = TorchTwin(kmodel).eval()
    assert model.layout == "channels_last" and model.output == "sigmoid"

    x_first = torch.rand(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    x_last = x_first.permute(0, 2, 3, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x_last), twin(x_first), atol=1e-5, rtol=0)

    with capture(model, ["conv2d_1", "max_pooling2d"]) as rec, torch.no_grad():
        rec.forward(model.to_internal(x_last))
    with torch.no_grad():
        conv1 = torch.relu(twin.conv2d(x_first))
        expected = torch.relu(twin.conv2d_1(nn.functional.max_pool2d(conv1, 2)))
    torch.testing.assert_close(rec.outputs["conv2d_1"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rec.outputs["max_pooling2d"], nn.functional.max_pool2d(conv1, 2), atol=1e-5, rtol=0)

    # logits: the final sigmoid is skipped
    with capture(model, rewrite=model.logit_rewrites()) as rec, torch.no_grad():
        logits = rec.forward(x_first)
        twin_logits = twin.dense_1(torch.relu(twin.dense(
            nn.functional.max_pool2d(expected, 2).permute(0, 2, 3, 1).flatten(1))))
    torch.testing.assert_close(logits, twin_logits, atol=1e-5, rtol=0)


def test_keras_gradients_reach_channels_first_activations(kmodel):
    model = cl.load_model(kmodel)
    twin = TorchTwin(kmodel).eval()
    x = torch.rand(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    with capture(model, ["conv2d_1"], graph=True) as rec:
        score = rec.forward(x).sum()
        grad, = torch.autograd.grad(score, rec.outputs["conv2d_1"])
    with capture(twin, ["conv2d_1"], graph=True) as rec:
        score = rec.forward(x).sum()
        twin_grad, = torch.autograd.grad(score, rec.outputs["conv2d_1"])
        alive = rec.outputs["conv2d_1"] > 0
    # Keras fuses the ReLU into conv2d_1 and the twin's conv is pre-ReLU: compare where the ReLU passes
    assert twin_grad[alive].abs().sum() > 0
    torch.testing.assert_close(grad * alive, twin_grad, atol=1e-5, rtol=1e-4)


def test_keras_layer_table_matches_count_params(kmodel):
    model = cl.load_model(kmodel)
    summary = summarize(model)
    assert summary.total_params == kmodel.count_params()
    rows = {r.name: r for r in summary.rows}
    assert rows["conv2d"].output_shape == (-1, 46, 46, 8)
    assert rows["conv2d"].params == 8 * 27 + 8
    assert summary.auto_layer == "max_pooling2d_1"
    assert [r.name for r in summary.rows][0] == "conv2d"


def test_keras_preprocess_is_channels_last_and_rescaled(kmodel):
    model = cl.load_model(kmodel)
    x = model.preprocess(np.full((60, 80, 3), 255, dtype=np.uint8))
    assert x.shape == (1, 48, 48, 3) and torch.allclose(x, torch.ones_like(x))
    tf_mode = cl.load_model(kmodel, preprocessing="tf").preprocess(np.zeros((10, 10, 3), dtype=np.uint8))
    assert torch.allclose(tf_mode, -torch.ones_like(tf_mode))
    preds = cl.load_model(kmodel, labels=["cat", "dog"]).predict(x, top_k=2)[0]
    assert sum(p.probability for p in preds) == pytest.approx(1.0)


def test_keras_state_is_restored_after_an_exception(kmodel):
    model = cl.load_model(kmodel)
    flags = [p.requires_grad for p in model.module.parameters()]
    layer = kmodel.get_layer("conv2d")
    with pytest.raises(RuntimeError, match="boom"):
        with capture(model, ["conv2d"]) as rec:
            rec.forward(torch.rand(1, 3, 48, 48))
            raise RuntimeError("boom")
    assert [p.requires_grad for p in model.module.parameters()] == flags
    assert len(layer._forward_hooks) == 0
