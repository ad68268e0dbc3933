"""LRP: equal to zennit's composites on torchvision VGG16 and ResNet18, conservative, and right by hand."""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

import convlens as cl
from convlens.heatmaps import explain
from convlens.heatmaps.base import Request
from convlens.heatmaps.lrp import Composite, relevance
from convlens.heatmaps.lrp_rules import Epsilon
from convlens.models.loading import from_module
from convlens.models.transforms import IMAGENET_MEAN, IMAGENET_STD

from conftest import TinyNet

zennit_composites = pytest.importorskip("zennit.composites")
zennit_torchvision = pytest.importorskip("zennit.torchvision")

LOW, HIGH = -2.0, 2.5  # the z^B box of the input, given to both sides
ZENNIT = {  # convlens method -> (zennit composite, its extra arguments, convlens options)
    "lrp": ("EpsilonPlusFlat", {}, {}),
    "lrp_epsilon_gamma_box": ("EpsilonGammaBox", {"low": torch.full((1, 3, 1, 1), LOW),
                                                  "high": torch.full((1, 3, 1, 1), HIGH)},
                              {"low": [LOW] * 3, "high": [HIGH] * 3}),
    "lrp_alpha_beta": ("EpsilonAlpha2Beta1Flat", {}, {}),
}


def _jitter_norms(net: nn.Module) -> nn.Module:
    """Trained-looking BatchNorm statistics, so that folding them into the convolutions matters."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for norm in net.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight.uniform_(0.5, 1.5, generator=generator)
                norm.bias.uniform_(-0.2, 0.2, generator=generator)
                norm.running_mean.uniform_(-0.2, 0.2, generator=generator)
                norm.running_var.uniform_(0.5, 1.5, generator=generator)
    return net.eval()


@pytest.fixture(scope="module")
def torchvision_nets():
    torch.manual_seed(0)
    return {"vgg16": (torchvision.models.vgg16(num_classes=10).eval(), zennit_torchvision.VGGCanonizer),
            "resnet18": (_jitter_norms(torchvision.models.resnet18(num_classes=10)), zennit_torchvision.ResNetCanonizer)}


def _zennit(net: nn.Module, canonizer, composite: str, arguments: dict, x: torch.Tensor, targets) -> torch.Tensor:
    composite = getattr(zennit_composites, composite)(canonizers=[canonizer()], **arguments)
    x = x.clone().requires_grad_()
    with composite.context(net) as modified:
        output = modified(x)
        one_hot = torch.nn.functional.one_hot(torch.as_tensor(targets), output.shape[1]).to(output)
        result, = torch.autograd.grad(output, x, grad_outputs=one_hot * output)
    return result


@pytest.mark.parametrize("method", ZENNIT)
@pytest.mark.parametrize("arch", ["vgg16", "resnet18"])
def test_relevance_equals_zennits_composite(torchvision_nets, arch, method):
    net, canonizer = torchvision_nets[arch]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    composite, arguments, options = ZENNIT[method]
    ours = explain(net, x, method=method, target=[3, 7], **options)
    theirs = _zennit(net, canonizer, composite, arguments, x, [3, 7])
    error = ((ours.attributions - theirs).abs().amax(dim=(1, 2, 3)) / theirs.abs().amax(dim=(1, 2, 3))).max()
    assert error <= 1e-4, f"{method} on {arch}: {error}"
    # the map sums three channels, each within 1e-4 of the largest relevance
    torch.testing.assert_close(ours.raw, theirs.sum(1), rtol=0, atol=3e-4 * float(theirs.abs().max()))
    assert all(isinstance(p, nn.Parameter) for p in net.parameters())  # nothing folded into the model itself


def test_relevance_equals_zennits_to_float64_precision_where_its_merged_batchnorms_are_exact(torchvision_nets):
    # zennit's canonizer leaves each merged BatchNorm computing x / sqrt(1 + eps), so its relevances shrink by
    # ~eps/2 per BatchNorm on the path (the 1e-4 above); with eps = 0 the two are equal to float64 precision.
    net = copy.deepcopy(torchvision_nets["resnet18"][0]).double()
    for norm in net.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.eps = 0.0
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = explain(net, x, method="lrp", target=3).attributions.double()
    theirs = _zennit(net, zennit_torchvision.ResNetCanonizer, "EpsilonPlusFlat", {}, x, [3])
    assert float((ours - theirs).abs().max() / theirs.abs().max()) <= 1e-6


def _request(net: nn.Module, x: torch.Tensor, target: int) -> Request:
    return Request(from_module(net, name="net", input_size=tuple(x.shape[-2:])), x, [], None, None, target=target)


class _Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.conv(x)
        out += x  # the in-place residual sum of torchvision's blocks
        return self.relu(out)


ZERO_RULE = Composite(conv=Epsilon(0.0), linear=Epsilon(0.0))


@settings(max_examples=20, deadline=None)
@given(width=st.integers(1, 4), size=st.integers(4, 9), pool=st.sampled_from(["max", "avg", "none"]),
       residual=st.booleans(), seed=st.integers(0, 2**16))
def test_lrp_0_on_a_relu_net_without_biases_conserves_the_score(width, size, pool, residual, seed):
    torch.manual_seed(seed)
    pools = {"max": nn.MaxPool2d(2, ceil_mode=True), "avg": nn.AvgPool2d(2, ceil_mode=True), "none": nn.Identity()}
    net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.ReLU(inplace=True), pools[pool],
                        _Residual(width) if residual else nn.Identity(),
                        nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, 3, bias=False)).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(seed))
    score = net(x)[0, 1].detach()
    relevances = relevance(_request(net, x, 1), ZERO_RULE)
    assert float(relevances.sum()) == pytest.approx(float(score), rel=1e-3, abs=1e-6)


class _TwoLayers(nn.Module):
    """x (2 channels, 1 pixel) -> 1x1 conv W1 (no bias) -> ReLU -> linear W2 (no bias), two logits."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, bias=False)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[1.0, 1.0], [2.0, -0.5]]).view(2, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[2.0, -1.0], [0.5, 0.5]]))  # logit 0 is explained

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).flatten(1))


