"""The newer CAMs (issue 19): each by hand on a tiny model, bad options on one line, and through the CLI.

Their agreement with pytorch-grad-cam (EigenGradCAM, GradCAMElementWise, FullGrad, KPCA_CAM, FEM,
ShapleyCAM, FinerCAM) on resnet18/vgg11 and the zoo is in ``cam_reference`` / test_heatmaps_reference /
test_zoo; hooks and model state in test_heatmaps_lifecycle.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import convlens as cl
from convlens.heatmaps import explain
from convlens.heatmaps.cam_variants import FinerScore, bias_layers
from convlens.targets import ClassLogits

from conftest import TinyNet
from test_heatmaps_hand import Features

NEW = ["eigengradcam", "gradcam_elementwise", "fullgrad", "kpcacam", "fem", "shapleycam", "finercam", "smoothgradcam++",
       "sscam", "iscam"]


def _conv2_gradient(tiny: TinyNet, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """conv2's output ``A`` and the target logit's gradient there: ``W_c / (h w)`` where the ReLU passes."""
    with torch.no_grad():
        pre = tiny.conv2(tiny.relu1(tiny.bn(tiny.conv1(x))))
    grad = tiny.fc.weight[target].detach().view(1, -1, 1, 1) * (pre > 0) / (x.shape[-2] * x.shape[-1])
    return pre, grad


def test_gradcam_elementwise_takes_the_relu_of_each_product_before_the_channel_sum(tiny, image_batch):
    res = explain(tiny, image_batch, method="gradcam_elementwise", layer="conv2", target=1)
    tiny.eval()
    pre, grad = _conv2_gradient(tiny, image_batch, 1)
    torch.testing.assert_close(res.raw, (grad * pre).clamp(min=0).sum(1))
    hirescam = explain(tiny, image_batch, method="hirescam", layer="conv2", target=1)
    assert (res.maps - hirescam.maps).abs().max() > 0.05  # negative products no longer cancel positive ones


def test_eigengradcam_projects_gradient_times_activation_on_its_principal_component(tiny, image_batch):
    res = explain(tiny, image_batch, method="eigengradcam", layer="conv2", target=2)
    tiny.eval()
    pre, grad = _conv2_gradient(tiny, image_batch, 2)
    for image in range(2):
        matrix = (grad * pre)[image].flatten(1).T.double().numpy()  # (h*w, C)
        matrix = matrix - matrix.mean(0)
        _, _, vt = np.linalg.svd(matrix, full_matrices=False)
        projection = matrix @ vt[0]
        if abs(projection.min()) > abs(projection.max()):
            projection = -projection
        np.testing.assert_allclose(res.raw[image].flatten().numpy(), projection, atol=1e-6, rtol=1e-4)


def test_fem_weights_each_channel_by_its_share_of_pixels_above_k_sigma():
    x = torch.tensor([[[0.0, 0.0], [0.0, 4.0]],    # mean 1, std sqrt(3): one pixel of four above mean + std
                      [[1.0, 2.0], [3.0, 4.0]],    # mean 2.5, std 1.118: one above 3.618
                      [[5.0, 5.0], [5.0, 5.0]]]).unsqueeze(0)  # std 0: nothing is above its own mean
    res = explain(Features(), x, method="fem", layer="feat", k=1.0)
    torch.testing.assert_close(res.raw[0], 0.25 * x[0, 0] + 0.25 * x[0, 1])
    none_above = explain(Features(), x, method="fem", layer="feat", k=3.0)  # the default k=2 keeps none here either
    assert none_above.flat == [True] and (none_above.raw == 0).all()


@pytest.mark.parametrize("kernel,gamma", [("rbf", 0.7), ("poly", None), ("cosine", None), ("sigmoid", 0.05)])
def test_kpcacam_equals_scikit_learns_kernel_pca(kernel, gamma):
    sklearn = pytest.importorskip("sklearn.decomposition")
    x = torch.randn(1, 5, 6, 7, generator=torch.Generator().manual_seed(4))
    res = explain(Features(channels=5), x, method="kpcacam", layer="feat", kernel=kernel, gamma=gamma)
    points = x[0].flatten(1).T.double().numpy()
    points = points - points.mean(0)
    expected = sklearn.KernelPCA(n_components=1, kernel=kernel, gamma=gamma).fit_transform(points)[:, 0]
    np.testing.assert_allclose(res.raw[0].flatten().numpy(), expected, atol=1e-5, rtol=1e-4)


def test_linear_kpcacam_is_eigencam(tiny, image_batch):
    """Kernel PCA with the linear kernel is PCA, with the same sign rule: the same map, scale included."""
    linear = explain(tiny, image_batch, method="kpcacam", layer="relu1", kernel="linear")
    eigen = explain(tiny, image_batch, method="eigencam", layer="relu1")
    torch.testing.assert_close(linear.raw, eigen.raw, atol=1e-5, rtol=1e-4)


class Curved(nn.Module):
    """score_c = sum_k w_ck mean_ij (A_kij + A_kij^2): a Hessian ``2 w_ck / (h w)`` on the diagonal."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(channels, 2)

    def forward(self, x):
        a = self.feat(x)
        return self.fc((a + a * a).mean((2, 3)))


