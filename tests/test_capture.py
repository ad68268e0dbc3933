import gc

import pytest
import torch
from torch import nn

import convlens as cl
from convlens.capture import capture

from conftest import TinyNet


def _state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [b.clone() for b in model.buffers()])


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def test_recorded_outputs_equal_layers_run_by_hand(tiny, image_batch):
    tiny.eval()
    with torch.no_grad():
        conv1 = tiny.conv1(image_batch)
        relu1 = torch.relu(tiny.bn(conv1))
        conv2 = tiny.conv2(relu1)
        logits = tiny.fc(torch.relu(conv2).mean((2, 3)))
    with capture(tiny, ["conv1", "conv2", "relu1"]) as rec:
        out = rec.forward(image_batch)
    torch.testing.assert_close(rec.outputs["conv1"], conv1)
    torch.testing.assert_close(rec.outputs["relu1"], relu1)
    # conv2 is followed by an in-place ReLU: the recording must keep the pre-ReLU values
    torch.testing.assert_close(rec.outputs["conv2"], conv2)
    assert (rec.outputs["conv2"] < 0).any()
    torch.testing.assert_close(out, logits)


def test_gradient_to_a_layer_matches_hand_computation(tiny, image_batch):
    tiny.eval()
    with capture(tiny, ["conv2"], graph=True) as rec:
        out = rec.forward(image_batch)
    acts = rec.outputs["conv2"]
    grad, = torch.autograd.grad(out[:, 1].sum(), acts)
    # d logit_1 / d conv2[c, i, j] = w[1, c] * 1[conv2 > 0] / (H * W)
    expected = tiny.fc.weight[1].view(1, -1, 1, 1) * (acts > 0) / (16 * 16)
    torch.testing.assert_close(grad, expected.detach())
    assert all(p.grad is None for p in tiny.parameters())


def test_graph_mode_works_under_no_grad_with_frozen_parameters(tiny, image_batch):
    for p in tiny.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        with capture(tiny, ["conv2"], graph=True) as rec:
            score = rec.forward(image_batch)[:, 0].sum()
            grad, = torch.autograd.grad(score, rec.outputs["conv2"])
    assert grad.abs().sum() > 0
    assert not any(p.requires_grad for p in tiny.parameters())


def test_stop_early_skips_later_layers(tiny, image_batch):
    calls = []
    tiny.fc.register_forward_pre_hook(lambda *a: calls.append("fc"))
    tiny.conv2.register_forward_pre_hook(lambda *a: calls.append("conv2"))
    with capture(tiny, ["conv1"], stop=True) as rec:
        assert rec.forward(image_batch) is None
    assert calls == [] and rec.outputs["conv1"].shape == (2, 4, 16, 16)


def test_hooks_removed_and_state_restored_after_success(tiny, image_batch):
    tiny.train()
    tiny.conv1.weight.requires_grad_(False)
    before, hooks = _state(tiny), _hook_count(tiny)
    with capture(tiny, ["conv1", "fc"], graph=True) as rec:
        assert not tiny.training and not tiny.bn.training
        rec.forward(image_batch)
    after = _state(tiny)
    assert _hook_count(tiny) == hooks
    assert before[0] == after[0] and before[1] == after[1]
    for b0, b1 in zip(before[2], after[2]):
        torch.testing.assert_close(b0, b1)


def test_hooks_removed_and_state_restored_after_exception(tiny, image_batch):
    tiny.train()
    before, hooks = _state(tiny), _hook_count(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(tiny, ["conv1"]) as rec:
            rec.forward(image_batch)
            tiny.bn.running_mean.add_(5.0)  # whatever happens inside, buffers come back
            raise RuntimeError("boom")
    after = _state(tiny)
    assert _hook_count(tiny) == hooks and before[0] == after[0] and before[1] == after[1]
    torch.testing.assert_close(before[2][0], after[2][0])


def test_exception_inside_the_forward_pass_removes_hooks(tiny):
    hooks = _hook_count(tiny)
    with pytest.raises(RuntimeError):
        with capture(tiny, ["conv1"]) as rec:
            rec.forward(torch.randn(1, 5, 8, 8))  # wrong channel count
    assert _hook_count(tiny) == hooks


def test_caller_input_is_not_modified(tiny, image_batch):
    copy = image_batch.clone()
    with capture(tiny, ["relu1"], graph=True) as rec:
        rec.forward(image_batch)
    assert torch.equal(copy, image_batch) and not image_batch.requires_grad


def test_unknown_layer_suggests_close_names(tiny):
    with pytest.raises(cl.ConvlensError, match="did you mean .*conv1"):
        with capture(tiny, ["convl"]):
            pass


def test_the_recorder_checks_that_a_layer_ran_and_gives_a_map(tiny, image_batch):
    tiny.unused = nn.Conv2d(3, 3, 1)  # registered, never called by forward
    with capture(tiny, ["conv2", "fc", "unused"]) as rec, torch.no_grad():
        rec.forward(image_batch)
    assert rec.spatial_output("conv2") is rec.outputs["conv2"]
    assert rec.spatial_outputs(["conv2"]) == {"conv2": rec.outputs["conv2"]}
    assert rec.output("fc").shape == (2, 3)
    with pytest.raises(cl.ConvlensError, match=r"^layer 'unused' did not run in the forward pass; choose a layer"):
        rec.spatial_outputs(["fc", "unused"])  # a layer that never ran is named before one that is flat
    with pytest.raises(cl.ConvlensError, match=r"^layer 'fc' has no spatial output \(shape \(2, 3\)\); "
                                                r"choose a convolutional layer such as 'conv2' \(see"):
        rec.spatial_output("fc", suggest=lambda: "conv2")


def test_memory_does_not_grow_in_a_loop(tiny, image_batch):
    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is torch.nn.Parameter)

    def once():
        with capture(tiny, ["conv2"], graph=True) as rec:
            out = rec.forward(image_batch)
        torch.autograd.grad(out[:, 0].sum(), rec.outputs["conv2"])

    once()
    start = live_tensors()
    for _ in range(100):
        once()
    assert live_tensors() <= start + 2
    assert _hook_count(tiny) == 0


def test_reused_module_records_its_last_call():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.act(x) - 1.0)

    x = torch.tensor([[2.0, 0.5]])
    with capture(Reuse(), ["act"]) as rec:
        rec.forward(x)
    torch.testing.assert_close(rec.outputs["act"], torch.tensor([[1.0, 0.0]]))


def test_module_and_name_references_are_equivalent():
    net = TinyNet()
    with capture(net, [net.conv2]) as rec:
        rec.forward(torch.randn(1, 3, 8, 8))
    assert list(rec.outputs) == ["conv2"]
