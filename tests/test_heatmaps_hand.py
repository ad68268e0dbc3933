"""Tiny models with fixed weights whose right heatmap the test computes by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import convlens as cl
from convlens.heatmaps import explain
from convlens.heatmaps.base import normalise
from convlens.models.transforms import crop_box
from convlens.render.overlay import colorize, overlay_heatmap


class OneConvGap(nn.Module):
    """conv (3 -> 4, 3x3) -> ReLU -> global average pooling -> linear (4 -> 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.relu(self.conv(x)).mean((2, 3)))


@pytest.fixture
def gap_model():
    torch.manual_seed(1)
    return OneConvGap()


@pytest.fixture
def x():
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))


def _acts(model, x):
    with torch.no_grad():
        return torch.relu(model.conv(x))


def test_cam_is_the_class_weighted_channel_sum(gap_model, x):
    res = explain(gap_model, x, method="cam", target=2)
    acts = _acts(gap_model, x)
    expected = (gap_model.fc.weight[2].detach().view(1, 4, 1, 1) * acts).sum(1)
    assert res.layer == "relu" and res.targets == [2, 2]
    torch.testing.assert_close(res.raw, expected)
    # the map: ReLU, (no upsampling: the layer is at input resolution), per-image min-max
    clipped = expected.clamp(min=0)
    low = clipped.flatten(1).min(1).values.view(-1, 1, 1)
    high = clipped.flatten(1).max(1).values.view(-1, 1, 1)
    torch.testing.assert_close(res.maps, (clipped - low) / (high - low))


def test_gradient_cams_on_a_gap_model(gap_model, x):
    """On a GAP + linear head dS/dA_k(i, j) = w_ck / (h w) everywhere, so every weighting has a closed form."""
    acts = _acts(gap_model, x)
    w = gap_model.fc.weight[1].detach()
    grad = (w / 64).view(1, 4, 1, 1).expand_as(acts)
    gradcam = (grad.mean((2, 3), keepdim=True) * acts).sum(1)
    torch.testing.assert_close(explain(gap_model, x, method="gradcam", target=1).raw, gradcam)
    torch.testing.assert_close(explain(gap_model, x, method="hirescam", target=1).raw, (grad * acts).sum(1))
    torch.testing.assert_close(explain(gap_model, x, method="layercam", target=1).raw,
                               (grad.clamp(min=0) * acts).sum(1))
    # XGrad-CAM: sum_ij A / (sum A + eps) * g = g S / (S + eps) for a constant gradient, with the
    # reference's eps = 1e-7 (0 for dead channels, S = 0); eps=0 is the paper's sum_ij (A / sum A) g = g
    total = acts.sum((2, 3), keepdim=True)
    torch.testing.assert_close(explain(gap_model, x, method="xgradcam", target=1).raw,
                               (grad[:, :, :1, :1] * total / (total + 1e-7) * acts).sum(1))
    alive = (total > 0).float()
    torch.testing.assert_close(explain(gap_model, x, method="xgradcam", target=1, eps=0).raw,
                               (grad[:, :, :1, :1] * alive * acts).sum(1))
    # Grad-CAM++: alpha = g^2 / (2 g^2 + S g^3 + eps), w = sum_ij alpha ReLU(g) = h w alpha ReLU(g),
    # eps = 1e-6 as pytorch-grad-cam; g ~ 5e-3 here, so the eps changes the weights by a few per cent
    g = w / 64
    total = acts.sum((2, 3))
    for eps in (1e-6, 0.0):
        alpha = g**2 / (2 * g**2 + total * g**3 + eps)
        weights = 64 * alpha * g.clamp(min=0)
        options = {} if eps else {"eps": 0.0}
        torch.testing.assert_close(explain(gap_model, x, method="gradcam++", target=1, **options).raw,
                                   (weights.view(2, 4, 1, 1) * acts).sum(1))
    # CAM = (h w) Grad-CAM here
    torch.testing.assert_close(explain(gap_model, x, method="cam", target=1).raw, 64 * gradcam)


