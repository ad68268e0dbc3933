"""Models nobody here wrote: several outputs, transformers, channels-last stages, NaN weights, other input sizes.

Each test pins a defect users met (issue: "the models and files users bring"): the
behaviour before the fix is named in the test's docstring.
"""

from __future__ import annotations

import collections
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens.capture import spatial_view
from convlens.models.transforms import crop_box

from conftest import TinyNet
from test_heatmaps_reference import Logit, _peer_cam, minmax

Heads = collections.namedtuple("Heads", ["scores", "boxes"])


class TwoHeads(nn.Module):
    """TinyNet's body with a class head and a box head, returned as ``kind`` (tuple, list, dict, namedtuple)."""

    def __init__(self, kind: str = "tuple"):
        super().__init__()
        torch.manual_seed(0)
        self.body = TinyNet()
        self.boxes = nn.Linear(8, 4)
        self.kind = kind

    def forward(self, x):
        b = self.body
        features = b.pool(b.relu2(b.conv2(b.relu1(b.bn(b.conv1(x)))))).flatten(1)
        scores, boxes = b.fc(features), self.boxes(features)
        if self.kind == "dict":
            return {"logits": scores, "boxes": boxes}
        if self.kind == "named":
            return Heads(scores, boxes)
        return [scores, boxes] if self.kind == "list" else (scores, boxes)


def _single_head(two: TwoHeads) -> nn.Module:
    return two.body  # the same weights, one output: the reference answer


@pytest.fixture
def x16() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


# -- several outputs ---------------------------------------------------------------

def test_a_tuple_output_without_a_choice_is_one_line_listing_the_outputs(x16):
    """Before: AttributeError: 'tuple' object has no attribute 'detach' in predict and explain."""
    model = cl.load_model(TwoHeads("tuple"), input_size=16)
    for call in (lambda: model.predict(x16), lambda: cl.explain(model, x16, method="gradcam")):
        with pytest.raises(cl.ConvlensError, match=r"returns 2 outputs \(0: \(2, 3\), 1: \(2, 4\)\).*--output") as err:
            call()
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind,key", [("tuple", 0), ("list", "0"), ("named", "scores"), ("dict", None)])
def test_the_chosen_output_explains_like_the_single_output_model(x16, kind, key):
    """A dict with a 'logits' entry needs no choice; otherwise output= picks the class scores."""
    two = TwoHeads(kind)
    model = cl.load_model(two, input_size=16, output=key)
    single = cl.load_model(_single_head(two), input_size=16)
    ours = cl.explain(model, x16, method="gradcam", layer="body.conv2")
    reference = cl.explain(single, x16, method="gradcam", layer="conv2")
    assert ours.targets == reference.targets
    assert torch.allclose(ours.raw, reference.raw, atol=1e-6)
    theirs = [[(p.index, p.probability) for p in row] for row in single.predict(x16, top_k=3)]
    assert [[(p.index, p.probability) for p in row] for row in model.predict(x16, top_k=3)] == theirs
    deletion = cl.metrics.deletion(model, x16, ours.maps, step=64)
    assert torch.allclose(deletion.auc, cl.metrics.deletion(single, x16, ours.maps, step=64).auc)


def test_a_callable_target_receives_the_whole_output(x16):
    """The box head's first coordinate, explained without choosing an output."""
    two = TwoHeads("tuple")
    model = cl.load_model(two, input_size=16)
    res = cl.explain(model, x16, method="gradcam", layer="body.conv2", target=lambda out: out[1][:, 0])
    act = cl.activations(model, x16, ["body.conv2"])["body.conv2"]
    # Grad-CAM by hand: the box head reads GAP(ReLU(conv2)); d box0 / d conv2 = W_box[0] / (h*w) where ReLU passes.
    grad = (act > 0).float() * two.boxes.weight[0].detach().view(1, -1, 1, 1) / 256
    expected = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(1)
    assert res.targets == [-1, -1]
    assert torch.allclose(res.raw, expected, atol=1e-6)


def test_unknown_output_key_lists_the_outputs(x16):
    model = cl.load_model(TwoHeads("dict"), input_size=16, output="scores")
    with pytest.raises(cl.ConvlensError, match=r"no output 'scores'; it returns logits: \(2, 3\), boxes: \(2, 4\)"):
        model.predict(x16)


# -- transformers and channels-last stages -------------------------------------------

@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()


def _vit_reshape(tensor, h=4, w=4):
    return tensor[:, 1:, :].reshape(tensor.shape[0], h, w, tensor.shape[2]).permute(0, 3, 1, 2)


def test_vit_auto_layer_is_a_patch_grid_the_output_depends_on(vit):
    """Before: auto was blocks.11.attn.k_norm, heads x tokens x dims read as channels x height x width."""
    model = cl.load_model(vit)
    summary = cl.summarize(model)
    assert model.input_size == (64, 64)  # the size the ViT was built for, not its config's 224
    assert summary.auto_layer == "blocks.11.norm1"
    layouts = {row.name: row.layout for row in summary.rows}
    assert layouts["blocks.11.norm1"] == "tokens"
    assert layouts["blocks.11.attn.k_norm"] == ""  # (N, heads, tokens, dims) is no map
    with pytest.raises(cl.ConvlensError, match="has no spatial output"):
        cl.explain(model, torch.randn(1, 3, 64, 64), method="gradcam", layer="blocks.11.attn.k_norm")


