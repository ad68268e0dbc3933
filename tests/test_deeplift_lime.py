"""DeepLIFT, DeepLIFT-SHAP, LIME and KernelSHAP: captum's values, hand-made answers, one-line refusals.

captum's ``DeepLift`` is compared on a copy of the model made ready for it
(:func:`captum_ready`), because it is wrong or refuses in three places convlens
is not: a ReLU called twice (torchvision's ResNet blocks) is refused; a
nonlinearity whose output goes straight into a max pooling reads the pooling's
plain gradient (both hooks sit on the same tensor, the nonlinearity's first);
and its max-pool rule scatters with ``max_unpool2d``, which keeps one share
where overlapping windows share a maximum. The copy gives each call its own
ReLU and puts a copy between nonlinearity and pooling, and the scatter is made
to add while captum runs; completeness (``sum A = S(x) - S(x')``) is then
checked on the unchanged model, where captum misses it.
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from captum._utils.models.linear_model import SkLearnLinearRegression
from captum.attr import DeepLift, DeepLiftShap, KernelShap, Lime
from torch import nn
from torchvision.models.resnet import BasicBlock

import convlens as cl
from convlens.heatmaps import explain
from convlens.heatmaps.base import Request
from convlens.heatmaps.deeplift import default_baselines

RELATIVE = 1e-4


class _Copy(nn.Module):
    def forward(self, tensor):
        return tensor.clone()


def _block_forward(self, x):  # BasicBlock's forward with its second ReLU a module of its own
    identity = x if self.downsample is None else self.downsample(x)
    out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
    return self.relu_out(out + identity)


def captum_ready(net: nn.Module) -> nn.Module:
    """A copy of ``net`` (same weights) on which captum's DeepLift computes the rescale rule as written."""
    net = copy.deepcopy(net)
    for module in list(net.modules()):
        if isinstance(module, BasicBlock):
            module.relu_out = nn.ReLU()
            module.forward = types.MethodType(_block_forward, module)
        for name, child in module.named_children():
            if isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.Sequential(_Copy(), child))
    return net


@contextlib.contextmanager
def _adding_unpool():
    def unpool(values, indices, kernel_size, stride, padding, output_size):
        flat = torch.zeros(output_size, dtype=values.dtype).flatten(2)
        return flat.scatter_add_(2, indices.flatten(2), values.flatten(2)).view(output_size)

    original = F.max_unpool2d
    F.max_unpool2d = unpool
    try:
        yield
    finally:
        F.max_unpool2d = original


