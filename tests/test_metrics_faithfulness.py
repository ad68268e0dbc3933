"""Deletion, insertion, Average Drop and Increase in Confidence: hand cases and the peers' implementations."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import convlens as cl
from convlens.errors import ConvlensError
from convlens.metrics import (METRICS, average_drop, confidence_change, deletion, gaussian_blur,
                              increase_in_confidence, insertion)


class MeanLogit(nn.Module):
    """One logit ``a * mean(x) + b``: its sigmoid probability is computable by hand."""

    def __init__(self, a: float = 4.0, b: float = -1.0):
        super().__init__()
        self.a, self.b = a, b
        self.dummy = nn.Parameter(torch.zeros(1))  # a parameter, so the model has a device/dtype

    def forward(self, x):
        return (self.a * x.mean(dim=(1, 2, 3)) + self.b).unsqueeze(1) + self.dummy


class RegionLogits(nn.Module):
    """Two logits ``[0, sum of x over a fixed region]``: only the region matters."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("region", region.float())

    def forward(self, x):
        inside = (x * self.region).sum(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(inside), inside], 1)


def sigmoid(v):
    return 1 / (1 + math.exp(-v))


def test_constant_map_insertion_auc_by_hand():
    # 4x4 ones image on a zero baseline, 3 pixels per step: revealed fractions 0,3,6,...,15,16 of 16.
    x = torch.ones(1, 3, 4, 4)
    curve = insertion(MeanLogit(), x, torch.full((1, 4, 4), 0.5), targets=1, step=3, baseline="zeros")
    fractions = [min(k * 3, 16) / 16 for k in range(7)]
    scores = [sigmoid(4.0 * f - 1.0) for f in fractions]
    auc = sum((fractions[i + 1] - fractions[i]) * (scores[i] + scores[i + 1]) / 2 for i in range(6))
    torch.testing.assert_close(curve.fractions, torch.tensor(fractions))
    torch.testing.assert_close(curve.scores[0], torch.tensor(scores))
    assert float(curve.auc[0]) == pytest.approx(auc, abs=1e-6)


def test_deletion_of_the_right_region_by_hand():
    # The model only sees the top-left 2x2 block; a map pointing there deletes it in the first step.
    region = torch.zeros(1, 1, 4, 4)
    region[..., :2, :2] = 1
    model = RegionLogits(region)
    x = torch.full((1, 3, 4, 4), 0.5)
    good = region[:, 0] + 0.01 * torch.arange(16.0).view(1, 4, 4)  # region first, then raster order
    curve = deletion(model, x, good, targets=1, step=4, baseline="zeros")
    full = 1 / (1 + math.exp(-0.5 * 12))  # logit = 0.5 * 4 pixels * 3 channels
    assert curve.scores[0].tolist() == pytest.approx([full, 0.5, 0.5, 0.5, 0.5], abs=1e-6)
    bad = 1 - good  # the region last
    worse = deletion(model, x, bad, targets=1, step=4, baseline="zeros")
    assert worse.scores[0].tolist() == pytest.approx([full, full, full, full, 0.5], abs=1e-6)
    assert float(curve.auc) < float(worse.auc)


def test_batching_does_not_change_curves(tiny, image_batch):
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(3))
    one = deletion(tiny, image_batch, maps, step=7, batch_size=3)
    many = deletion(tiny, image_batch, maps, step=7, batch_size=1000)
    torch.testing.assert_close(one.scores, many.scores)
    ins_one = insertion(tiny, image_batch, maps, step=7, batch_size=5, baseline="mean")
    ins_many = insertion(tiny, image_batch, maps, step=7, batch_size=64, baseline="mean")
    torch.testing.assert_close(ins_one.scores, ins_many.scores)


def test_curves_start_and_end_at_the_image_and_the_baseline(tiny, image_batch):
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(4))
    tiny.eval()
    with torch.no_grad():
        image = tiny(image_batch).softmax(1)
        blurred = tiny(gaussian_blur(image_batch)).softmax(1)
    targets = image.argmax(1)
    rows = torch.arange(2)
    curve = insertion(tiny, image_batch, maps)
    torch.testing.assert_close(curve.scores[:, 0], blurred[rows, targets])
    torch.testing.assert_close(curve.scores[:, -1], image[rows, targets])
    removed = deletion(tiny, image_batch, maps, baseline="zeros")
    torch.testing.assert_close(removed.scores[:, 0], image[rows, targets])
    with torch.no_grad():
        zeros = tiny(torch.zeros_like(image_batch)).softmax(1)
    torch.testing.assert_close(removed.scores[:, -1], zeros[rows, targets])


def test_gaussian_blur_matches_a_dense_convolution():
    x = torch.rand(1, 2, 20, 20, generator=torch.Generator().manual_seed(0))
    offsets = torch.arange(11.0) - 5
    kernel1d = torch.exp(-offsets ** 2 / 50)
    kernel = torch.outer(kernel1d, kernel1d) / kernel1d.sum() ** 2
    padded = torch.nn.functional.pad(x, (5, 5, 5, 5), mode="replicate")
    expected = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 11, 11).repeat(2, 1, 1, 1), groups=2)
    torch.testing.assert_close(gaussian_blur(x), expected)