def test_vit_gradcam_matches_pytorch_grad_cam_with_its_reshape_transform(vit):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ours = cl.explain(vit, x, method="gradcam", layer="auto")
    assert ours.layer == "blocks.11.norm1" and ours.raw.shape == (2, 4, 4) and not any(ours.flat)
    theirs = _peer_cam("gradcam", vit, vit.blocks[-1].norm1, x, [Logit(t) for t in ours.targets], (4, 4),
                       reshape=_vit_reshape)
    assert (minmax(ours.raw) - theirs).abs().max() <= 1e-3


def test_hybrid_vit_auto_layer_and_every_cnn_stage_are_maps():
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, img_size=64).eval()
    summary = cl.summarize(cl.load_model(net))
    assert summary.auto_layer == "blocks.11.norm1"
    layouts = {row.name: row.layout for row in summary.rows}
    assert layouts["patch_embed.backbone.conv"] == "channels_first"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ours = cl.explain(net, x, method="gradcam")
    assert ours.raw.shape == (2, 2, 2) and not any(ours.flat)
    theirs = _peer_cam("gradcam", net, net.blocks[-1].norm1, x, [Logit(t) for t in ours.targets], (2, 2),
                       reshape=lambda tensor: _vit_reshape(tensor, 2, 2))
    assert (minmax(ours.raw) - theirs).abs().max() <= 1e-3


class ChannelsLastStage(nn.Module):
    """conv -> (N, H, W, C) -> LayerNorm over C -> pooled head: a Swin/ConvNeXt-style stage output."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.head(y.mean(dim=(1, 2)))


def test_a_channels_last_stage_output_is_read_as_a_map():
    net = ChannelsLastStage().eval()
    x = torch.randn(2, 3, 20, 12, generator=torch.Generator().manual_seed(4))
    res = cl.explain(net, x, method="gradcam", layer="norm")
    with torch.no_grad():
        act = net.norm(net.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # (N, 6, 10, 6)
    weights = net.head.weight[res.targets].detach() / 60  # d logit / d act = W / (h*w), averaged = W / (h*w)
    expected = torch.einsum("nc,nchw->nhw", weights, act)
    assert res.raw.shape == (2, 10, 6)
    assert torch.allclose(res.raw, expected, atol=1e-6)


def test_spatial_view_rules():
    size = (64, 48)
    first = torch.zeros(2, 32, 16, 12)
    assert spatial_view(first, size).kind == "channels_first"
    assert spatial_view(first.permute(0, 2, 3, 1), size).kind == "channels_last"
    tokens = torch.arange(2 * 13 * 5.0).view(2, 13, 5)  # class token + a 4x3 grid
    view = spatial_view(tokens, size)
    assert view.kind == "tokens" and view.prefix == 1 and view.map.shape == (2, 5, 4, 3)
    assert torch.equal(view.map[0, :, 0, 1], tokens[0, 2])  # token 1 + 1 is row 0, column 1
    assert torch.equal(view.restore(view.map, tokens), tokens)
    assert spatial_view(torch.zeros(2, 3, 197, 64), size) is None  # attention: heads x tokens x dims
    assert spatial_view(torch.zeros(2, 10), size) is None
    assert spatial_view(torch.zeros(8, 32, 16, 12), size, batch=2) is None  # windows folded into the batch


# -- NaN weights -----------------------------------------------------------------------

@pytest.fixture
def nan_net() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet().eval()
    with torch.no_grad():
        net.conv2.weight[0, 0, 0, 0] = float("nan")
    return net


def test_a_model_whose_output_is_not_finite_names_the_first_layer(nan_net, x16):
    """Before: NaN .npy files, eigencam LinAlgError, predict printing nan with exit 0."""
    model = cl.load_model(nan_net, input_size=16)
    for call in (lambda: model.predict(x16), lambda: cl.explain(model, x16, method="gradcam"),
                 lambda: cl.explain(model, x16, method="eigencam")):
        with pytest.raises(cl.ConvlensError, match="not finite.*first layer whose output is not finite is 'conv2'"):
            call()


def test_cli_predict_on_nan_weights_exits_2(nan_net, tmp_path):
    path = tmp_path / "nan.pt"
    torch.save(nan_net.state_dict(), path)
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(tmp_path / "grey.png")
    code = ("import sys, torch; sys.path.insert(0, 'tests'); from conftest import TinyNet; "
            "from convlens.models import ARCHITECTURES; ARCHITECTURES['tinynet'] = TinyNet; "
            "from convlens.cli import main; main(sys.argv[1:])")
    done = subprocess.run([sys.executable, "-c", code, "predict", str(path), "--arch", "tinynet", "--input-size", "16",
                           str(tmp_path / "grey.png")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "'conv2'" in done.stderr


# -- input size and crop ---------------------------------------------------------------

def test_a_plain_module_runs_at_the_size_asked_for_and_is_not_cropped(tiny):
    """Before: in-memory modules always ran at 224 and overlays assumed ImageNet's centre crop."""
    model = cl.load_model(tiny, input_size=48)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 60, 3), dtype=np.uint8))
    assert model.input_size == (48, 48) and model.preprocess([picture]).shape == (1, 3, 48, 48)
    assert crop_box(model.transform, 60, 90) == (0.0, 0.0, 60.0, 90.0)
    assert "resize to 48x48" in model.preprocessing and "crop" not in model.preprocessing
    assert cl.load_model(tiny, input_size=(40, 24)).preprocess([picture]).shape == (1, 3, 40, 24)


