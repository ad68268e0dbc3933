"""Sanity checks (Adebayo et al. 2018): similarity measures, randomisation mechanics, the caller's model untouched."""

import copy

import numpy as np
import pytest
import torch

from convlens.capture import borrow
from convlens.errors import ConvlensError
from convlens.metrics import data_randomization, parameter_randomization, spearman, ssim
from convlens.metrics.sanity import parametrized_layers, randomize_layer
from convlens.models.loading import from_module


def saliency(model, x, targets):
    """|d score / d input| summed over channels: a model-dependent explain_fn built on autograd."""
    x = x.clone().requires_grad_()
    with borrow(model.module) as module, torch.enable_grad():
        scores = module(x).gather(1, targets.view(-1, 1)).sum()
        grad, = torch.autograd.grad(scores, x)
    return grad.abs().sum(1)


def input_magnitude(model, x, targets):
    """An explain_fn that ignores the model entirely (input magnitude): it must fail the sanity check."""
    return x.abs().sum(1)


def test_spearman_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 6, 6), generator=g).float()  # many ties
    b = a + torch.randint(0, 3, (3, 6, 6), generator=g).float()
    expected = [spearmanr(a[i].flatten(), b[i].flatten()).statistic for i in range(3)]
    np.testing.assert_allclose(spearman(a, b).numpy(), expected, rtol=1e-5)
    assert spearman(a, torch.ones_like(a)).tolist() == [0.0, 0.0, 0.0]  # a flat map has no ranking


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 20, 24, generator=g)
    b = (a + 0.3 * torch.rand(2, 20, 24, generator=g)) / 1.3
    expected = []
    for i in range(2):
        na = (a[i] - a[i].min()) / (a[i].max() - a[i].min())
        nb = (b[i] - b[i].min()) / (b[i].max() - b[i].min())
        expected.append(structural_similarity(na.double().numpy(), nb.double().numpy(), gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False, data_range=1.0))
    np.testing.assert_allclose(ssim(a, b).numpy(), expected, rtol=1e-5)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])


def test_layers_are_listed_in_forward_order(tiny, image_batch):
    assert parametrized_layers(tiny, image_batch) == ["conv1", "bn", "conv2", "fc"]


def test_randomize_layer_keeps_scale_and_is_seeded(tiny):
    layer = copy.deepcopy(tiny.conv2)
    before = layer.weight.detach().clone()
    randomize_layer(layer, torch.Generator().manual_seed(0))
    assert not torch.allclose(layer.weight, before)
    assert layer.weight.std().item() == pytest.approx(before.std().item(), rel=0.2)
    again = copy.deepcopy(tiny.conv2)
    randomize_layer(again, torch.Generator().manual_seed(0))
    assert torch.equal(again.weight, layer.weight)


@pytest.mark.parametrize("mode", ["cascading", "independent"])
def test_each_step_equals_the_model_randomised_by_hand(tiny, image_batch, mode):
    targets = torch.tensor([0, 1])
    result = parameter_randomization(tiny, image_batch, targets, explain_fn=saliency, mode=mode, seed=5)
    assert result.layers == ["fc", "conv2", "bn", "conv1"]
    trained = saliency(from_module(tiny), image_batch, targets)
    torch.testing.assert_close(result.original, trained)
    by_hand = copy.deepcopy(tiny)
    for step, name in enumerate(result.layers):
        if mode == "independent":
            by_hand = copy.deepcopy(tiny)
        randomize_layer(dict(by_hand.named_modules())[name], torch.Generator().manual_seed(5 + step))
        expected = saliency(from_module(by_hand), image_batch, targets)
        torch.testing.assert_close(result.maps[step], expected)
        torch.testing.assert_close(result.spearman_abs[step], spearman(trained, expected))
        torch.testing.assert_close(result.ssim[step], ssim(trained, expected))
    # a gradient map depends on the weights: fully randomised, it no longer ranks pixels as before
    if mode == "cascading":
        assert result.spearman_abs[-1].mean() < 0.9


def test_a_model_independent_method_fails_the_check(tiny, image_batch):
    result = parameter_randomization(tiny, image_batch, explain_fn=input_magnitude)
    assert all(row["spearman_abs"] == pytest.approx(1.0) and row["ssim"] == pytest.approx(1.0)
               for row in result.rows())


def test_the_callers_model_is_untouched(tiny, image_batch):
    tiny.train()
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    parameter_randomization(tiny, image_batch, explain_fn=saliency, mode="independent")
    parameter_randomization(tiny, image_batch, explain_fn=saliency, mode="cascading", layers=["conv2"])
    assert tiny.training and tiny.bn.training
    assert all(torch.equal(v, state[k]) for k, v in tiny.state_dict().items())


def test_data_randomization(tiny, image_batch):
    same = data_randomization(tiny, copy.deepcopy(tiny), image_batch, explain_fn=saliency)
    assert same["spearman_abs"].tolist() == pytest.approx([1.0, 1.0])
    other = copy.deepcopy(tiny)
    randomize_layer(other, torch.Generator().manual_seed(1))
    different = data_randomization(tiny, other, image_batch, explain_fn=saliency)
    assert (different["spearman_abs"] < 0.99).all()


@pytest.mark.parametrize("options,match", [
    ({"mode": "sideways"}, "unknown randomisation mode"),
    ({"layers": ["conv9"]}, "unknown layer 'conv9'; did you mean"),
    ({"layers": []}, "no layer with parameters"),
])
def test_bad_options_are_convlens_errors(tiny, image_batch, options, match):
    with pytest.raises(ConvlensError, match=match):
        parameter_randomization(tiny, image_batch, explain_fn=saliency, **options)


def test_ssim_needs_maps_as_large_as_its_window():
    with pytest.raises(ConvlensError, match="at least 11x11"):
        ssim(torch.rand(1, 8, 8), torch.rand(1, 8, 8))