def test_ablationcam_is_the_relative_drop(gap_model, x):
    """Zeroing channel k of a GAP model lowers the logit by w_ck * mean(A_k)."""
    acts = _acts(gap_model, x)
    w = gap_model.fc.weight[0].detach()
    with torch.no_grad():
        logit = gap_model(x)[:, 0]
    weights = (w * acts.mean((2, 3))) / logit.view(-1, 1)
    expected = (weights.view(2, 4, 1, 1) * acts).sum(1)
    torch.testing.assert_close(explain(gap_model, x, method="ablationcam", target=0).raw, expected)


def test_scorecam_follows_algorithm_1(gap_model, x):
    """Masks from the channels, min-max normalised; the masked logits, softmaxed, weight the channels."""
    acts = _acts(gap_model, x)
    res = explain(gap_model, x, method="scorecam", target=2)
    for image in range(2):
        scores = []
        for channel in acts[image]:
            mask = (channel - channel.min()) / (channel.max() - channel.min()) if channel.max() > channel.min() \
                else torch.zeros_like(channel)
            with torch.no_grad():
                scores.append(gap_model(x[image:image + 1] * mask)[0, 2])
        weights = torch.softmax(torch.stack(scores), 0)
        torch.testing.assert_close(res.raw[image], (weights.view(4, 1, 1) * acts[image]).sum(0))


