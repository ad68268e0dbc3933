"""Score-CAM's exact savings: identical masks scored once, judged per whole channel."""

from __future__ import annotations

import torch

from convlens.heatmaps import explain

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