def captum_deeplift(net: nn.Module, x: torch.Tensor, baselines: torch.Tensor, targets, shap: bool = False):
    """captum's DeepLift (or DeepLiftShap) attributions of ``net``, computed on :func:`captum_ready`'s copy."""
    with _adding_unpool(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method = (DeepLiftShap if shap else DeepLift)(captum_ready(net).eval())
        return method.attribute(x, baselines, target=targets).detach()


def captum_superpixels(method: str, forward, x: torch.Tensor, targets, segments: torch.Tensor, n_samples: int,
                       seed: int, baseline: float = 0.0) -> torch.Tensor:
    """captum's Lime (with a least-squares surrogate, convlens's) or KernelShap over ``segments``."""
    torch.manual_seed(seed)
    surrogate = SkLearnLinearRegression()
    explainer = Lime(forward, interpretable_model=surrogate) if method == "lime" else KernelShap(forward)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return explainer.attribute(x, target=targets, feature_mask=segments.view(1, 1, *segments.shape),
                                   baselines=baseline, n_samples=n_samples, perturbations_per_eval=32)


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def _x(count: int = 2, size: int = 64, seed: int = 11) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _blocks(size: int = 32, side: int = 8) -> torch.Tensor:
    rows = torch.arange(size) // side
    return rows.view(-1, 1) * (size // side) + rows.view(1, -1)


def _score_differences(net, x, reference, targets) -> torch.Tensor:
    with torch.no_grad():
        rows = torch.arange(len(x))
        return net(x)[rows, targets] - net(reference)[rows, targets]


# -- DeepLIFT ----------------------------------------------------------------------------------

def test_deeplift_equals_captum_and_is_complete_on_resnet18(resnet18):
    x, baseline = _x(), 0.1 * _x(seed=12)
    ours = explain(resnet18, x, method="deeplift", baseline=baseline)
    theirs = captum_deeplift(resnet18, x, baseline, ours.targets)
    assert _relative(ours.attributions, theirs) <= RELATIVE
    difference = _score_differences(resnet18, x, baseline, ours.targets)
    torch.testing.assert_close(ours.attributions.sum((1, 2, 3)), difference, rtol=RELATIVE, atol=1e-5)
    torch.testing.assert_close(ours.raw, ours.attributions.sum(1).abs())


def test_captum_misses_completeness_where_a_relu_feeds_a_max_pooling():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(3, 1), nn.Flatten(),
                        nn.Linear(4 * 4 * 4, 3)).eval()
    x, baseline = _x(2, 8), _x(2, 8, seed=12)
    ours = explain(net, x, method="deeplift", baseline=baseline)
    difference = _score_differences(net, x, baseline, ours.targets)
    torch.testing.assert_close(ours.attributions.sum((1, 2, 3)), difference, rtol=RELATIVE, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = DeepLift(net).attribute(x, baseline, target=ours.targets).detach()
    assert float((plain.sum((1, 2, 3)) - difference).abs().max()) > 1e-2  # captum as it is
    assert _relative(ours.attributions, captum_deeplift(net, x, baseline, ours.targets)) <= RELATIVE


def test_deeplift_equals_captum_on_in_place_relus(tiny):
    tiny.eval()  # captum runs the model as it is; convlens borrows it in eval mode
    x = _x(2, 16)
    ours = explain(tiny, x, method="deeplift", baseline=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = DeepLift(tiny).attribute(x, torch.full_like(x, 0.5), target=ours.targets).detach()
    assert _relative(ours.attributions, theirs) <= RELATIVE


def test_deeplift_of_linear_relu_linear_is_the_rescale_formula():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    x, baseline = _x(1, 2), _x(1, 2, seed=4)
    result = explain(net, x, method="deeplift", target=1, baseline=baseline[0])
    hidden, head = net[1], net[3]
    with torch.no_grad():
        z, z_ref = hidden(x.flatten(1))[0], hidden(baseline.flatten(1))[0]
        multiplier = (z.clamp(min=0) - z_ref.clamp(min=0)) / (z - z_ref)  # the rescale rule at each ReLU
        expected = (x[0] - baseline[0]) * (hidden.weight.T @ (multiplier * head.weight[1])).view(3, 2, 2)
    torch.testing.assert_close(result.attributions[0], expected)
    torch.testing.assert_close(result.attributions.sum(), _score_differences(net, x, baseline, [1])[0])


def test_deeplift_shap_equals_captum_with_the_same_baselines(resnet18):
    x = _x(2, 32)
    baselines = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32), 0.5 * _x(1, 32, seed=9)[0]])
    ours = explain(resnet18, x, method="deeplift_shap", baselines=baselines, batch_size=4)
    theirs = captum_deeplift(resnet18, x, baselines, ours.targets, shap=True)
    assert _relative(ours.attributions, theirs) <= RELATIVE


def test_deeplift_shap_default_is_deeplift_averaged_over_seeded_noise(tiny):
    x = _x(1, 16)
    ours = explain(tiny, x, method="deeplift_shap", n_baselines=3, seed=4)
    noise = default_baselines(Request(cl.load_model(tiny), x, [], None, None), 3, 4)
    assert float(noise.min()) >= float(x.min()) and float(noise.max()) <= float(x.max())
    each = [explain(tiny, x, method="deeplift", baseline=noise[b], target=ours.targets).attributions for b in range(3)]
    torch.testing.assert_close(ours.attributions, torch.stack(each).mean(0))
    other = explain(tiny, x, method="deeplift_shap", n_baselines=3, seed=5)
    assert not torch.allclose(other.attributions, ours.attributions)