def test_confidence_change_agrees_with_pytorch_grad_cam(tiny, image_batch):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.metrics.cam_mult_image import (CamMultImageConfidenceChange, DropInConfidence,
                                                         IncreaseInConfidence)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    tiny.eval()  # pytorch-grad-cam calls the model as it is
    targets = [0, 2]
    peer_targets = [ClassifierOutputSoftmaxTarget(t) for t in targets]
    with GradCAM(model=tiny, target_layers=[tiny.conv2]) as cam:
        maps = cam(input_tensor=image_batch, targets=peer_targets)  # (N, H, W) in [0, 1)
    maps = maps / maps.max(axis=(1, 2), keepdims=True)  # exactly [0, 1], so both sides multiply the same map
    peer_change = CamMultImageConfidenceChange()(image_batch, maps, peer_targets, tiny)
    peer_drop = DropInConfidence()(image_batch, maps, peer_targets, tiny)
    peer_increase = IncreaseInConfidence()(image_batch, maps, peer_targets, tiny)

    full, masked = confidence_change(tiny, image_batch, torch.from_numpy(maps), targets)
    np.testing.assert_allclose((masked - full).numpy(), peer_change, atol=1e-6)
    # pytorch-grad-cam reports max(0, Y - O); the paper divides by Y and reports percent
    drop = average_drop(tiny, image_batch, torch.from_numpy(maps), targets)
    np.testing.assert_allclose((drop * full / 100).numpy(), peer_drop, atol=1e-6)
    increase = increase_in_confidence(tiny, image_batch, torch.from_numpy(maps), targets)
    np.testing.assert_allclose(increase.numpy() / 100, peer_increase)


def test_deletion_agrees_with_quantus_pixel_flipping():
    quantus = pytest.importorskip("quantus")
    # One input channel: Quantus ranks (channel, pixel) features and wants a step dividing H*W.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(5))  # distinct values: no ties
    targets = np.array([1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metric = quantus.PixelFlipping(features_in_step=8, perturb_baseline=0.0, normalise=False,
                                       disable_warnings=True)
        peer = metric(model=model, x_batch=x.numpy(), y_batch=targets, a_batch=maps.unsqueeze(1).numpy(),
                      device="cpu", softmax=True)
    ours = deletion(model, x, maps, targets.tolist(), step=8, baseline="zeros")
    # Quantus records the score after each step, without the unperturbed start
    np.testing.assert_allclose(ours.scores[:, 1:].numpy(), np.array(peer), atol=1e-5)


def test_metrics_never_change_the_callers_tensors(tiny, image_batch):
    x, maps = image_batch.clone(), torch.rand(2, 16, 16)
    saved_maps = maps.clone()
    for metric in ("deletion", "insertion", "drop", "increase"):
        METRICS[metric].compute(tiny, x, maps, None, None, 64)
    assert torch.equal(x, image_batch) and torch.equal(maps, saved_maps)


@pytest.mark.parametrize("call,match", [
    (lambda m, x: deletion(m, x, torch.rand(3, 16, 16)), "expected 2 heatmaps"),
    (lambda m, x: deletion(m, x, torch.full((2, 16, 16), float("nan"))), "NaN"),
    (lambda m, x: deletion(m, x, torch.rand(2, 16, 16), baseline="noise"), "unknown baseline"),
    (lambda m, x: deletion(m, x, torch.rand(2, 16, 16), step=0), "step must be"),
    (lambda m, x: insertion(m, x, torch.rand(2, 16, 16), targets=[0, 7]), "out of range"),
    (lambda m, x: insertion(m, x, torch.rand(2, 16, 16), targets=[0]), "1 targets given for 2 images"),
    (lambda m, x: average_drop(m, x, torch.rand(2, 16, 16), batch_size=0), "batch size"),
    (lambda m, x: deletion(m, x.numpy(), torch.rand(2, 16, 16)), "cannot read an image from an array"),
])
def test_bad_input_is_a_convlens_error(tiny, image_batch, call, match):
    with pytest.raises(ConvlensError, match=match):
        call(tiny, image_batch)


def test_maps_at_another_resolution_are_resized(tiny, image_batch):
    coarse = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(6))
    fine = torch.nn.functional.interpolate(coarse.unsqueeze(1), size=(16, 16), mode="bilinear",
                                           align_corners=False)[:, 0]
    torch.testing.assert_close(deletion(tiny, image_batch, coarse).scores, deletion(tiny, image_batch, fine).scores)


def test_benchmark_script_runs_quick(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "bench_metrics.py"
    spec = importlib.util.spec_from_file_location("bench_metrics", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--quick", "--batch", "8"])
    assert results["ours_s"] > 0 and results["yardstick_s"] > 0
    assert "ratio" in capsys.readouterr().out


def test_logit_score_of_a_single_logit_model():
    x = torch.ones(1, 3, 4, 4)
    curve = insertion(MeanLogit(), x, torch.rand(1, 4, 4), targets=0, step=16, baseline="zeros", score="logit")
    assert curve.scores[0].tolist() == pytest.approx([1.0, -3.0])  # class 0 is -(4 * mean - 1)


def test_targets_follow_the_one_target_contract(tiny, image_batch):
    """Class names and per-image lists read as in explain; a function or 'all' is a one-line refusal."""
    model = cl.load_model(tiny, labels=["cat", "dog", "fox"], input_size=16)
    maps = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(3))
    by_name = deletion(model, image_batch, maps, targets=["fox", "cat"])
    by_index = deletion(model, image_batch, maps, targets=[2, 0])
    assert torch.equal(by_name.scores, by_index.scores)
    with pytest.raises(ConvlensError, match="not a function"):
        deletion(model, image_batch, maps, targets=lambda output: output[:, 0])
    with pytest.raises(ConvlensError, match="target='all' is for heatmaps"):
        deletion(model, image_batch, maps, targets="all")