def test_shapleycam_subtracts_half_the_hessian_times_the_activations():
    torch.manual_seed(0)
    model = Curved().eval()
    x = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(2))
    res = explain(model, x, method="shapleycam", layer="feat", target=1)
    w, a = model.fc.weight[1].detach().view(-1, 1, 1), x[0]
    # G = w (1 + 2A) / hw and H A = 2 w A / hw, so mean_ij (G - H A / 2) = w (1 + mean A) / hw
    weights = w * (1 + a.mean((1, 2), keepdim=True)) / a[0].numel()
    torch.testing.assert_close(res.raw[0], (weights * a).sum(0))
    gradcam = explain(model, x, method="gradcam", layer="feat", target=1)
    assert (res.maps - gradcam.maps).abs().max() > 1e-2


def test_shapleycam_is_gradcam_where_the_rest_of_the_network_is_piecewise_linear(tiny, image_batch):
    shapley = explain(tiny, image_batch, method="shapleycam", layer="relu1", target=0)
    gradcam = explain(tiny, image_batch, method="gradcam", layer="relu1", target=0)
    torch.testing.assert_close(shapley.raw, gradcam.raw)


def test_finer_score_weighs_the_nearest_classes_by_their_probabilities():
    logits = torch.tensor([[3.0, 2.5, 0.0, 2.9, -1.0]])
    score = FinerScore(ClassLogits([0]), alpha=0.6, similar=3)(logits)
    p = np.exp([3.0, 2.5, 0.0, 2.9, -1.0])
    p /= p.sum()
    nearest = [3, 1, 2]  # |z - 3| = 0.1, 0.5, 3.0 (class 4 is 4 away)
    z = logits[0].numpy()
    expected = sum(p[j] * (z[0] - 0.6 * z[j]) for j in nearest) / sum(p[j] for j in nearest)
    assert float(score) == pytest.approx(expected, rel=1e-6)


def test_finercam_without_comparison_strength_is_gradcam(tiny, image_batch):
    finer = explain(tiny, image_batch, method="finercam", layer="relu2", target=[1, 2], alpha=0.0)
    gradcam = explain(tiny, image_batch, method="gradcam", layer="relu2", target=[1, 2])
    torch.testing.assert_close(finer.raw, gradcam.raw, atol=1e-6, rtol=1e-5)
    compared = explain(tiny, image_batch, method="finercam", layer="relu2", target=[1, 2])  # alpha=1
    assert (compared.raw - gradcam.raw).abs().max() > 1e-4


def _completeness_gap(model: nn.Module, x: torch.Tensor, target: int, biases: str) -> float:
    """FullGrad's decomposition of a ReLU network: ``z_c = x . dz/dx + sum_l b_l . dz/dz_l + fc bias``."""
    found = bias_layers(cl.load_model(model), biases)
    x = x.clone().requires_grad_()
    with cl.capture(model, list(found), graph=True) as rec:
        logit = rec.forward(x)[0, target]
        grads = torch.autograd.grad(logit, [x] + [rec.outputs[name] for name in found])
    total = (grads[0] * x).sum() + model.fc.bias[target]
    for grad, bias in zip(grads[1:], found.values()):
        total = total + (grad * bias.view(1, -1, 1, 1)).sum()
    return float((total - logit).abs())


def test_fullgrad_bias_gradients_complete_the_logit(tiny, image_batch):
    tiny.eval()
    assert list(bias_layers(cl.load_model(tiny))) == ["conv1", "bn", "conv2"]
    assert _completeness_gap(tiny, image_batch[:1], 1, "all") < 1e-5  # the BatchNorm's folded bias included


class FusedNorm(nn.Module):
    """A convolution without bias and timm's BatchNorm with its ReLU inside: the bias is read before the ReLU."""

    def __init__(self):
        super().__init__()
        from timm.layers import BatchNormAct2d

        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = BatchNormAct2d(4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.norm(self.conv(x))).flatten(1))