# -- LIME and KernelSHAP -------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_superpixel_surrogates_equal_captum_with_the_same_seed(resnet18, method):
    x = _x(2, 32)  # captum's draws run on from one image to the next: so do ours
    ours = explain(resnet18, x, method=method, segments=_blocks(), n_samples=30, seed=3, baseline=0.1)
    theirs = captum_superpixels(method, resnet18, x, ours.targets, _blocks(), 30, 3, baseline=0.1)
    assert _relative(ours.attributions, theirs) <= RELATIVE
    if method == "kernel_shap":  # the end points' weight of 10^6 pins sum_k A_k to S(x) - S(baseline)
        per_superpixel = ours.raw[:, ::8, ::8].sum((1, 2))
        difference = _score_differences(resnet18, x, torch.full_like(x, 0.1), ours.targets)
        torch.testing.assert_close(per_superpixel, difference, rtol=1e-3, atol=1e-4)


class Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(2, 192, generator=torch.Generator().manual_seed(2)))

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("method", ["lime", "kernel_shap"])
def test_surrogates_of_a_linear_model_are_each_segment_contribution(method):
    # An additive score is linear in the coalition: enough coalitions recover each superpixel's share exactly.
    net, x = Linear(), _x(1, 8)
    segments = _blocks(8, 4)
    contribution = ((x[0] - 0.2) * net.fc.weight[1].detach().view(3, 8, 8)).sum(0)
    expected = torch.zeros(8, 8)
    for k in range(4):
        expected[segments == k] = contribution[segments == k].sum()
    result = explain(net, x, method=method, target=1, segments=segments, baseline=0.2, n_samples=40)
    torch.testing.assert_close(result.raw[0], expected, rtol=1e-4, atol=1e-5)


def test_kernel_shap_of_one_superpixel_is_the_score_difference():
    net, x = Linear(), _x(1, 8)
    result = explain(net, x, method="kernel_shap", target=0, segments=torch.zeros(8, 8, dtype=torch.long),
                     baseline=0.3, n_samples=5)
    expected = _score_differences(net, x, torch.full_like(x, 0.3), [0])[0]
    torch.testing.assert_close(result.raw[0], expected.expand(8, 8))


# -- bad input: one line -----------------------------------------------------------------------

@pytest.mark.parametrize("method, options, words", [
    ("deeplift", {"baseline": torch.zeros(3, 5, 5)}, "do not fit inputs of shape (3, 8, 8)"),
    ("deeplift", {"baseline": torch.zeros(3, 3, 8, 8)}, "one baseline or one per image (1), got 3"),
    ("deeplift_shap", {"baselines": torch.zeros(2, 3, 4, 4)}, "do not fit inputs of shape (3, 8, 8)"),
    ("deeplift_shap", {"n_baselines": 0}, "n_baselines must be at least 1"),
    ("deeplift", {"batch_size": 0}, "batch_size must be at least 1"),
    ("lime", {"n_samples": 0}, "n_samples must be at least 1"),
    ("kernel_shap", {"n_samples": -3}, "n_samples must be at least 1"),
    ("lime", {"kernel_width": 0}, "kernel_width must be positive"),
])
def test_bad_options_are_one_line(tiny, method, options, words):
    with pytest.raises(cl.ConvlensError) as err:
        explain(tiny, _x(1, 8), method=method, **options)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_deeplift_refuses_a_model_without_nonlinear_layers():
    with pytest.raises(cl.ConvlensError) as err:
        explain(Linear(), _x(1, 8), method="deeplift")
    assert "needs the model's nonlinearities as layers" in str(err.value) and "\n" not in str(err.value)


def test_cli_runs_the_new_methods(cli, picture, tmp_path, tiny):
    path = tmp_path / "tiny.pt"
    torch.save(tiny, path)
    code, _, err = cli("explain", path, picture, "--trust-code", "--methods",
                       "deeplift,deeplift_shap,lime,kernel_shap", "--out", tmp_path / "maps")
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "maps").glob("*.npy"))
    assert len(written) == 4 and any("kernel_shap" in name for name in written)
