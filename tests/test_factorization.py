"""Deep Feature Factorization: equal to pytorch-grad-cam's, and right on a layer built from known concepts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from pytorch_grad_cam import DeepFeatureFactorization
from torch import nn

import convlens as cl
from convlens.errors import ConvlensError


def _reference(net, layer, x, components, head=None):
    concepts, maps, *scores = DeepFeatureFactorization(net, layer, computation_on_concepts=head)(x, components)
    return concepts, np.stack(maps), (scores[0] if scores else None)


def _close(ours, theirs, tolerance=1e-3):
    return np.abs(ours - theirs).max() <= tolerance * max(1.0, np.abs(theirs).max())


@pytest.mark.parametrize("arch,layer", [("resnet18", "layer4"), ("resnet18", "layer3"), ("vgg11", "features.19")])
def test_concepts_maps_and_class_scores_equal_pytorch_grad_cam(arch, layer):
    """(At vgg's conv features.18 the reference factorizes the in-place ReLU's output, which overwrote what its
    hook kept; convlens keeps a copy, so it is compared at the ReLU, features.19.)"""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = cl.factorize(cl.load_model(net, input_size=64), x, layer, components=3)
    head = net.fc if arch == "resnet18" and layer == "layer4" else None
    concepts, maps, scores = _reference(net, dict(net.named_modules())[layer], x, 3, head)
    assert _close(ours.concepts, concepts) and _close(ours.maps, maps)
    assert ours.maps.shape == (2, 3, 64, 64) and ours.layer == layer
    if head is not None:
        assert _close(ours.class_scores, scores)
        shares = torch.softmax(torch.as_tensor(scores), dim=1).numpy()
        assert [label for label, _ in ours.top_classes[1]][:2] == [f"class {c}" for c in np.argsort(-shares[1])[:2]]
    else:  # the head reads another layer (layer4's pool; vgg's 25088 flattened features): no classes, and why
        assert ours.class_scores is None and "channels, so its concepts cannot be scored" in ours.head_note
        assert ours.top_classes == [[], [], []]


class TwoConcepts(nn.Module):
    """A 1x1 convolution with non-negative weights over two indicator channels: the layer is exactly W @ H.

    Channel block 0 of the input marks the left half, block 1 the bottom right; the layer's C channels mix them
    through the columns of ``mix``; the head reads the global average, class k along concept k.
    """

    def __init__(self, mix: torch.Tensor):
        super().__init__()
        self.layer = nn.Conv2d(2, mix.shape[0], 1, bias=False)
        self.layer.weight.data = mix[:, :, None, None].clone()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(mix.shape[0], 3, bias=False)
        self.fc.weight.data = torch.cat([mix.T, -mix.sum(1, keepdim=True).T]) / mix.norm(dim=0).max()

    def forward(self, x):
        return self.fc(self.pool(self.layer(x[:, :2])).flatten(1))


def test_a_layer_made_of_two_known_concepts_is_split_into_them():
    mix = torch.rand(6, 2, generator=torch.Generator().manual_seed(0)) * 0.1  # concept A mostly in channels
    mix[:3, 0] += 1.0  # 0-2, concept B in 3-5: class a's weights point along A, b's along B
    mix[3:, 1] += 1.0
    net = TwoConcepts(mix).eval()
    x = torch.zeros(2, 3, 8, 8)
    x[:, 0, :, :4] = 1.0  # concept A: the left half
    x[0, 1, 4:, 4:] = 2.0  # concept B: the bottom right, stronger, in the first image only
    x[1, 1, :4, 4:] = 1.0  # ... and the top right in the second
    parts = cl.factorize(cl.load_model(net, input_size=8, labels=["a", "b", "neither"]), x, "layer", components=2)
    assert parts.error < 1e-3
    truth = {"a": x[:, 0] > 0, "b": x[:, 1] > 0}
    for k in range(2):
        found = parts.raw[:, k] > 0.05 * parts.raw[:, k].max()
        top = parts.top_classes[k][0][0]
        assert top in truth and np.array_equal(found, truth[top].numpy())  # each concept is where its class is
        column = mix[:, "ab".index(top)].numpy()
        direction = parts.concepts[:, k]
        assert direction @ column / (np.linalg.norm(direction) * np.linalg.norm(column)) > 0.999
    assert {parts.top_classes[0][0][0], parts.top_classes[1][0][0]} == {"a", "b"}
    assert parts.maps.max() == pytest.approx(1.0, abs=1e-6) and parts.maps.min() >= 0


def test_bad_requests_are_one_line(tiny):
    model = cl.load_model(tiny, input_size=16)
    x = torch.rand(1, 3, 16, 16)
    with pytest.raises(ConvlensError, match="components must be 1 to 64, not 0"):
        cl.factorize(model, x, components=0)
    with pytest.raises(ConvlensError, match="channels, fewer than the 64 concepts"):
        cl.factorize(model, x, components=64)
    with pytest.raises(ConvlensError, match="constant on these images"):
        cl.factorize(cl.load_model(TwoConcepts(torch.ones(4, 2)), input_size=8), torch.zeros(1, 3, 8, 8), "layer", 2)


def test_the_cli_writes_a_figure_per_image_and_the_concepts_it_found(cli, tiny, tmp_path):
    torch.save(tiny, tmp_path / "tiny.pt")
    picture = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(picture)
    out = tmp_path / "concepts"
    code, printed, err = cli("factorize", tmp_path / "tiny.pt", "--trust-code", "--input-size", "16", picture,
                             picture, "--components", "2", "--out", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["concepts.json", "noise-2_concepts.png", "noise_concepts.png"]
    table = json.loads((out / "concepts.json").read_text())
    model = cl.load_model(tmp_path / "tiny.pt", trust_code=True, input_size=16)
    api = cl.factorize(model, [picture, picture], components=2)
    assert table["layer"] == api.layer and table["components"] == 2
    assert [[c["class"] for c in concept["top_classes"]] for concept in table["concepts"]] == \
        [[label for label, _ in classes] for classes in api.top_classes]
    assert printed.splitlines()[0].startswith("concept 1")
    code, _, err = cli("factorize", tmp_path / "tiny.pt", "--trust-code", picture, "--components", "0",
                       "--out", tmp_path / "none")
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "none").exists()
