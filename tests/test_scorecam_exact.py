"""Score-CAM's exact savings: identical masks scored once (per whole channel), batches sized by a rule per device."""

from __future__ import annotations

import torch

from convlens.heatmaps import explain
from convlens.heatmaps.perturbation import scorecam_batch_size

from conftest import TinyNet
from test_heatmaps_hand import Features


def test_channels_equal_row_by_row_after_min_max_are_still_two_masks():
    """Row by row, both channels min-max to [[0, 1], [0, 1]]; as whole channels they differ, so both are scored."""
    first = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    second = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    x = torch.stack([first, second]).unsqueeze(0)
    torch.manual_seed(0)
    model = Features(channels=2).eval()
    res = explain(model, x, method="scorecam", layer="feat", target=1)
    masks = [first, second / 2]  # each channel min-maxed as a whole
    with torch.no_grad():
        scores = torch.stack([model(x * mask)[0, 1] for mask in masks])
    weights = torch.softmax(scores, 0)
    torch.testing.assert_close(res.raw[0], weights[0] * first + weights[1] * second)


def test_cpu_rule_gives_16_images_of_224_pixels_and_more_of_smaller_ones():
    assert scorecam_batch_size(torch.zeros(1, 3, 224, 224)) == 16
    assert scorecam_batch_size(torch.zeros(2, 3, 112, 112)) == 64
    assert scorecam_batch_size(torch.zeros(1, 3, 32, 32)) == 784
    assert scorecam_batch_size(torch.zeros(1, 3, 2000, 2000)) == 1  # never zero


def test_accelerator_rule_takes_a_bigger_batch():
    assert scorecam_batch_size(torch.empty(1, 3, 224, 224, device="meta")) == 64


def test_default_scorecam_scores_its_masks_in_rule_sized_batches():
    torch.manual_seed(0)
    net = TinyNet(width=16).eval()  # conv2: 32 channels, all distinct before the ReLU
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    batches = []
    handle = net.fc.register_forward_hook(lambda module, inputs, output: batches.append(output.shape[0]))
    try:
        default = explain(net, x, method="scorecam", layer="conv2", target=0)
    finally:
        handle.remove()
    assert batches == [1, 16, 16]  # the clean pass, then 32 masked images 16 at a time (was 64 at a time)
    whole = explain(net, x, method="scorecam", layer="conv2", target=0, batch_size=64)
    torch.testing.assert_close(default.raw, whole.raw, atol=1e-6, rtol=1e-5)
