"""Filter patterns and class models: they beat noise and real images, recover a hand-made edge detector,
regularisers do what they say, transforms are differentiable, and bad input is a one-line error."""

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.transforms.functional import pil_to_tensor

import convlens as cl
from convlens.inside import OPTIMIZERS, PARAMETERIZATIONS, REGULARIZERS, input_normalizer
from convlens.inside.transforms import jitter, pad, random_rotate, random_scale
from convlens.models.transforms import IMAGENET_MEAN, IMAGENET_STD, KerasTransform


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def edge_detectors() -> nn.Module:
    """Filter 0 fires on vertical edges (brightness changing along x), filter 1 on horizontal ones."""
    conv = nn.Conv2d(3, 2, 5, bias=False)
    ramp = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    with torch.no_grad():
        conv.weight[0] = ramp.view(1, 1, 5).expand(3, 5, 5) / 10
        conv.weight[1] = ramp.view(1, 5, 1).expand(3, 5, 5) / 10
    return nn.Sequential(conv, nn.ReLU())


def _gradient_energy(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gray = images.mean(1)
    along_x = (gray[..., :, 1:] - gray[..., :, :-1]).abs().mean((1, 2))
    along_y = (gray[..., 1:, :] - gray[..., :-1, :]).abs().mean((1, 2))
    return along_x, along_y


@pytest.mark.parametrize("optimizer", ["adam", "normalized"])
def test_edge_detector_orientation_is_recovered(optimizer):
    patterns = cl.filter_patterns(edge_detectors(), "1", size=24, steps=24, param="pixel", optimizer=optimizer,
                                  transforms="none", seed=0)
    along_x, along_y = _gradient_energy(patterns.images)
    assert patterns.filters == [0, 1]
    assert along_x[0] > 2 * along_y[0]  # vertical stripes for the vertical-edge filter
    assert along_y[1] > 2 * along_x[1]  # horizontal stripes for the horizontal-edge filter


def _test_set(size: int) -> torch.Tensor:
    photos = [cl.sample_image(name).resize((size, size)) for name in ("chelsea", "coffee", "astronaut", "rocket")]
    batch = torch.stack([pil_to_tensor(photo).float() / 255 for photo in photos])
    noise = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(3))
    return torch.cat([batch, noise, torch.full((1, 3, size, size), 0.5)])


