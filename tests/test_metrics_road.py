"""ROAD: the imputation by hand, and the whole protocol against pytorch-grad-cam's ROAD."""

import numpy as np
import pytest
import torch

from convlens.errors import ConvlensError
from convlens.metrics import linear_imputation, road, road_gap, road_score


def test_imputation_reproduces_a_linear_image():
    # The neighbour weights are symmetric, so a linear ramp is its own weighted neighbour mean.
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(9.0), indexing="ij")
    image = torch.stack([rows + 2 * cols, 3 - cols])
    removed = torch.zeros(8, 9, dtype=torch.bool)
    removed[2:6, 3:7] = True
    torch.testing.assert_close(linear_imputation(image, removed), image)


def test_imputation_at_a_corner_by_hand():
    image = torch.arange(12.0).view(1, 3, 4)
    removed = torch.zeros(3, 4, dtype=torch.bool)
    removed[0, 0] = True
    # neighbours inside the image: (0, 1) and (1, 0) weigh 1/6, (1, 1) weighs 1/12; total 5/12
    expected = (image[0, 0, 1] / 6 + image[0, 1, 0] / 6 + image[0, 1, 1] / 12) / (5 / 12)
    filled = linear_imputation(image, removed)
    assert filled[0, 0, 0].item() == pytest.approx(expected.item())
    assert torch.equal(filled[0].flatten()[1:], image[0].flatten()[1:])


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # NumPy 2 warns inside pytorch-grad-cam
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_road_agrees_with_pytorch_grad_cam(tiny, image_batch, order):
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                  RemoveLeastRelevantFirst,
                                                                  RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    tiny.eval()
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(7))
    targets = [2, 1]
    peer_targets = [ClassifierOutputSoftmaxTarget(t) for t in targets]
    remover = RemoveMostRelevantFirst if order == "morf" else RemoveLeastRelevantFirst
    percentiles = [90, 70, 50, 30]  # pytorch-grad-cam keeps p % of the pixels: we remove 1 - p / 100
    for p in percentiles:  # the two ways of counting the removed pixels agree at these percentiles
        ranked = maps.numpy() if order == "morf" else 1 - maps.numpy()
        kept = (ranked < np.percentile(ranked, p, axis=(1, 2), keepdims=True)).sum(axis=(1, 2))
        assert (kept == 256 - round((1 - p / 100) * 256)).all()
    peer = np.stack([
        PerturbationConfidenceMetric(remover(p, NoisyLinearImputer(noise=0.0)))(
            image_batch, maps.numpy(), peer_targets, tiny, return_diff=False)
        for p in percentiles], 1)
    ours = road(tiny, image_batch, maps, targets, order=order, noise=0.0,
                fractions=[1 - p / 100 for p in percentiles])
    np.testing.assert_allclose(ours.scores.numpy(), peer, atol=1e-5)


def test_noise_is_seeded_and_only_on_removed_pixels(tiny, image_batch):
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(8))
    first = road(tiny, image_batch, maps, fractions=[0.3, 0.6], seed=3)
    again = road(tiny, image_batch, maps, fractions=[0.3, 0.6], seed=3)
    other = road(tiny, image_batch, maps, fractions=[0.3, 0.6], seed=4)
    torch.testing.assert_close(first.scores, again.scores)
    assert not torch.equal(first.scores, other.scores)


def test_road_gap_is_half_the_lerf_morf_difference(tiny, image_batch):
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(9))
    options = dict(fractions=[0.2, 0.8], noise=0.0)
    expected = (road_score(tiny, image_batch, maps, order="lerf", **options)
                - road_score(tiny, image_batch, maps, order="morf", **options)) / 2
    torch.testing.assert_close(road_gap(tiny, image_batch, maps, **options), expected)


@pytest.mark.parametrize("options,match", [
    ({"order": "middle"}, "unknown ROAD order"),
    ({"fractions": [0.5, 1.0]}, "strictly between 0 and 1"),
    ({"fractions": []}, "strictly between 0 and 1"),
])
def test_bad_options_are_convlens_errors(tiny, image_batch, options, match):
    with pytest.raises(ConvlensError, match=match):
        road(tiny, image_batch, torch.rand(2, 16, 16), **options)
