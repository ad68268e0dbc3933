"""Captum's attribution family in convlens: attributions equal captum's value by value, and hand-made answers.

The maps are compared with captum's for every model in ``test_heatmaps_reference``;
here the per-channel attributions themselves, at <= 1e-4 relative to captum's
largest magnitude, and on linear models where the right answer is a formula.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import (Deconvolution, FeatureAblation, GradientShap, InputXGradient, NoiseTunnel, Occlusion, Saliency,
                         ShapleyValueSampling)
from torch import nn

import convlens as cl
from convlens.heatmaps import explain

RELATIVE = 1e-4


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def _x(count: int = 2, size: int = 32) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(11))


def _tunnel(nt_type):
    def computation(net, x, targets):
        torch.manual_seed(5)
        return NoiseTunnel(Saliency(net)).attribute(x, target=targets, abs=False, nt_type=nt_type, nt_samples=4,
                                                    stdevs=0.2)

    return computation


def _gradient_shap(net, x, targets):
    torch.manual_seed(5)
    np.random.seed(5)
    return GradientShap(net).attribute(x, baselines=_baselines(x), target=targets, n_samples=5)


def _baselines(x):
    return torch.stack([torch.zeros_like(x[0]), torch.full_like(x[0], 0.5), -torch.ones_like(x[0])])


def _blocks(size: int = 32, side: int = 8) -> torch.Tensor:
    """Superpixels for the reference tests: a grid of ``side`` x ``side`` squares, ids 0..K-1."""
    rows = torch.arange(size) // side
    return rows.view(-1, 1) * (size // side) + rows.view(1, -1)


def _shapley(net, x, targets):
    torch.manual_seed(5)
    return ShapleyValueSampling(net).attribute(x, target=targets, feature_mask=_blocks().view(1, 1, 32, 32),
                                               baselines=0.1, n_samples=3, perturbations_per_eval=16)


#: method -> (captum's attributions, convlens options)
CAPTUM = {
    "input_x_gradient": (lambda net, x, t: InputXGradient(net).attribute(x, target=t), {}),
    "deconvolution": (lambda net, x, t: Deconvolution(net).attribute(x, target=t), {}),
    "smoothgrad_sq": (_tunnel("smoothgrad_sq"), {"n_samples": 4, "stdev": 0.2, "seed": 5}),
    "vargrad": (_tunnel("vargrad"), {"n_samples": 4, "stdev": 0.2, "seed": 5}),
    "gradient_shap": (_gradient_shap, {"n_samples": 5, "seed": 5}),
    "occlusion": (lambda net, x, t: Occlusion(net).attribute(x, target=t, sliding_window_shapes=(3, 6, 6),
                                                             strides=(3, 2, 2), baselines=0.25),
                  {"window": 6, "stride": 2, "baseline": 0.25}),
    "feature_ablation": (lambda net, x, t: FeatureAblation(net).attribute(
        x, target=t, feature_mask=_blocks().view(1, 1, 32, 32), baselines=-0.5),
        {"segments": _blocks(), "baseline": -0.5}),
    "shapley_sampling": (_shapley, {"segments": _blocks(), "baseline": 0.1, "n_samples": 3, "seed": 5}),
}


@pytest.mark.parametrize("method", CAPTUM)
def test_attributions_equal_captum_value_by_value(resnet18, method):
    x = _x(1) if method == "shapley_sampling" else _x()  # captum shares one order across a batch
    options = dict(CAPTUM[method][1])
    if method == "gradient_shap":
        options["baselines"] = _baselines(x)
    ours = explain(resnet18, x, method=method, **options)
    theirs = CAPTUM[method][0](resnet18, x, ours.targets).detach()
    assert ours.attributions.shape == theirs.shape
    relative = float((ours.attributions - theirs).abs().max() / theirs.abs().max())
    assert relative <= RELATIVE, f"{method}: {relative}"


# -- hand-made models: the answer is a formula -------------------------------------------

class Linear(nn.Module):
    """``score_k = w_k . x + b_k`` on 3x8x8 inputs: every gradient is ``w_k``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(2, 192, generator=torch.Generator().manual_seed(2)))
            self.fc.bias.copy_(torch.tensor([0.5, -0.5]))

    def forward(self, x):
        return self.fc(x.flatten(1))


def _w(net: Linear, k: int) -> torch.Tensor:
    return net.fc.weight[k].detach().view(3, 8, 8)


def test_input_x_gradient_of_a_linear_model_is_w_times_x():
    net, x = Linear(), _x(1, 8)
    result = explain(net, x, method="input_x_gradient", target=1)
    torch.testing.assert_close(result.attributions[0], x[0] * _w(net, 1))


def test_gradient_shap_of_a_linear_model_is_w_times_x_minus_baseline():
    # For a linear score the path point does not matter: each sample gives (x - b) * w exactly.
    net, x = Linear(), _x(1, 8)
    baseline = torch.full((3, 8, 8), 0.3)
    result = explain(net, x, method="gradient_shap", target=0, baselines=baseline, n_samples=3)
    torch.testing.assert_close(result.attributions[0], (x[0] - baseline) * _w(net, 0))


