"""Pointing game, energy-based pointing game and IoU: hand cases and Quantus."""

import math
import warnings

import numpy as np
import pytest
import torch

from convlens.errors import ConvlensError
from convlens.metrics import (METRICS, boxes_to_masks, energy_pointing_game, iou, pointing_game, region_boxes,
                              scaled_tolerance)


@pytest.fixture
def square():
    mask = torch.zeros(1, 10, 10)
    mask[0, 4:8, 4:8] = 1
    return mask


def test_a_map_equal_to_the_mask_scores_perfectly(square):
    assert pointing_game(square, square, tolerance=0).item() == 1.0
    assert energy_pointing_game(square, square).item() == 1.0
    assert iou(square, square).item() == 1.0


def test_pointing_tolerance_is_euclidean_distance_to_the_object(square):
    heatmap = torch.zeros(1, 10, 10)
    heatmap[0, 0, 0] = 1.0  # the peak is sqrt(4^2 + 4^2) = 5.66 px from the square's corner (4, 4)
    assert pointing_game(heatmap, square, tolerance=0).item() == 0.0
    assert pointing_game(heatmap, square, tolerance=5).item() == 0.0
    assert pointing_game(heatmap, square, tolerance=5.7).item() == 1.0
    assert pointing_game(heatmap, square).item() == 1.0  # the paper's 15 px reach the square


def test_ties_and_flat_maps(square):
    tied = torch.zeros(1, 10, 10)
    tied[0, 0, 0] = tied[0, 5, 5] = 1.0  # one of two equal peaks on the object: a hit (Quantus's rule)
    assert pointing_game(tied, square, tolerance=0).item() == 1.0
    flat = torch.full((1, 10, 10), 0.3)
    assert pointing_game(flat, square, tolerance=0).item() == 0.0  # points nowhere
    assert energy_pointing_game(flat, square).item() == 0.0
    assert iou(flat, square).item() == 0.0


def test_energy_and_iou_by_hand(square):
    heatmap = torch.zeros(1, 10, 10)
    heatmap[0, 4:8, 4:8] = 0.5      # 16 pixels inside at 0.5 (normalised: 0.5)
    heatmap[0, 0, :] = 1.0          # 10 pixels outside at 1.0 (normalised: 1.0)
    assert energy_pointing_game(heatmap, square).item() == pytest.approx(8 / 18)
    # threshold 0.5: 16 inside + 10 outside are on; intersection 16, union 26
    assert iou(heatmap, square, threshold=0.5).item() == pytest.approx(16 / 26)
    assert iou(heatmap, square, threshold=0.75).item() == pytest.approx(0.0)


def test_empty_mask_gives_nan(square):
    empty = torch.zeros(1, 10, 10)
    for metric in (pointing_game, energy_pointing_game, iou):
        assert math.isnan(metric(square, empty).item())


def test_boxes_to_masks():
    masks = boxes_to_masks([[1, 2, 4, 3], [0, 0, 2, 2]], (4, 5))
    expected = torch.zeros(2, 4, 5, dtype=torch.bool)
    expected[0, 2, 1:4] = True
    expected[1, :2, :2] = True
    assert torch.equal(masks, expected)


def test_region_boxes_and_the_box_pointing_game():
    # a ring (hole at the centre) and a separate 2x2 blob with one pixel touching it diagonally,
    # which 8-connectivity keeps in the blob's region
    mask = torch.zeros(1, 12, 12)
    mask[0, 1:8, 1:8] = 1
    mask[0, 3:6, 3:6] = 0
    mask[0, 9:11, 9:11] = 1
    mask[0, 11, 11] = 1
    expected = torch.zeros(1, 12, 12, dtype=torch.bool)
    expected[0, 1:8, 1:8] = True
    expected[0, 9:12, 9:12] = True
    assert torch.equal(region_boxes(mask), expected)
    assert torch.equal(region_boxes(mask[0]), expected) and torch.equal(region_boxes(mask[None]), expected)
    peak_in_hole = torch.zeros(1, 12, 12)
    peak_in_hole[0, 4, 4] = 1.0
    assert pointing_game(peak_in_hole, mask, tolerance=0).tolist() == [0.0]  # outside the ring's pixels
    assert METRICS["pointing_box"].compute(None, None, peak_in_hole, None, mask, 8).tolist() == [1.0]
    between = torch.zeros(1, 12, 12)
    between[0, 10, 2] = 1.0  # inside neither box
    assert METRICS["pointing_box"].compute(None, None, between, None, mask, 8).tolist() == [0.0]


def test_scaled_tolerance_is_15_px_per_224():
    mask = torch.zeros(1, 64, 64)
    mask[0, 20:30, 20:30] = 1
    assert scaled_tolerance(mask) == pytest.approx(15 * 64 / 224)  # 4.29 px
    assert scaled_tolerance(torch.zeros(2, 448, 300)) == pytest.approx(15 * 300 / 224)
    for gap, hit in [(4, 1.0), (5, 0.0)]:  # peak ``gap`` px right of the square's last column
        peak = torch.zeros(1, 64, 64)
        peak[0, 25, 29 + gap] = 1.0
        assert METRICS["pointing_scaled"].compute(None, None, peak, None, mask, 8).tolist() == [hit]


