"""Every registered metric, parametrised over ``METRICS``: a map that shows the evidence beats one that hides it.

The model is made by hand so the right answer is known: class 0's logit is ten times the
mean of channel 0 inside a square minus ten times its mean outside, and the image is bright in
the square, so the square is the evidence for class 0 and everything else counts against it. The map equal to the
square must score better than its complement on every metric, in the metric's own
direction (``higher_is_better``); a new metric is tested the moment it is registered.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convlens.metrics import METRICS, Curve

SIZE = 64


def _square() -> torch.Tensor:
    mask = torch.zeros(1, SIZE, SIZE, dtype=torch.bool)
    mask[:, 8:20, 10:22] = True
    return mask


class Evidence(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("inside", mask.float())

    def forward(self, x):
        channel = x[:, 0]
        inside = (channel * self.inside).flatten(1).sum(1) / self.inside.sum()
        outside = (channel * (1 - self.inside)).flatten(1).sum(1) / (1 - self.inside).sum()
        logit = 10 * (inside - outside)
        return torch.stack([logit, -logit], dim=1)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_the_evidence_map_beats_its_complement(name):
    mask = _square()
    model = Evidence(mask).eval()
    # bright evidence on a dimmer background: removing the square lowers the score, keeping only it raises it
    x = torch.where(mask, 1.0, 0.3).unsqueeze(1).repeat(1, 3, 1, 1)
    x = x + 0.05 * torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    ramp = torch.linspace(0.5, 1.0, SIZE)
    good = mask.float()
    bad = (~mask).float() * (ramp.view(-1, 1) + ramp.view(1, -1)) / 2  # at its highest in the far corner
    targets = torch.tensor([0])
    metric = METRICS[name]

    def value(maps):
        result = metric.compute(model, x, maps, targets, mask, 64)
        return float((result.auc if isinstance(result, Curve) else result)[0])

    better, worse = (value(good), value(bad)) if metric.higher_is_better else (value(bad), value(good))
    assert better > worse, f"{name}: the evidence map {value(good)}, its complement {value(bad)}"
