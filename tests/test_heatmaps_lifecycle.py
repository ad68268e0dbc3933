"""Every method borrows the model and gives it back: hooks, flags, buffers, inputs, also on failure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import convlens as cl
from convlens.heatmaps import METHODS, explain

from conftest import TinyNet

#: small option values so that the slower methods stay fast here
FAST = {"smoothgrad": {"n_samples": 3}, "integrated_gradients": {"steps": 4}, "shapley_sampling": {"n_samples": 2},
        "smoothgrad_sq": {"n_samples": 3}, "vargrad": {"n_samples": 3}, "gradient_shap": {"n_samples": 3},
        "deeplift_shap": {"n_baselines": 2}, "lime": {"n_samples": 8}, "kernel_shap": {"n_samples": 8},
        "smoothgradcam++": {"n_samples": 2}, "sscam": {"n_samples": 2}, "iscam": {"n_samples": 2}}


def _state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [b.clone() for b in model.buffers()])


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


def _assert_same_state(model, before, hooks):
    after = _state(model)
    assert _hook_count(model) == hooks
    assert before[0] == after[0] and before[1] == after[1]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture
def trained_tiny(tiny):
    tiny.train()
    tiny.conv1.weight.requires_grad_(False)
    return tiny


@pytest.mark.parametrize("method", list(METHODS))
def test_state_restored_and_input_untouched_after_success(trained_tiny, image_batch, method):
    before, hooks = _state(trained_tiny), _hook_count(trained_tiny)
    original = image_batch.clone()
    res = explain(trained_tiny, image_batch, method=method, **FAST.get(method, {}))
    _assert_same_state(trained_tiny, before, hooks)
    assert torch.equal(image_batch, original) and not image_batch.requires_grad
    assert res.maps.dtype == torch.float32 and not res.maps.requires_grad and res.raw.grad_fn is None
    assert torch.isfinite(res.maps).all() and res.maps.shape == (2, 16, 16)


@pytest.mark.parametrize("method", list(METHODS))
def test_state_restored_after_a_failure(trained_tiny, image_batch, method):
    before, hooks = _state(trained_tiny), _hook_count(trained_tiny)
    with pytest.raises(cl.ConvlensError, match="out of range"):
        explain(trained_tiny, image_batch, method=method, target=7)
    _assert_same_state(trained_tiny, before, hooks)


@pytest.mark.parametrize("method", list(METHODS))
def test_state_restored_after_a_failure_inside_the_model(trained_tiny, image_batch, method):
    """An exception raised in the middle of a forward pass, after the hooks are on."""

    def fail_later(module, inputs):
        raise RuntimeError("boom")

    handle = trained_tiny.conv2.register_forward_pre_hook(fail_later)
    before, hooks = _state(trained_tiny), _hook_count(trained_tiny)
    try:
        with pytest.raises(RuntimeError, match="boom"):  # the layer is named: no layer-finding pass first
            explain(trained_tiny, image_batch, method=method, layer="relu2", **FAST.get(method, {}))
        _assert_same_state(trained_tiny, before, hooks)
    finally:
        handle.remove()


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "saliency", "guided_gradcam"])
def test_same_maps_inside_no_grad_and_with_frozen_parameters(tiny, image_batch, method):
    expected = explain(tiny, image_batch, method=method)
    for p in tiny.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        inside = explain(tiny, image_batch, method=method)
    torch.testing.assert_close(inside.maps, expected.maps)
    with torch.inference_mode():
        torch.testing.assert_close(explain(tiny, image_batch, method=method).maps, expected.maps)


@pytest.mark.parametrize("method,options", [("scorecam", {}), ("scorecam", {"top_k": 5}), ("ablationcam", {}),
                                            ("smoothgrad", {"n_samples": 5}),
                                            ("integrated_gradients", {"steps": 7})])
def test_chunked_equals_unchunked(tiny, image_batch, method, options):
    whole = explain(tiny, image_batch, method=method, batch_size=1000, **options)
    chunked = explain(tiny, image_batch, method=method, batch_size=3, **options)
    torch.testing.assert_close(chunked.raw, whole.raw, atol=1e-6, rtol=1e-5)


def test_scorecam_scores_identical_masks_once(tiny, image_batch):
    """Dead channels share the zero mask: one forward pass for all of them."""
    with torch.no_grad():
        tiny.conv2.bias[:4] = -50.0  # four channels of the layer are all zero after the ReLU
    calls = []
    handle = tiny.fc.register_forward_hook(lambda module, inputs, output: calls.append(output.shape[0]))
    try:
        explain(tiny, image_batch[:1], method="scorecam", layer="relu2")
    finally:
        handle.remove()
    assert sum(calls) == 1 + (8 - 4 + 1)  # the clean pass, then 4 live channels and one zero mask


def test_in_place_relu_after_the_layer(tiny, image_batch):
    """conv2 is followed by an in-place ReLU: its recorded output must stay the pre-ReLU one."""
    res = explain(tiny, image_batch, method="hirescam", layer="conv2", target=1)
    tiny.eval()
    with torch.no_grad():
        pre = tiny.conv2(tiny.relu1(tiny.bn(tiny.conv1(image_batch))))
    grad = tiny.fc.weight[1].detach().view(1, -1, 1, 1) * (pre > 0) / 256
    torch.testing.assert_close(res.raw, (grad * pre).sum(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", ["gradcam", "scorecam", "saliency"])
def test_half_precision_model_gives_float32_maps(tiny, image_batch, dtype, method):
    expected = explain(tiny, image_batch, method=method, target=0)
    low = TinyNet().to(dtype)
    low.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tiny.state_dict().items()})
    try:
        res = explain(low, image_batch, method=method, target=0)
    except RuntimeError as err:  # a CPU build without the half kernels
        pytest.skip(f"{dtype} not supported on this CPU: {err}")
    assert res.maps.dtype == torch.float32 and res.raw.dtype == torch.float32
    assert torch.isfinite(res.maps).all()
    assert (res.maps - expected.maps).abs().mean() < 0.05


def test_repeated_calls_leave_nothing_behind(tiny, image_batch):
    hooks = _hook_count(tiny)
    for _ in range(10):
        res = explain(tiny, image_batch, method="gradcam", layer="relu2")
        assert res.raw.grad_fn is None and res.maps.grad_fn is None
    assert _hook_count(tiny) == hooks


@pytest.mark.parametrize("layer,method,match", [
    ("fc", "gradcam", "has no spatial output"),
    ("pool", "scorecam", "has no spatial output"),
    ("layer9", "gradcam", "unknown layer"),
    (["conv1", "conv2"], "scorecam", "takes one layer"),
])
def test_bad_layers(tiny, image_batch, layer, method, match):
    with pytest.raises(cl.ConvlensError, match=match):
        explain(tiny, image_batch, method=method, layer=layer)


def test_unknown_method_and_option(tiny, image_batch):
    with pytest.raises(cl.ConvlensError, match="did you mean 'gradcam'"):
        explain(tiny, image_batch, method="gradcm")
    with pytest.raises(cl.ConvlensError, match="no option 'n_samples'"):
        explain(tiny, image_batch, method="gradcam", n_samples=3)


def test_layercam_across_stages_averages_normalised_layers(tiny, image_batch):
    both = explain(tiny, image_batch, method="layercam", layer=["relu1", "relu2"])
    one = [explain(tiny, image_batch, method="layercam", layer=name).maps for name in ("relu1", "relu2")]
    assert both.layer == ["relu1", "relu2"]
    from convlens.heatmaps.base import normalise

    torch.testing.assert_close(both.maps, normalise((one[0] + one[1]) / 2)[0])


@pytest.mark.parametrize("layer,passes", [("relu2", 1), ("auto", 2)])
def test_a_one_off_gradcam_runs_the_model_once_on_a_named_layer(tiny, image_batch, layer, passes):
    """The target is settled on the method's own clean pass; only 'auto' needs a pass to find the layer."""
    calls = []
    handle = tiny.fc.register_forward_hook(lambda module, inputs, output: calls.append(1))
    try:
        explain(tiny, image_batch, method="gradcam", layer=layer)
    finally:
        handle.remove()
    assert len(calls) == passes