def test_fullgrad_reads_a_fused_batchnorm_before_its_activation(image_batch):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = FusedNorm().eval()
    with torch.no_grad():
        model.norm.bias.uniform_(-1, 1)
        model.norm.running_mean.uniform_(-0.5, 0.5)
    assert list(bias_layers(cl.load_model(model))) == ["norm.drop"]
    assert _completeness_gap(model, image_batch[:1], 0, "all") < 1e-5
    assert bias_layers(cl.load_model(model), "exact") == {}  # pytorch-grad-cam's choice: the term is missing
    assert _completeness_gap(model, image_batch[:1], 0, "exact") > 1e-3


def _rescaled(t: torch.Tensor, dims) -> torch.Tensor:
    t = t.abs()
    t = t - t.amin(dims, keepdim=True)
    return t / (t.amax(dims, keepdim=True) + 1e-7)


@pytest.mark.parametrize("rescale,dims", [("channel", (2, 3)), ("layer", (1, 2, 3))])
def test_fullgrad_sums_the_rescaled_input_and_bias_terms(rescale, dims):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 3)).eval()
    x = torch.randn(1, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    res = explain(model, x, method="fullgrad", target=2, rescale=rescale)
    leaf = x.clone().requires_grad_()
    conv_out = model[0](leaf)
    logit = model[4](model[2](model[1](conv_out)).flatten(1))[0, 2]
    grad_x, grad_z = torch.autograd.grad(logit, [leaf, conv_out])
    expected = _rescaled(grad_x * x, dims).sum(1) + _rescaled(grad_z * model[0].bias.view(1, -1, 1, 1), dims).sum(1)
    torch.testing.assert_close(res.raw, expected.detach())
    assert res.layer is None


def test_smoothgradcampp_without_noise_is_the_closed_form_on_the_clean_gradient(tiny, image_batch):
    tiny.eval()
    pre, grad = _conv2_gradient(tiny, image_batch, 0)
    alpha = grad ** 2 / (2 * grad ** 2 + (grad ** 3 * pre).sum((2, 3), keepdim=True) + 1e-8)
    expected = ((alpha * grad.clamp(min=0)).sum((2, 3), keepdim=True) * pre).sum(1)
    for like_torchcam in (False, True):  # without noise the last pass is the clean one
        res = explain(tiny, image_batch, method="smoothgradcam++", layer="conv2", target=0, stdev=0.0, n_samples=2,
                      like_torchcam=like_torchcam)
        torch.testing.assert_close(res.raw, expected)


def test_smoothgradcampp_noise_follows_the_seed(tiny, image_batch):
    runs = [explain(tiny, image_batch, method="smoothgradcam++", layer="conv2", seed=seed).raw for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def _masked_scores(model: nn.Module, x: torch.Tensor, masks: torch.Tensor, target: int) -> torch.Tensor:
    with torch.no_grad():
        return model(x * masks.unsqueeze(1))[:, target]


def test_iscam_integrates_each_mask_over_torchcams_growing_strengths():
    first = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    second = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    x = torch.stack([first, second]).unsqueeze(0)
    torch.manual_seed(0)
    model = Features(channels=2).eval()
    res = explain(model, x, method="iscam", layer="feat", target=1, n_samples=3)
    masks = torch.stack([first, second / 4])  # min-max per channel at the layer's (here the input's) size
    strengths = [1 / 3, 1 / 3 + 2 / 3, 1 / 3 + 2 / 3 + 3 / 3]
    scores = torch.stack([_masked_scores(model, x, c * masks, 1) for c in strengths]).mean(0)
    weights = torch.softmax(scores, 0)
    torch.testing.assert_close(res.raw[0], weights[0] * first + weights[1] * second)


def test_sscam_averages_the_scores_of_noisy_masks_drawn_from_the_seed():
    first = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    second = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    x = torch.stack([first, second]).unsqueeze(0)
    torch.manual_seed(0)
    model = Features(channels=2).eval()
    res = explain(model, x, method="sscam", layer="feat", target=0, n_samples=2, stdev=0.5, seed=3)
    masks = torch.stack([first, second / 4])
    generator = torch.Generator().manual_seed(3)
    noisy = [masks + 0.5 * torch.randn((1, 2, 2, 2), generator=generator)[0] for _ in range(2)]
    weights = torch.softmax(torch.stack([_masked_scores(model, x, m, 0) for m in noisy]).mean(0), 0)
    torch.testing.assert_close(res.raw[0], weights[0] * first + weights[1] * second)


@pytest.mark.parametrize("method", ["sscam", "iscam"])
def test_noise_scorecams_in_small_batches_and_top_k(tiny, image_batch, method):
    whole = explain(tiny, image_batch, method=method, layer="relu2", n_samples=2, batch_size=1000)
    chunked = explain(tiny, image_batch, method=method, layer="relu2", n_samples=2, batch_size=3)
    torch.testing.assert_close(chunked.raw, whole.raw, atol=1e-6, rtol=1e-5)
    every = explain(tiny, image_batch, method=method, layer="relu2", n_samples=2, top_k=8)  # 8 = all channels
    torch.testing.assert_close(every.raw, whole.raw, atol=1e-6, rtol=1e-5)


def test_kpcacam_refuses_a_layer_whose_kernel_would_not_fit(tiny):
    with pytest.raises(cl.ConvlensError, match=r"layer 'relu2' has 65x65 = 4225 positions, more than") as err:
        explain(tiny, torch.rand(1, 3, 65, 65), method="kpcacam", layer="relu2")  # refused before any kernel
    assert "\n" not in str(err.value)
    with pytest.raises(cl.ConvlensError, match=r"9x9 = 81 positions, more than max_positions=80"):
        explain(tiny, torch.rand(1, 3, 9, 9), method="kpcacam", layer="relu2", max_positions=80)
    fits = explain(tiny, torch.rand(1, 3, 9, 9), method="kpcacam", layer="relu2", max_positions=81)
    assert fits.maps.shape == (1, 9, 9)


@pytest.mark.parametrize("method,options,match", [
    ("sscam", {"n_samples": 0}, "sscam needs n_samples >= 1"),
    ("sscam", {"stdev": -0.1}, "stdev >= 0"),
    ("iscam", {"top_k": 0}, "iscam needs n_samples >= 1"),
    ("smoothgradcam++", {"n_samples": 0}, "n_samples >= 1 and stdev >= 0"),
    ("smoothgradcam++", {"stdev": -1.0}, "n_samples >= 1 and stdev >= 0"),
    ("fem", {"k": float("inf")}, "finite number of standard deviations"),
    ("kpcacam", {"kernel": "laplace"}, "unknown kpcacam kernel 'laplace'; choose from sigmoid"),
    ("kpcacam", {"gamma": 0.0}, "gamma must be positive"),
    ("fullgrad", {"rescale": "pixel"}, "rescale is 'channel' or 'layer'"),
    ("fullgrad", {"biases": "some"}, "biases is 'all' or 'exact'"),
    ("finercam", {"similar": 0}, "similar >= 1"),
])
def test_bad_options_are_one_line(tiny, image_batch, method, options, match):
    with pytest.raises(cl.ConvlensError, match=match) as err:
        explain(tiny, image_batch, method=method, **options)
    assert "\n" not in str(err.value)


def test_finercam_refuses_a_target_that_is_not_a_class(tiny, image_batch):
    with pytest.raises(cl.ConvlensError, match="finercam compares a class .* cannot serve a") as err:
        explain(tiny, image_batch, method="finercam", target=lambda out: out[:, 0] - out[:, 1])
    assert "\n" not in str(err.value)


def test_fullgrad_refuses_a_keras_model():
    pytest.importorskip("keras")
    from zoo_models import flatten_dense_keras

    with pytest.raises(cl.ConvlensError, match="which a Keras model does not have") as err:
        explain(cl.load_model(flatten_dense_keras()), torch.rand(1, 32, 32, 3), method="fullgrad")
    assert "\n" not in str(err.value)


def test_explain_cli_writes_the_apis_maps_for_every_new_method(cli, tmp_path):
    torch.manual_seed(0)
    model_file = tmp_path / "tiny.pt"
    torch.save(TinyNet(), model_file)
    picture = tmp_path / "pic.png"
    from PIL import Image

    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "maps"
    code, _, err = cli("explain", model_file, picture, "--methods", ",".join(NEW), "--out", out, "--trust-code",
                       "--input-size", "32")
    assert code == 0, err
    files = {row["method"]: row["file"] for row in json.loads((out / "index.json").read_text())
             if row["file"].endswith(".npy")}
    model = cl.load_model(model_file, trust_code=True, input_size=32)
    for method in NEW:
        api = explain(model, [Image.open(picture)], method=method)
        np.testing.assert_allclose(np.load(out / files[method]), api.raw[0].numpy(), rtol=1e-5, atol=1e-6)