def test_a_timm_model_brings_its_own_crop_and_normalisation():
    torch.manual_seed(0)
    net = timm.create_model("resnet18d", pretrained=False)
    model = cl.load_model(net)
    assert model.input_size == (224, 224)
    assert "centre crop 224x224" in model.preprocessing and "ImageNet mean/std" in model.preprocessing
    left, top, right, bottom = crop_box(model.transform, 300, 300)
    assert (right - left) == pytest.approx(300 * net.pretrained_cfg["crop_pct"], abs=1.5)


def _input_kind_model(kind: str, tiny) -> tuple[cl.Model, str]:
    if kind == "torch":
        return cl.load_model(tiny, input_size=16), "conv2"
    from test_keras import chollet_cats_vs_dogs

    return cl.load_model(chollet_cats_vs_dogs(16)), "conv2d"


@pytest.mark.parametrize("kind", ["torch", "keras"])
def test_every_entry_point_reads_each_input_kind_identically(kind, tiny, tmp_path):
    """One input contract: path, PIL, array, 3-D and 4-D tensor (in the model's layout) give the same logits."""
    from convlens.report import ReportImage, _as_report_image

    model, layer = _input_kind_model(kind, tiny)
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    path = tmp_path / "picture.png"
    picture.save(path)
    tensor = model.preprocess([picture])  # (1, 3, 16, 16) torch, (1, 16, 16, 3) Keras
    kinds = {"path": path, "pil": picture, "array": np.asarray(picture), "3-D": tensor[0], "4-D": tensor}
    expected = model.predict(tensor, top_k=2)
    maps = cl.explain(model, tensor, method="gradcam", layer=layer).maps
    acts = cl.activations(model, tensor, [layer])[layer]
    auc = cl.metrics.deletion(model, tensor, maps, step=64).auc
    for name, value in kinds.items():
        assert model.predict(value, top_k=2) == expected, name
        assert torch.equal(cl.explain(model, value, method="gradcam", layer=layer).maps, maps), name
        assert torch.equal(cl.activations(model, value, [layer])[layer], acts), name
        assert torch.equal(cl.metrics.deletion(model, value, maps, step=64).auc, auc), name
    for name in ("path", "pil", "array"):  # the report shows pictures: it reads these three kinds
        shown = _as_report_image(kinds[name])
        assert isinstance(shown, ReportImage) and model.predict([shown.image], top_k=2) == expected, name


def test_vit_ablationcam_zeroes_one_channel_of_the_patch_grid():
    """Ablation on a token layer zeroes channel k of every patch token, as the paper's formula says, by hand.

    (pytorch-grad-cam's AblationLayerVit departs from the paper here: it sets the channel to min - 1e7 when
    activations can be negative, and in the class token too, so it is not the reference for this case.)
    """
    from convlens.capture import capture

    torch.manual_seed(0)  # a narrow ViT (24 channels): one forward pass per channel by hand below
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, embed_dim=24, depth=2,
                            num_heads=2).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ours = cl.explain(vit, x, method="ablationcam", layer="blocks.1.norm1", batch_size=64)
    target = ours.targets[0]
    with torch.no_grad(), capture(vit, ["blocks.1.norm1"]) as rec:
        base = rec.forward(x)[0, target]
    acts = rec.outputs["blocks.1.norm1"][0]  # (C, 4, 4)
    weights = []
    for channel in range(acts.shape[0]):
        def zero(module, inputs, output, channel=channel):
            output = output.clone()
            output[:, 1:, channel] = 0  # the patch tokens; the class token is not on the grid
            return output

        with torch.no_grad(), capture(vit, rewrite={vit.blocks[-1].norm1: zero}) as rec:
            weights.append((base - rec.forward(x)[0, target]) / base)
    expected = torch.einsum("k,khw->hw", torch.stack(weights), acts)
    torch.testing.assert_close(ours.raw[0], expected, atol=1e-5, rtol=1e-4)


def test_a_vit_runs_at_its_own_size_and_refuses_another(vit):
    model = cl.load_model(vit)
    assert model.info["fixed_input_size"] and model.input_size == (64, 64)
    with pytest.raises(cl.ConvlensError, match="fixed input size of 64x64; it cannot run at another one"):
        cl.load_model(vit, input_size=96)
    with pytest.raises(cl.ConvlensError, match="cannot run on a 32x32 input"):
        cl.summarize(model, (32, 32))