class Features(nn.Module):
    """The input itself is the layer: its channels are what the test says they are."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(channels, 2)

    def forward(self, x):
        return self.fc(self.feat(x).mean((2, 3)))


def test_eigencam_projects_on_the_principal_component():
    pattern = torch.zeros(6, 6)
    pattern[1:3, 3:5] = 1.0  # the one spatial pattern every channel carries
    x = torch.stack([2.0 * pattern, 0.5 * pattern + 1.0, -1.0 * pattern]).unsqueeze(0)
    res = explain(Features(), x, method="eigencam", layer="feat")
    centred = pattern - pattern.mean()
    # rank one: the projection is +-|c| * (pattern - mean); sign corrected so the larger extreme is positive
    expected = centred * (centred.max().abs() >= centred.min().abs()).float() * 2 - centred
    torch.testing.assert_close(res.raw[0] / res.raw[0].abs().max(), expected / expected.abs().max())
    assert res.maps[0][1:3, 3:5].min() == 1.0 and res.maps[0].sum() == 4.0


class LinearImageModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_linear_model_gradients_are_the_weights():
    torch.manual_seed(3)
    model = LinearImageModel()
    x = torch.randn(1, 3, 2, 2)
    weight = model.fc.weight[1].detach().view(3, 2, 2)
    sal = explain(model, x, method="saliency", target=1)
    torch.testing.assert_close(sal.raw[0], weight.abs().amax(0))
    smooth = explain(model, x, method="smoothgrad", target=1, n_samples=4)  # noise cannot change a constant gradient
    torch.testing.assert_close(smooth.raw[0], weight.abs().amax(0))
    ig = explain(model, x, method="integrated_gradients", target=1, steps=5)
    torch.testing.assert_close(ig.attributions[0], x[0] * weight)  # IG of a linear model is exact
    torch.testing.assert_close(ig.raw[0], (x[0] * weight).sum(0).abs())


def test_integrated_gradients_complete_on_a_nonlinear_model(gap_model, x):
    """Completeness: attributions add up to f(x) - f(baseline), up to the quadrature error."""
    res = explain(gap_model, x, method="integrated_gradients", target=0, steps=200)
    with torch.no_grad():
        gap = gap_model(x)[:, 0] - gap_model(torch.zeros_like(x))[:, 0]
    torch.testing.assert_close(res.attributions.sum((1, 2, 3)), gap, atol=2e-3, rtol=1e-2)


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x.flatten(1))))


def test_guided_backprop_passes_positive_gradients_through_active_units():
    torch.manual_seed(4)
    model = TwoLayer()
    x = torch.randn(1, 3, 2, 2)
    with torch.no_grad():
        hidden = model.fc1(x.flatten(1))[0]
    upstream = model.fc2.weight[1].detach()
    gated = upstream.clamp(min=0) * (hidden > 0)
    guided = (gated @ model.fc1.weight.detach()).view(3, 2, 2)
    res = explain(model, x, method="guided_backprop", target=1)
    torch.testing.assert_close(res.attributions[0], guided)
    plain = ((upstream * (hidden > 0)) @ model.fc1.weight.detach()).view(3, 2, 2)
    torch.testing.assert_close(explain(model, x, method="saliency", target=1).attributions[0], plain.abs())


def test_targets_by_index_name_list_callable_and_single_logit(gap_model, x):
    model = cl.load_model(gap_model, labels=["cat", "dog", "fox"])
    by_name = explain(model, x, method="gradcam", target="fox")
    assert by_name.targets == [2, 2] and by_name.target_names == ["fox", "fox"]
    torch.testing.assert_close(by_name.raw, explain(model, x, method="gradcam", target=2).raw)
    per_image = explain(model, x, method="gradcam", target=[0, "dog"])
    assert per_image.targets == [0, 1]
    with torch.no_grad():
        top1 = gap_model(x).argmax(1).tolist()
    assert explain(model, x, method="gradcam").targets == top1
    custom = explain(model, x, method="gradcam", target=lambda out: out[:, 0] - out[:, 1])
    difference = explain(model, x, method="gradcam", target=0).raw - explain(model, x, method="gradcam", target=1).raw
    torch.testing.assert_close(custom.raw, difference)
    assert custom.targets == [-1, -1]

    binary = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                           nn.Linear(2, 1), nn.Sigmoid())
    positive = explain(binary, x, method="gradcam", layer="1")
    negative = explain(binary, x, method="gradcam", layer="1", target=0)
    assert positive.targets == [1, 1] and negative.targets == [0, 0]
    torch.testing.assert_close(negative.raw, -positive.raw)  # the negative class's logit is minus the logit


@pytest.mark.parametrize("target,match", [(3, "out of range"), ("wolf", "unknown class"), ([0], "1 targets given"),
                                          (-1, "out of range")])
def test_bad_targets(gap_model, x, target, match):
    model = cl.load_model(gap_model, labels=["cat", "dog", "fox"])
    with pytest.raises(cl.ConvlensError, match=match):
        explain(model, x, method="gradcam", target=target)


def test_a_constant_map_is_zeros_and_flagged_never_nan(gap_model, x):
    with torch.no_grad():
        gap_model.conv.bias.fill_(-100.0)  # every activation is 0: nothing to localise
    res = explain(gap_model, x, method="gradcam")
    assert res.flat == [True, True] and torch.equal(res.maps, torch.zeros_like(res.maps))
    maps, flat = normalise(torch.tensor([[[1.0, 1.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 4.0]]]))
    assert flat == [True, False] and torch.equal(maps[1], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))


def test_upsampling_is_bilinear_with_aligned_centres(gap_model):
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    res = explain(model, x, method="gradcam", layer="1")
    up = F.interpolate(res.raw.clamp(min=0).unsqueeze(1), size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(res.maps, normalise(up)[0])


def test_overlay_sits_on_the_crop_of_the_original():
    model = cl.load_model("resnet18", weights="none")  # Resize(256) + CenterCrop(224)
    box = crop_box(model.transform, 400, 300)
    assert box == pytest.approx((68.75, 18.75, 331.25, 281.25))
    photo = Image.new("RGB", (400, 300), (10, 200, 30))
    heatmap = torch.full((224, 224), 0.5)
    blended = overlay_heatmap(photo, heatmap, transform=model.transform, colormap="viridis", alpha=0.25)
    assert blended.size == (400, 300)
    assert blended.getpixel((5, 5)) == (10, 200, 30)  # outside the crop: the photo unchanged
    colour = colorize(torch.tensor([[0.5]]).numpy(), "viridis")[0, 0]
    expected = tuple(int(round(0.75 * p + 0.25 * c)) for p, c in zip((10, 200, 30), colour))
    assert blended.getpixel((200, 150)) == expected
