"""explain_many: the batched explain the CLI and the explorer share gives the single-image API's maps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convlens as cl
from convlens.errors import ConvlensError


@pytest.fixture
def model(tiny):
    return cl.load_model(tiny, input_size=16)


@pytest.fixture
def pictures():
    """Five preprocessed images, one batch tensor (explain_many slices it)."""
    return torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))


METHODS = ["gradcam", "saliency", "scorecam"]


def test_its_maps_are_explains_maps_for_each_image_method_and_target(model, pictures):
    found = cl.explain_many(model, pictures, METHODS, targets=2, batch_size=2)
    assert found.methods == METHODS and found.skipped == {}
    assert [list(rows) for rows in found.batches] == [[0, 1], [2, 3], [4]]
    for method in METHODS:
        maps = found.maps(method)
        assert maps.shape == (5, 16, 16)
        for image in range(5):
            alone = cl.explain(model, pictures[image:image + 1], method=method, target=2)
            assert torch.allclose(maps[image], alone.maps[0], atol=1e-6), (method, image)
            result, row = found.at(method, image)
            assert result.targets[row] == 2 and result.target_names[row] == alone.target_names[0]
    assert found.layers == ["relu2"]
    assert found.predicted == [model.label(int(i)) for i in model(pictures).argmax(1)]


def test_the_batch_size_does_not_change_the_maps(model, pictures):
    one = cl.explain_many(model, pictures, METHODS, batch_size=1)
    four = cl.explain_many(model, pictures, METHODS, batch_size=4)
    assert len(one.batches) == 5 and len(four.batches) == 2
    for method in METHODS:
        assert torch.allclose(one.maps(method), four.maps(method), atol=1e-6), method
    assert one.predicted == four.predicted


def test_a_target_per_image_is_split_with_the_batches(model, pictures):
    wanted = [0, 1, 2, 1, 0]
    found = cl.explain_many(model, pictures, ["gradcam"], targets=wanted, batch_size=2)
    assert [found.at("gradcam", i)[0].targets[found.at("gradcam", i)[1]] for i in range(5)] == wanted


def test_a_method_that_does_not_apply_is_skipped_with_explains_reason():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    model = cl.load_model(net, input_size=8)
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    found = cl.explain_many(model, images, ["cam", "gradcam", "guided_backprop", "saliency"], batch_size=2,
                            skip_inapplicable=True)
    for name in ("cam", "guided_backprop"):  # no GAP + linear head; no ReLU
        with pytest.raises(ConvlensError) as err:
            cl.explain(model, images, method=name)
        assert found.skipped[name] == str(err.value)
    assert found.methods == ["gradcam", "saliency"] and set(found.results) == {"gradcam", "saliency"}
    with pytest.raises(ConvlensError) as err:  # failing fast, the same request is that error
        cl.explain_many(model, images, ["cam", "gradcam"])
    assert str(err.value) == found.skipped["cam"]


def test_progress_is_one_step_per_method_and_batch_cheap_kinds_first(model, pictures):
    seen = []
    cl.explain_many(model, pictures[:3], ["scorecam", "gradcam"], batch_size=2, progress=seen.append)
    begun = [str(step) for step in seen if not step.part]
    assert begun == ["[1/4] gradcam, batch 1/2", "[2/4] gradcam, batch 2/2", "[3/4] scorecam, batch 1/2",
                     "[4/4] scorecam, batch 2/2"]
    assert any(step.part and step.name.startswith("scorecam") for step in seen)  # Score-CAM counts its passes


def test_every_class_is_refused_beyond_max_classes_before_any_method_runs(model, pictures):
    seen = []
    with pytest.raises(ConvlensError, match="3 classes"):
        cl.explain_many(model, pictures, ["gradcam"], targets="all", max_classes=2, progress=seen.append)
    assert seen == []
    found = cl.explain_many(model, pictures, ["gradcam"], targets="all", max_classes=3)
    assert found.every_class and found.maps("gradcam").shape == (5, 3, 16, 16)