def _random_case(seed):
    g = torch.Generator().manual_seed(seed)
    maps = torch.rand(6, 12, 12, generator=g) ** 3
    masks = torch.zeros(6, 12, 12)
    for i in range(6):
        r, c = torch.randint(0, 8, (2,), generator=g).tolist()
        masks[i, r:r + 4, c:c + 4] = 1
    return maps, masks


def _quantus(metric_name, maps, masks):
    """A Quantus localisation metric on our maps and masks (no normalisation: both sides see the same map)."""
    quantus = pytest.importorskip("quantus")
    n, height, width = maps.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = getattr(quantus, metric_name)(normalise=False, disable_warnings=True)
        return np.array(metric(model=None, x_batch=np.zeros((n, 1, height, width), np.float32),
                               y_batch=np.zeros(n, dtype=int), a_batch=maps.unsqueeze(1).numpy(),
                               s_batch=masks.unsqueeze(1).numpy(), device="cpu"), dtype=np.float64)


def test_pointing_game_agrees_with_quantus():
    maps, masks = _random_case(0)
    maps[1] = masks[1] * 0.9 + 0.05  # a hit by construction, next to the random cases
    ours = pointing_game(maps, masks, tolerance=0)
    assert ours.tolist() == _quantus("PointingGame", maps, masks).tolist()
    assert 0 < ours.sum() < 6  # the random case has hits and misses


def test_energy_pointing_game_agrees_with_quantus_relevance_mass():
    maps, masks = _random_case(1)
    maps = maps - maps.amin(dim=(1, 2), keepdim=True)  # min 0: min-max scaling is then one factor per map
    peer = _quantus("RelevanceMassAccuracy", maps, masks)
    np.testing.assert_allclose(energy_pointing_game(maps, masks).numpy(), peer, rtol=1e-5)


# The bottom-left quadrant as an 8x8 mask and as a 2x2 one: at the maps' 4x4 both are rows 2-3, columns 0-1.
_QUADRANT_8 = torch.zeros(1, 8, 8)
_QUADRANT_8[0, 4:, :4] = 1
_QUADRANT_2 = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])


@pytest.mark.parametrize("mask", [_QUADRANT_8, _QUADRANT_2], ids=["larger", "smaller"])
def test_masks_of_another_size_are_resized_to_the_maps(mask):
    def peak_at(row, col):
        heatmap = torch.zeros(1, 4, 4)
        heatmap[0, row, col] = 1.0
        return heatmap

    assert pointing_game(peak_at(2, 1), mask, tolerance=0).item() == 1.0   # on the quadrant
    assert pointing_game(peak_at(1, 1), mask, tolerance=0).item() == 0.0   # one row above it
    assert pointing_game(peak_at(1, 1), mask, tolerance=1).item() == 1.0   # 1 px from (2, 1)
    assert pointing_game(peak_at(1, 2), mask, tolerance=1).item() == 0.0   # sqrt(2) px from (2, 1)
    assert pointing_game(peak_at(1, 2), mask, tolerance=1.5).item() == 1.0
    two_peaks = peak_at(3, 0) + peak_at(0, 3)  # one peak inside, one outside
    assert energy_pointing_game(two_peaks, mask).item() == pytest.approx(1 / 2)
    assert iou(two_peaks, mask).item() == pytest.approx(1 / 5)  # 1 shared pixel; 2 on + 4 object - 1
    # region_boxes of a full-size mask, resized like the mask itself
    assert pointing_game(peak_at(2, 1), region_boxes(mask), tolerance=0).item() == 1.0


def test_resized_masks_sample_pixel_centres_like_pil_nearest():
    """The same rule as `convlens evaluate`, which resizes masks with PIL's NEAREST."""
    from PIL import Image

    from convlens.metrics.localization import as_masks

    mask = torch.rand(1, 37, 50, generator=torch.Generator().manual_seed(0)) > 0.5
    maps = torch.zeros(1, 17, 23)
    by_pil = Image.fromarray(mask[0].numpy().astype(np.uint8) * 255).resize((23, 17), Image.NEAREST)
    assert torch.equal(as_masks(mask, maps)[0], torch.from_numpy(np.asarray(by_pil) > 127))


def test_registry_entries_ignore_the_model(square):
    for name, metric in METRICS.items():
        if metric.needs_masks:
            assert metric.compute(None, None, square, None, square, 8).tolist() == [1.0]


@pytest.mark.parametrize("call,match", [
    (lambda m: pointing_game(m, torch.zeros(2, 10, 10)), "expected 1 mask"),
    (lambda m: pointing_game(m, m, tolerance=-1), "tolerance"),
    (lambda m: iou(m, m, threshold=2), "threshold"),
    (lambda m: energy_pointing_game(m, m.numpy()), "torch.Tensor"),
])
def test_bad_input_is_a_convlens_error(square, call, match):
    with pytest.raises(ConvlensError, match=match):
        call(square)
