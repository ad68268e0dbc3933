"""Every registered heatmap method agrees with an independent implementation.

CAM methods are compared with pytorch-grad-cam (PyPI ``grad-cam``), gradient
methods with captum, LRP with zennit, on the same model, input, layer and target: max abs
difference <= 1e-3 on maps normalised to [0, 1].

The comparison (same resolution, same post-processing, the peer's variant
selected through options) is described in ``cam_reference``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import (Deconvolution, FeatureAblation, GradientShap, GuidedBackprop, GuidedGradCam, InputXGradient,
                         IntegratedGradients, NoiseTunnel, Occlusion, Saliency, ShapleyValueSampling)

import convlens as cl
from convlens.capture import capture
from convlens.heatmaps import METHODS, explain

from cam_reference import CAM_PEERS, TOLERANCE, TORCHCAM_PEERS, Logit, minmax
from cam_reference import difference as _difference
from cam_reference import peer_cam as _peer_cam
from cam_reference import torchcam_cam
from test_deeplift_lime import captum_deeplift, captum_superpixels


def _captum_saliency(forward, x, targets, layer):
    return Saliency(forward).attribute(x, target=targets, abs=True).amax(1)


def _captum_smoothgrad(forward, x, targets, layer):
    torch.manual_seed(7)
    tunnel = NoiseTunnel(Saliency(forward))
    return tunnel.attribute(x, target=targets, abs=True, nt_type="smoothgrad", nt_samples=3, stdevs=0.3).amax(1)


def _captum_ig(forward, x, targets, layer):
    ig = IntegratedGradients(forward).attribute(x, target=targets, n_steps=8, method="riemann_trapezoid")
    return ig.sum(1).abs()


def _captum_guided(forward, x, targets, layer):
    return GuidedBackprop(forward).attribute(x, target=targets).abs().amax(1)


def _captum_guided_gradcam(forward, x, targets, layer):
    return GuidedGradCam(forward, layer).attribute(x, target=targets, interpolate_mode="bilinear").abs().amax(1)


def _captum_input_x_gradient(forward, x, targets, layer):
    return InputXGradient(forward).attribute(x, target=targets).sum(1).abs()


def _captum_deconvolution(forward, x, targets, layer):
    return Deconvolution(forward).attribute(x, target=targets).abs().amax(1)


def _captum_tunnel(nt_type):
    def computation(forward, x, targets, layer):
        torch.manual_seed(7)
        tunnel = NoiseTunnel(Saliency(forward))
        return tunnel.attribute(x, target=targets, abs=False, nt_type=nt_type, nt_samples=3, stdevs=0.3).amax(1)

    return computation


def _captum_gradient_shap(forward, x, targets, layer):
    torch.manual_seed(7)
    np.random.seed(7)
    baselines = torch.stack([torch.zeros_like(x[0]), torch.ones_like(x[0])])
    return GradientShap(forward).attribute(x, baselines=baselines, target=targets, n_samples=4).sum(1).abs()


def _captum_occlusion(forward, x, targets, layer):
    return Occlusion(forward).attribute(x, target=targets, sliding_window_shapes=(x.shape[1], 8, 8),
                                        strides=(x.shape[1], 4, 4), baselines=0.0).mean(1)


def _quarters(size: int) -> torch.Tensor:
    rows = torch.arange(size) // (size // 4)
    return rows.view(-1, 1) * 4 + rows.view(1, -1)  # 16 square superpixels


def _captum_feature_ablation(forward, x, targets, layer):
    mask = _quarters(x.shape[-1]).view(1, 1, x.shape[-2], x.shape[-1])
    return FeatureAblation(forward).attribute(x, target=targets, feature_mask=mask).mean(1)


def _captum_shapley(forward, x, targets, layer):
    torch.manual_seed(7)
    mask = _quarters(x.shape[-1]).view(1, 1, x.shape[-2], x.shape[-1])
    rows = [ShapleyValueSampling(forward).attribute(x[i:i + 1], target=[targets[i]] if isinstance(targets, list)
                                                    else targets, feature_mask=mask, n_samples=2,
                                                    perturbations_per_eval=32) for i in range(len(x))]
    return torch.cat(rows).mean(1)


def _captum_deeplift(forward, x, targets, layer):
    return captum_deeplift(forward, x, torch.zeros_like(x), targets).sum(1).abs()


def _captum_deeplift_shap(forward, x, targets, layer):
    baselines = torch.stack([torch.zeros_like(x[0]), torch.ones_like(x[0])])
    return captum_deeplift(forward, x, baselines, targets, shap=True).sum(1).abs()


def _captum_surrogate(method):
    def computation(forward, x, targets, layer):
        return captum_superpixels(method, forward, x, targets, _quarters(x.shape[-1]), 12, 7).mean(1)

    return computation


def _zennit(composite: str, **arguments):
    def computation(net, x, targets, layer):  # zennit's own relevance, positive part summed over channels
        from zennit import composites, torchvision as canonizers

        canonizer = canonizers.ResNetCanonizer if isinstance(net, torchvision.models.ResNet) else canonizers.VGGCanonizer
        x = x.clone().requires_grad_()
        with getattr(composites, composite)(canonizers=[canonizer()], **arguments).context(net) as modified:
            output = modified(x)
            one_hot = torch.nn.functional.one_hot(torch.as_tensor(targets), output.shape[1]).to(output)
            relevance, = torch.autograd.grad(output, x, grad_outputs=one_hot * output)
        return relevance.sum(1).clamp(min=0)

    return computation


#: method -> (captum computation giving the (N, H, W) map, convlens options)
GRADIENT_PEERS = {
    "saliency": (_captum_saliency, {}),
    "smoothgrad": (_captum_smoothgrad, {"stdev": 0.3, "n_samples": 3, "seed": 7}),
    "integrated_gradients": (_captum_ig, {"steps": 8}),
    "guided_backprop": (_captum_guided, {}),
    "guided_gradcam": (_captum_guided_gradcam, {}),
    "input_x_gradient": (_captum_input_x_gradient, {}),
    "deconvolution": (_captum_deconvolution, {}),
    "smoothgrad_sq": (_captum_tunnel("smoothgrad_sq"), {"stdev": 0.3, "n_samples": 3, "seed": 7}),
    "vargrad": (_captum_tunnel("vargrad"), {"stdev": 0.3, "n_samples": 3, "seed": 7}),
    "gradient_shap": (_captum_gradient_shap, {"baselines": "zeros-and-ones", "n_samples": 4, "seed": 7}),
    "occlusion": (_captum_occlusion, {"window": 8, "stride": 4}),
    "feature_ablation": (_captum_feature_ablation, {"segments": "quarters"}),
    "shapley_sampling": (_captum_shapley, {"segments": "quarters", "n_samples": 2, "seed": 7}),
    "deeplift": (_captum_deeplift, {}),
    "deeplift_shap": (_captum_deeplift_shap, {"baselines": "zeros-and-ones"}),
    "lime": (_captum_surrogate("lime"), {"segments": "quarters", "n_samples": 12, "seed": 7}),
    "kernel_shap": (_captum_surrogate("kernel_shap"), {"segments": "quarters", "n_samples": 12, "seed": 7}),
    # LRP against zennit (the pixel box of the z^B rule given to both)
    "lrp": (_zennit("EpsilonPlusFlat"), {}),
    "lrp_epsilon_gamma_box": (_zennit("EpsilonGammaBox", low=-3.0, high=3.0), {"low": -3.0, "high": 3.0}),
    "lrp_alpha_beta": (_zennit("EpsilonAlpha2Beta1Flat"), {}),
}


def captum_options(method: str, x: torch.Tensor) -> dict:
    """The convlens options of ``method`` that match its captum computation on inputs like ``x``."""
    options = dict(GRADIENT_PEERS[method][1])
    if options.get("segments") == "quarters":
        options["segments"] = _quarters(x.shape[-2] if x.shape[1] <= 4 else x.shape[1])
    if options.get("baselines") == "zeros-and-ones":
        options["baselines"] = torch.stack([torch.zeros_like(x[0]), torch.ones_like(x[0])])
    return options

CAM_METHODS = [m for m in METHODS if m in CAM_PEERS]
#: compared with captum: the gradient methods and its perturbation family (occlusion)
GRADIENT_METHODS = [m for m in METHODS if m in GRADIENT_PEERS]
#: perturbation methods run one forward per channel: a narrower layer keeps them fast
PERTURBATION = {"scorecam", "ablationcam"}


def test_every_method_has_a_reference():
    assert set(METHODS) == set(CAM_PEERS) | set(GRADIENT_PEERS) | set(TORCHCAM_PEERS)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.fixture(scope="module")
def vgg11():
    torch.manual_seed(0)
    return torchvision.models.vgg11().eval()


def _batch(size: int, count: int = 2) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(3))


TORCH_CASES = {
    # model fixture, input size, layer for the gradient CAMs, layer for the perturbation CAMs (fewer channels)
    "resnet18": ("resnet18", 64, "layer3", "layer1"),
    "vgg11": ("vgg11", 64, "features.19", "features.1"),
}


@pytest.mark.parametrize("case", TORCH_CASES)
@pytest.mark.parametrize("method", CAM_METHODS)
def test_cam_methods_match_pytorch_grad_cam(request, case, method):
    fixture, size, layer, narrow_layer = TORCH_CASES[case]
    net = request.getfixturevalue(fixture)
    if method == "cam" and case == "vgg11":
        with pytest.raises(cl.ConvlensError, match="global average pooling"):
            explain(net, _batch(size), method="cam", layer=layer)
        return
    if method in PERTURBATION:
        layer, size = narrow_layer, 32
    if method == "cam":
        layer = "layer4"  # the layer the GAP + linear head reads
    x = _batch(size, count=1 if method in PERTURBATION else 2)
    ours = explain(net, x, method=method, layer=layer, **CAM_PEERS[method][1])
    assert not any(ours.flat)
    layer_module = dict(net.named_modules())[layer]
    theirs = _peer_cam(method, net, layer_module, x, [Logit(t) for t in ours.targets], tuple(ours.raw.shape[-2:]))
    difference = _difference(method, ours.raw, theirs)
    assert difference <= TOLERANCE, f"{method} on {case}: {difference}"
    assert ours.maps.shape == (x.shape[0], size, size) and ours.maps.dtype == torch.float32


@pytest.mark.parametrize("case", TORCH_CASES)
@pytest.mark.parametrize("method", list(TORCHCAM_PEERS))
def test_noise_cams_match_torchcam_with_the_same_draws(request, case, method):
    fixture, size, layer, narrow_layer = TORCH_CASES[case]
    net = request.getfixturevalue(fixture)
    if method in ("sscam", "iscam"):  # one forward pass per channel and sample: the narrow layer
        layer, size = narrow_layer, 32
    x = _batch(size)
    seeded = {"seed": 11} if "seed" in METHODS[method].option_names() else {}
    ours = explain(net, x, method=method, layer=layer, **seeded, **TORCHCAM_PEERS[method][1])
    theirs = torchcam_cam(method, net, layer, x, ours.targets, seed=11)
    difference = float((minmax(ours.raw) - theirs).abs().max())
    assert difference <= TOLERANCE, f"{method} on {case}: {difference}"


@pytest.mark.parametrize("case", TORCH_CASES)
@pytest.mark.parametrize("method", GRADIENT_METHODS)
def test_gradient_methods_match_captum(request, case, method):
    fixture, size, layer, _ = TORCH_CASES[case]
    net = request.getfixturevalue(fixture)
    x = _batch(32)
    ours = explain(net, x, method=method, layer=layer, **captum_options(method, x))
    layer_module = dict(net.named_modules())[layer]
    theirs = GRADIENT_PEERS[method][0](net, x, ours.targets, layer_module)
    difference = (ours.maps - minmax(theirs)).abs().max()
    assert difference <= TOLERANCE, f"{method} on {case}: {difference}"
    assert ours.maps.max() == 1 and ours.maps.min() == 0


# -- Keras: the Chollet-style binary classifier (single sigmoid output) --------------------

@pytest.fixture(scope="module")
def keras_model():
    pytest.importorskip("keras")
    from test_keras import chollet_cats_vs_dogs

    return cl.load_model(chollet_cats_vs_dogs(), labels=["cat", "dog"])


def _keras_logits(model):
    def forward(x):
        with capture(model, rewrite=model.logit_rewrites()) as rec:
            return rec.forward(x)

    return forward


# pytorch-grad-cam's AblationCAM swaps the torch submodule, which a Keras model never calls: compared by hand below.
# FullGrad reads torch Conv2d/BatchNorm2d biases (it refuses a Keras model: test_cam_variants); FinerCAM compares
# classes, and the peer's default target on this single sigmoid output is not a class logit. The peer's ShapleyCAM
# weights the activations before its reshape_transform (detach=False skips it) and fails on channels-last ones.
@pytest.mark.parametrize("method", [m for m in CAM_METHODS
                                    if m not in ("cam", "ablationcam", "fullgrad", "finercam", "shapleycam")])
def test_keras_cam_methods_match_pytorch_grad_cam(keras_model, method):
    x_last = torch.rand(1 if method in PERTURBATION else 2, 48, 48, 3, generator=torch.Generator().manual_seed(5))
    ours = explain(keras_model, x_last, method=method, layer="conv2d_1", **CAM_PEERS[method][1])
    assert ours.targets == [1] * x_last.shape[0]  # single logit: top-1 is the positive class
    layer_module = keras_model.named_layers()["conv2d_1"]
    theirs = _peer_cam(method, keras_model.module, layer_module, x_last.permute(0, 3, 1, 2),
                       [Logit(0, sigmoid=True)] * x_last.shape[0], tuple(ours.raw.shape[-2:]),
                       reshape=lambda t: t.permute(0, 3, 1, 2))
    difference = _difference(method, ours.raw, theirs)
    assert difference <= TOLERANCE, f"{method} on keras: {difference}"


def test_keras_cam_needs_a_gap_head(keras_model):
    with pytest.raises(cl.ConvlensError, match="global average pooling"):
        explain(keras_model, torch.rand(1, 48, 48, 3), method="cam")


@pytest.mark.parametrize("method", ["saliency", "smoothgrad", "integrated_gradients", "input_x_gradient",
                                    "vargrad", "occlusion"])
def test_keras_gradient_methods_match_captum(keras_model, method):
    x_last = torch.rand(2, 48, 48, 3, generator=torch.Generator().manual_seed(6))
    ours = explain(keras_model, x_last, method=method, **captum_options(method, x_last))
    theirs = GRADIENT_PEERS[method][0](_keras_logits(keras_model), x_last.permute(0, 3, 1, 2), 0, None)
    assert ours.attributions.shape == x_last.shape  # the user's channels-last layout
    assert (ours.maps - minmax(theirs)).abs().max() <= TOLERANCE


def test_keras_ablationcam_matches_channels_zeroed_one_by_one(keras_model):
    x_last = torch.rand(1, 48, 48, 3, generator=torch.Generator().manual_seed(5))
    ours = explain(keras_model, x_last, method="ablationcam", layer="conv2d_1", batch_size=5)
    layer = keras_model.named_layers()["conv2d_1"]
    forward = _keras_logits(keras_model)
    x = x_last.permute(0, 3, 1, 2)
    with torch.no_grad(), capture(keras_model, ["conv2d_1"]) as rec:
        base = forward(x)[0, 0]
        acts = rec.outputs["conv2d_1"][0]
    weights = []
    for channel in range(acts.shape[0]):
        def zero(module, inputs, output, channel=channel):
            output = output.clone()
            output[..., channel] = 0  # Keras: channels last
            return output

        with torch.no_grad(), capture(keras_model, rewrite={**keras_model.logit_rewrites(), layer: zero}) as rec:
            weights.append((base - rec.forward(x)[0, 0]) / base)
    expected = torch.einsum("k,khw->hw", torch.stack(weights), acts)
    torch.testing.assert_close(ours.raw[0], expected, atol=1e-5, rtol=1e-4)