def test_occlusion_of_a_linear_model_is_the_patch_contribution():
    net, x = Linear(), _x(1, 8)
    result = explain(net, x, method="occlusion", target=0, window=4, stride=4, baseline=0.0)
    contribution = (x[0] * _w(net, 0)).sum(0)  # (8, 8): what each pixel adds to the score
    expected = torch.zeros(8, 8)
    for top in (0, 4):
        for left in (0, 4):
            expected[top:top + 4, left:left + 4] = contribution[top:top + 4, left:left + 4].sum()
    torch.testing.assert_close(result.attributions[0], expected.expand(3, -1, -1))
    torch.testing.assert_close(result.raw[0], expected)


def test_noise_tunnel_moments_of_a_linear_model():
    net, x = Linear(), _x(1, 8)
    squared = explain(net, x, method="smoothgrad_sq", target=0, n_samples=3, stdev=1.0)
    torch.testing.assert_close(squared.attributions[0], _w(net, 0) ** 2)
    variance = explain(net, x, method="vargrad", target=0, n_samples=3, stdev=1.0)
    assert float(variance.attributions.abs().max()) <= 1e-5 * float(_w(net, 0).square().max())  # a constant gradient


def test_deconvolution_ignores_the_forward_sign_of_each_relu():
    torch.manual_seed(4)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    with torch.no_grad():
        net[1].bias.fill_(-100.0)  # every ReLU is off on this input
    x = _x(1, 8)
    result = explain(net, x, method="deconvolution", target=1)
    hidden, head = net[1].weight.detach(), net[3].weight.detach()
    expected = (head[1].clamp(min=0) @ hidden).view(3, 8, 8)  # R = W1^T ReLU(W2^T e_1), whatever x is
    torch.testing.assert_close(result.attributions[0], expected)
    guided = explain(net, x, method="guided_backprop", target=1)
    assert float(expected.abs().max()) > 0 and not guided.attributions.any()  # guided backprop masks by the sign


def test_superpixel_methods_of_a_linear_model_are_each_segment_contribution():
    # Additive score: leaving one superpixel out and every Shapley order give the same value.
    net, x = Linear(), _x(1, 8)
    segments = _blocks(8, 4)
    contribution = ((x[0] - 0.2) * _w(net, 1)).sum(0)
    expected = torch.zeros(8, 8)
    for k in range(4):
        expected[segments == k] = contribution[segments == k].sum()
    for method, options in [("feature_ablation", {}), ("shapley_sampling", {"n_samples": 2})]:
        result = explain(net, x, method=method, target=1, segments=segments, baseline=0.2, **options)
        torch.testing.assert_close(result.raw[0], expected, msg=method)


def test_slic_superpixels_cover_the_image_and_follow_its_regions():
    # Two flat halves: every SLIC superpixel lies in one half, so ablation gives each half its own value.
    x = torch.zeros(1, 3, 16, 16)
    x[..., 8:] = 1.0
    net = Linear.__new__(Linear)
    nn.Module.__init__(net)
    net.fc = nn.Linear(3 * 16 * 16, 2)
    from convlens.heatmaps.base import Request
    from convlens.heatmaps.superpixels import superpixels
    ids = superpixels(Request(cl.load_model(net), x, [], None, None), n_segments=4)
    assert ids.shape == (1, 16, 16) and int(ids.min()) == 0
    assert all(ids[0][:, :8][ids[0][:, :8] == k].numel() == 0 or ids[0][:, 8:][ids[0][:, 8:] == k].numel() == 0
               for k in ids.unique().tolist())


# -- bad input: one line --------------------------------------------------------------------

@pytest.mark.parametrize("method, options, words", [
    ("gradient_shap", {"baselines": torch.zeros(3, 5, 5)}, "do not fit inputs of shape (3, 8, 8)"),
    ("gradient_shap", {"n_samples": 0}, "n_samples must be at least 1"),
    ("smoothgrad_sq", {"n_samples": 0}, "n_samples must be at least 1"),
    ("vargrad", {"of": "lime"}, "smooths one of saliency, input_x_gradient"),
    ("occlusion", {"window": 9}, "occlusion window 9 is larger than the 8x8 input"),
    ("occlusion", {"stride": 0}, "window and stride must be at least 1"),
    ("feature_ablation", {"segments": torch.zeros(4, 4, dtype=torch.long)}, "segments must be an integer map"),
    ("shapley_sampling", {"n_samples": 0}, "n_samples must be at least 1"),
    ("feature_ablation", {"n_segments": 0}, "n_segments must be at least 1"),
])
def test_bad_options_are_one_line(method, options, words):
    with pytest.raises(cl.ConvlensError) as err:
        explain(Linear(), _x(1, 8), method=method, **options)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_cli_runs_the_new_methods(cli, picture, tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save(tiny, path)
    code, _, err = cli("explain", path, picture, "--trust-code", "--methods",
                       "input_x_gradient,deconvolution,occlusion", "--out", tmp_path / "maps")
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "maps").glob("*.npy"))
    assert len(written) == 3 and any("occlusion" in name for name in written)
