"""``target="all"``: one map per class for each image, from one forward pass, equal to K separate calls."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convlens as cl
from convlens.heatmaps import METHODS, explain

ALL = [name for name, method in METHODS.items() if method.all_classes]


def test_the_methods_that_take_all_classes():
    assert set(ALL) == {"cam", "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "gradcam_elementwise"}


@pytest.mark.parametrize("method", ALL)
def test_every_class_equals_its_own_call(tiny, image_batch, method):
    layer = "relu2"
    together = explain(tiny, image_batch, method=method, layer=layer, target="all")
    assert together.maps.shape == (2, 3, 16, 16) and together.raw.shape[:2] == (2, 3)
    assert together.targets == [0, 1, 2] and len(together.flat) == 2 and len(together.flat[0]) == 3
    for k in range(3):
        alone = explain(tiny, image_batch, method=method, layer=layer, target=k)
        torch.testing.assert_close(together.raw[:, k], alone.raw, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(together.maps[:, k], alone.maps, atol=1e-6, rtol=1e-5)
        assert [row[k] for row in together.flat] == alone.flat


def test_one_forward_pass_for_all_classes(tiny, image_batch):
    passes = []
    handle = tiny.fc.register_forward_hook(lambda module, inputs, output: passes.append(1))
    try:
        explain(tiny, image_batch, method="gradcam", layer="relu2", target="all")
    finally:
        handle.remove()
    assert len(passes) == 1  # the layer is named: the one pass whose graph gives every class's gradient


def test_a_single_logit_model_has_two_classes():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 1)).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    together = explain(net, x, method="gradcam", layer="1", target="all")
    # class 0 is the negated logit: its raw Grad-CAM is exactly minus class 1's
    torch.testing.assert_close(together.raw[:, 0], -together.raw[:, 1])
    torch.testing.assert_close(together.raw[:, 1], explain(net, x, method="gradcam", layer="1", target=1).raw)


def test_methods_of_one_class_at_a_time_refuse(tiny, image_batch):
    with pytest.raises(cl.ConvlensError, match="explains one class at a time; target='all'.*gradcam"):
        explain(tiny, image_batch, method="scorecam", layer="relu2", target="all")
    with pytest.raises(cl.ConvlensError, match="pick a class"):
        explain(tiny, image_batch, method="gradcam", target="all").overlay([cl.sample_image()] * 2)