def test_lrp_0_on_a_two_layer_net_by_hand():
    # x = (1, 2): z1 = (1+2, 2-1) = (3, 1), out = 2*3 - 1*1 = 5.
    # Linear: R_a = a_k w_k / out * 5 = (6, -1).
    # Conv: R_x_j = sum_k x_j W1_kj / z1_k * R_k = (1/3*6 + 2/1*-1, 2/3*6 + -1/1*-1) = (0, 5).
    x = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    relevances = relevance(_request(_TwoLayers(), x, 0), ZERO_RULE)
    torch.testing.assert_close(relevances.flatten(), torch.tensor([0.0, 5.0]))


def test_lrp_flat_first_layer_by_hand():
    # EpsilonPlusFlat: the first layer (the conv) is flat, each output's relevance split evenly over
    # its 2 inputs: R_x = ((6 - 1) / 2, (6 - 1) / 2); the linear layer's epsilon is 1e-6.
    x = torch.tensor([1.0, 2.0]).view(1, 2, 1, 1)
    result = explain(_TwoLayers(), x, method="lrp", target=0)
    torch.testing.assert_close(result.attributions.flatten(), torch.tensor([2.5, 2.5]), rtol=1e-5, atol=1e-5)
    assert float(result.raw.flatten()) == pytest.approx(5.0, rel=1e-5)


class _Gated(nn.Module):
    """Squeeze-and-excitation style gating: a product of two activations."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        features = self.relu(self.conv(x))
        return self.head(features * features.mean(dim=(2, 3), keepdim=True))


@pytest.mark.parametrize("net,words", [
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
     "LRP has no rule for 1 (GELU); supported: Conv2d, Linear"),
    (nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                   nn.Linear(4, 3)), "LRP has no rule for 0 (BatchNorm2d) where it does not read a Conv2d"),
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4, 14, 14]), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)),
     "LRP has no rule for 1 (LayerNorm)"),
    (_Gated(), "LRP has no rule for a product of two activations"),
], ids=["gelu", "batchnorm-first", "layernorm", "gating"])
@pytest.mark.parametrize("method", list(ZENNIT))
def test_a_layer_without_a_rule_is_a_one_line_error_and_the_model_is_given_back(net, words, method, image_batch):
    x = torch.nn.functional.interpolate(image_batch, size=16)
    with pytest.raises(cl.ConvlensError, match="LRP has no rule") as err:
        explain(net, x, method=method)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())


def test_alpha_minus_beta_must_be_one(tiny, image_batch):
    with pytest.raises(cl.ConvlensError, match="alpha - beta = 1"):
        explain(tiny, image_batch, method="lrp_alpha_beta", alpha=2, beta=2)


def test_box_bounds_default_to_pixels_0_and_1_through_the_normalisation(tiny, image_batch):
    model = from_module(tiny, input_size=16)  # ImageNet's mean and std
    default = explain(model, image_batch, method="lrp_epsilon_gamma_box", target=1)
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
    given = explain(model, image_batch, method="lrp_epsilon_gamma_box", target=1,
                    low=list(-mean / std), high=list((1 - mean) / std))
    torch.testing.assert_close(default.attributions, given.attributions)
    other = explain(model, image_batch, method="lrp_epsilon_gamma_box", target=1, low=-1.0, high=1.0)
    assert not torch.allclose(default.attributions, other.attributions)


def test_explain_cli_writes_the_apis_lrp_maps(cli, tmp_path, picture):
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(TinyNet(), path)
    out = tmp_path / "maps"
    code, _, err = cli("explain", path, picture, "--methods", "lrp,lrp_epsilon_gamma_box", "--out", out,
                       "--trust-code")
    assert code == 0, err
    model = cl.load_model(path, trust_code=True)
    for method in ("lrp", "lrp_epsilon_gamma_box"):
        api = explain(model, [Image.open(picture)], method=method)
        np.testing.assert_allclose(np.load(out / f"pic_{method}.npy"), api.raw[0].numpy(), rtol=1e-5, atol=1e-7)
        assert (out / f"pic_{method}.png").exists()


def test_timms_batchnorm_with_its_relu_is_folded_like_a_batchnorm_then_a_relu(image_batch):
    from timm.layers import BatchNormAct2d

    torch.manual_seed(0)
    plain = _jitter_norms(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                        nn.Flatten(), nn.Linear(4, 3)))
    fused = nn.Sequential(plain[0], BatchNormAct2d(4, act_layer=nn.ReLU), *plain[3:]).eval()
    fused[1].load_state_dict(plain[1].state_dict())
    for method in ZENNIT:
        options = ZENNIT[method][2]
        expected = explain(plain, image_batch, method=method, target=2, **options).attributions
        torch.testing.assert_close(explain(fused, image_batch, method=method, target=2, **options).attributions,
                                   expected)
