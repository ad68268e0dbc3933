"""Activation grids: values equal the layers run by hand, truncated passes, display maths, Keras = torch."""

import warnings

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from torch import nn

import convlens as cl
from convlens.inside.activations import default_layers
from convlens.models.transforms import plain_transform
from convlens.render.grid import activation_grid, channel_image, standardize


def test_activations_equal_the_layers_run_by_hand(tiny, image_batch):
    maps = cl.activations(tiny, image_batch, ["conv1", "relu1", "conv2"])
    assert list(maps) == ["conv1", "relu1", "conv2"]
    with torch.no_grad():
        conv1 = tiny.conv1(image_batch)
        relu1 = torch.relu(tiny.bn.eval()(conv1))
        conv2 = tiny.conv2(relu1)
    torch.testing.assert_close(maps["conv1"], conv1)
    torch.testing.assert_close(maps["relu1"], relu1)  # not overwritten by the in-place ReLU after conv2
    torch.testing.assert_close(maps["conv2"], conv2)


def test_forward_pass_stops_after_the_last_requested_layer(tiny, image_batch):
    calls = []
    handle = tiny.conv2.register_forward_pre_hook(lambda *a: calls.append("conv2"))
    try:
        maps = cl.activations(tiny, image_batch, ["bn"])
    finally:
        handle.remove()
    assert calls == [] and list(maps) == ["bn"]


def test_default_layers_are_convs_and_pools_up_to_the_auto_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    model = cl.load_model(net)
    assert default_layers(model, (16, 16)) == ["0", "2", "3"]


def test_a_preprocessed_image_goes_through_the_model_transform(tiny):
    model = cl.load_model(tiny)
    picture = cl.sample_image("chelsea")
    from_image = cl.activations(model, picture, ["conv1"])["conv1"]
    from_batch = cl.activations(model, model.preprocess(picture), ["conv1"])["conv1"]
    torch.testing.assert_close(from_image, from_batch)


def test_standardize_by_hand_and_dead_channels_blank_without_warnings():
    maps = np.zeros((2, 2, 2))
    maps[0] = [[0.0, 1.0], [2.0, 3.0]]  # mean 1.5, std sqrt(1.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        values, live = standardize(maps)
        grid = np.asarray(activation_grid(torch.tensor(maps, dtype=torch.float32), per_row=2, min_tile=2, margin=1))
    expected = np.clip(64 * (maps[0] - 1.5) / np.sqrt(1.25) + 128, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(values[0], expected)
    assert live.tolist() == [True, False]
    lut = (colormaps["viridis"](np.arange(256))[:, :3] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(grid[1, 1], lut[expected[0, 0]])  # first tile, first pixel
    np.testing.assert_array_equal(grid[2, 2], lut[expected[1, 1]])
    assert (grid[1:3, 4:6] == 255).all()  # the dead channel is blank (white), not NaN colours


def test_grid_wraps_rows_and_enlarges_small_tiles():
    grid = activation_grid(torch.randn(40, 3, 3), per_row=16, min_tile=12, margin=1)
    assert grid.size == (16 * 13 + 1, 3 * 13 + 1)
    titled = activation_grid(torch.randn(4, 8, 8), "layer", per_row=16, min_tile=4)
    assert titled.size[1] > 8 + 2


def test_single_channel_is_drawn_full_size():
    channel = torch.zeros(50, 60)
    channel[:, 30:] = 1.0
    picture = channel_image(channel, "conv1, channel 0")
    assert picture.size[0] >= 480 and picture.size[1] >= 400
    pixels = np.asarray(picture).reshape(-1, 3).astype(int)
    lut = (colormaps["viridis"](np.arange(256))[:, :3] * 255).round().astype(int)
    for end in (lut[0], lut[255]):  # both halves drawn, each in one end of the colormap, a large area each
        assert (np.abs(pixels - end).max(axis=1) <= 1).sum() > 50 * 30


def test_unknown_layer_non_spatial_layer_and_too_small_image(tiny, image_batch):
    with pytest.raises(cl.ConvlensError, match="did you mean"):
        cl.activations(tiny, image_batch, ["conv3"])
    with pytest.raises(cl.ConvlensError, match="no spatial output"):
        cl.activations(tiny, image_batch, ["fc"])
    pooled = nn.Sequential(nn.Conv2d(3, 2, 3), nn.MaxPool2d(4), nn.Conv2d(2, 2, 3))
    with pytest.raises(cl.ConvlensError, match="cannot run on a 5x5"):
        cl.activations(pooled, torch.rand(1, 3, 5, 5), ["2"])


def test_keras_model_gives_the_same_grids_as_its_torch_twin():
    keras = pytest.importorskip("keras")
    from test_keras import chollet_cats_vs_dogs

    kmodel = chollet_cats_vs_dogs()
    twin = sequential_twin(kmodel)
    x_first = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    names = ["conv2d", "max_pooling2d", "conv2d_1"]
    from_keras = cl.activations(cl.load_model(kmodel), x_first.permute(0, 2, 3, 1), names)
    from_torch = cl.activations(twin, x_first, names)
    for name in names:
        torch.testing.assert_close(from_keras[name], from_torch[name], atol=1e-5, rtol=0)
        keras_grid = np.asarray(activation_grid(from_keras[name][0], name)).astype(int)
        torch_grid = np.asarray(activation_grid(from_torch[name][0], name)).astype(int)
        assert np.abs(keras_grid - torch_grid).max() <= 3  # at most one colour step where rounding ties
    assert keras is not None


def sequential_twin(kmodel) -> cl.Model:
    """The Keras test network in PyTorch with the same layer names (ReLU fused into each conv, as Keras does)."""
    twin = nn.Module()
    twin.conv2d = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    twin.max_pooling2d = nn.MaxPool2d(2)
    twin.conv2d_1 = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU())
    twin.max_pooling2d_1 = nn.MaxPool2d(2)
    with torch.no_grad():
        for name in ("conv2d", "conv2d_1"):
            kernel, bias = (torch.as_tensor(np.asarray(w)) for w in kmodel.get_layer(name).get_weights())
            getattr(twin, name)[0].weight.copy_(kernel.permute(3, 2, 0, 1))
            getattr(twin, name)[0].bias.copy_(bias)
    twin.forward = lambda x: twin.max_pooling2d_1(twin.conv2d_1(twin.max_pooling2d(twin.conv2d(x))))
    model = cl.load_model(twin)
    model.transform = plain_transform((48, 48))  # Keras's default 'rescale': x / 255, like the Keras model
    model.input_size = (48, 48)
    return model