@pytest.mark.parametrize("param, lr", [("fourier", 0.1), ("pixel", None)])
def test_pattern_beats_its_noise_and_every_test_image(param, lr):
    model = cl.load_model(small_cnn(seed=1))  # seed 0 has a filter whose best input is a blank image
    patterns = cl.filter_patterns(model, "5", size=32, steps=40, param=param, lr=lr, seed=0)
    to_input = input_normalizer(model)
    reference = cl.activations(model, to_input(_test_set(32)), ["5"])["5"].mean((2, 3))  # (images, filters)
    assert (patterns.activations > patterns.initial_activations).all()
    assert (patterns.activations > reference.max(0).values).all()
    # the reported activation is the filter's mean on the returned image, measured independently
    again = cl.activations(model, to_input(patterns.images), ["5"])["5"].mean((2, 3))
    torch.testing.assert_close(patterns.activations, again[torch.arange(6), torch.arange(6)], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_every_optimizer_raises_the_activation(optimizer):
    patterns = cl.filter_patterns(small_cnn(), "2", filters=[0, 3], size=16, steps=10, optimizer=optimizer)
    assert (patterns.activations > patterns.initial_activations).all()


@pytest.mark.parametrize("name", sorted(REGULARIZERS))
def test_each_regularizer_lowers_its_penalty_at_the_same_step_count(name):
    settings = dict(filters=[0, 1, 2], size=24, steps=20, param="pixel", seed=1)
    plain = cl.filter_patterns(small_cnn(), "2", **settings)
    regular = cl.filter_patterns(small_cnn(), "2", regularizers={name: 5.0}, **settings)
    penalty = REGULARIZERS[name]
    assert penalty(regular.images).mean() < 0.8 * penalty(plain.images).mean()


def test_seed_reproduces_and_changes_the_result():
    first = cl.filter_patterns(small_cnn(), "2", filters=[1], size=16, steps=5, seed=4)
    again = cl.filter_patterns(small_cnn(), "2", filters=[1], size=16, steps=5, seed=4)
    other = cl.filter_patterns(small_cnn(), "2", filters=[1], size=16, steps=5, seed=5)
    assert torch.equal(first.images, again.images)
    assert not torch.equal(first.images, other.images)


def test_starting_images_are_gray_with_small_noise():
    for factory in PARAMETERIZATIONS.values():
        image = factory(2, 32, generator=torch.Generator().manual_seed(0)).render()
        assert image.shape == (2, 3, 32, 32)
        assert abs(image.mean().item() - 0.5) < 0.02 and 0 < image.std().item() < 0.05


@pytest.mark.parametrize("transform", [pad(3), jitter(4), random_scale((0.8, 1.2)), random_rotate(15.0)],
                         ids=["pad", "jitter", "scale", "rotate"])
def test_transforms_are_differentiable(transform):
    images = torch.rand(1, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    fixed = lambda x: transform(x, torch.Generator().manual_seed(7))  # the same random draw on every call
    assert torch.autograd.gradcheck(fixed, (images,), eps=1e-6, atol=1e-5)


def test_later_layers_never_run():
    net = small_cnn()
    calls = []
    handle = net[5].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        cl.filter_patterns(net, "2", filters=[0], size=16, steps=3)
    finally:
        handle.remove()
    assert calls == []


def test_class_model_skips_a_final_softmax():
    bare = small_cnn()
    with_softmax = nn.Sequential(*small_cnn(), nn.Softmax(dim=1))
    settings = dict(size=24, steps=10, seed=0, transforms="none")
    from_logits = cl.class_model(bare, [0, 2], **settings)
    from_softmax = cl.class_model(with_softmax, [0, 2], **settings)
    torch.testing.assert_close(from_softmax.images, from_logits.images)
    torch.testing.assert_close(from_softmax.logits, from_logits.logits)
    assert (from_logits.logits > from_logits.initial_logits).all()


def test_normalizer_follows_the_model_preprocessing():
    rgb = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torchvision_model = cl.load_model("resnet18", weights="none")
    expected = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(input_normalizer(torchvision_model)(rgb), expected, atol=1e-5, rtol=1e-5)
    # Keras 'caffe': BGR order, ImageNet means subtracted, 0-255 scale; compared with the real transform
    keras_like = cl.load_model(nn.Conv2d(3, 1, 1))
    keras_like.transform = KerasTransform((8, 8), "caffe")
    pixels = (rgb[0] * 255).round() / 255
    picture = cl.load_image((pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    torch.testing.assert_close(input_normalizer(keras_like)(pixels[None])[0], keras_like.transform(picture),
                               atol=1e-3, rtol=1e-5)


def test_keras_patterns_equal_the_torch_twin():
    pytest.importorskip("keras")
    from test_activations import sequential_twin
    from test_keras import chollet_cats_vs_dogs

    kmodel = chollet_cats_vs_dogs()
    settings = dict(filters=[0, 5], size=48, steps=6, seed=2)
    from_keras = cl.filter_patterns(cl.load_model(kmodel), "conv2d_1", **settings)
    twin = sequential_twin(kmodel)
    twin.info["fixed_input_size"] = True  # as a Keras model is: the transforms end cropped back to 48 px
    from_torch = cl.filter_patterns(twin, "conv2d_1", **settings)
    torch.testing.assert_close(from_keras.images, from_torch.images, atol=1e-4, rtol=0)
    torch.testing.assert_close(from_keras.activations, from_torch.activations, atol=1e-4, rtol=1e-4)


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)

    def forward(self, x):
        return self.conv(x.round().detach())


@pytest.mark.parametrize("call, message", [
    (lambda: cl.filter_patterns(small_cnn(), "conv9"), "unknown layer"),
    (lambda: cl.filter_patterns(small_cnn(), "2", filters=[8]), "filter index 8 is out of range.*8 filters"),
    (lambda: cl.filter_patterns(Detached(), "conv", size=8, steps=2), "no gradient reaches the input"),
    (lambda: cl.filter_patterns(small_cnn(), "5", size=8, steps=2), None),
    (lambda: cl.filter_patterns(nn.Sequential(nn.Conv2d(3, 2, 9)), "0", size=8), "cannot run on a 8x8"),
    (lambda: cl.filter_patterns(small_cnn(), "2", size=16, optimizer="sgd"), "unknown optimizer 'sgd'"),
    (lambda: cl.class_model(small_cnn(), 3, size=16), "class index 3 is out of range"),
])
def test_bad_input_is_one_clear_error(call, message):
    if message is None:  # an 8x8 image is big enough for this net: no error
        call()
        return
    with pytest.raises(cl.ConvlensError, match=message) as caught:
        call()
    assert "\n" not in str(caught.value)


def test_benchmark_script_runs_quick(monkeypatch, capsys):
    import runpy
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "bench_filters.py"
    monkeypatch.setattr("sys.argv", [str(script), "--quick"])
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "convlens" in out and "mean activation" in out
