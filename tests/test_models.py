import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

import convlens as cl
from convlens.models import summarize

from conftest import TinyNet


@pytest.mark.parametrize("name,total", [("resnet18", 11_689_512), ("mobilenet_v3_large", 5_483_032),
                                        ("vgg11", 132_863_336)])
def test_layer_table_matches_torchvision_totals(name, total):
    model = cl.load_model(name, weights="none")
    summary = summarize(model)
    assert summary.total_params == total
    assert summary.trainable_params == total


def test_layer_table_shapes_and_auto_layer():
    model = cl.load_model("resnet18", weights="none")
    summary = summarize(model)
    rows = {r.name: r for r in summary.rows}
    assert rows["layer4"].output_shape == (-1, 512, 7, 7) and rows["layer4"].spatial
    assert rows["layer1.0.conv1"].params == 64 * 64 * 9
    assert rows["avgpool"].output_shape == (-1, 512, 1, 1) and not rows["avgpool"].spatial
    assert rows["fc"].output_shape == (-1, 1000) and rows["fc"].params == 513_000
    assert summary.auto_layer == "layer4"
    # a smaller input shrinks every map; at 32 px layer4 is 1x1 and auto falls back to layer3
    small = summarize(model, (32, 32))
    assert {r.name: r for r in small.rows}["layer4"].output_shape == (-1, 512, 1, 1)
    assert small.auto_layer == "layer3"


def test_vgg_auto_layer_is_the_feature_stack():
    assert summarize(cl.load_model("vgg11", weights="none")).auto_layer == "features"


def test_default_weights_come_through_torchvisions_weights_api(tmp_path, monkeypatch):
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    torch.manual_seed(3)
    reference = torchvision.models.resnet18().eval()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(reference.state_dict(), cache / Path(weights.url).name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = cl.load_model("resnet18")
    assert model.labels[281] == "tabby"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


def test_failed_download_is_a_one_line_error(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(cl.ConvlensError, match="--weights none") as err:
        cl.load_model("resnet18")
    assert "\n" not in str(err.value)


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    path = tmp_path / "weights.pth"
    torch.save(net.state_dict(), path)
    x = torch.randn(1, 3, 64, 64)
    expected = net(x)
    for model in (cl.load_model(path, arch="resnet18"), cl.load_model("resnet18", weights=path)):
        with torch.no_grad():
            assert torch.equal(model(x), expected)


def test_torchscript_and_pickled_module(tmp_path, tiny, image_batch):
    tiny.eval()
    expected = tiny(image_batch)
    torch.jit.save(torch.jit.script(tiny), tmp_path / "tiny.ts")
    torch.save(tiny, tmp_path / "tiny.pt")
    for name in ("tiny.ts", "tiny.pt"):
        model = cl.load_model(tmp_path / name, trust_code=name == "tiny.pt")  # the pickled module needs the opt-in
        with torch.no_grad():
            torch.testing.assert_close(model(image_batch), expected)


def test_in_memory_module_and_softmax_detection(image_batch):
    net = torch.nn.Sequential(TinyNet(), torch.nn.Softmax(dim=1))
    model = cl.load_model(net)
    assert model.output == "softmax"
    with cl.capture(model, rewrite=model.logit_rewrites()) as rec, torch.no_grad():
        logits = rec.forward(image_batch)
    with torch.no_grad():
        torch.testing.assert_close(logits, net[0].eval()(image_batch))


@pytest.mark.parametrize("content,match", [
    (b"not a model at all", "cannot read"),
    (None, "does not fit architecture resnet18"),
])
def test_bad_weights_files(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    if content is None:
        torch.save(TinyNet().state_dict(), path)
    else:
        path.write_bytes(content)
    with pytest.raises(cl.ConvlensError, match=match):
        cl.load_model("resnet18", weights=path)


def test_truncated_state_dict_file(tmp_path):
    path = tmp_path / "cut.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(cl.ConvlensError, match="cannot read"):
        cl.load_model(path, arch="resnet18")


def test_state_dict_without_arch_says_what_to_do(tmp_path):
    path = tmp_path / "sd.pth"
    torch.save(TinyNet().state_dict(), path)
    with pytest.raises(cl.ConvlensError, match="--arch"):
        cl.load_model(path)


def test_unknown_model_name_suggests_close_names():
    with pytest.raises(cl.ConvlensError, match="resnet18"):
        cl.load_model("resnet19")


def test_predict_names_classes_from_weights_metadata(tmp_path, monkeypatch):
    model = cl.load_model("resnet18", weights="none")
    preds = model.predict(cl.sample_image("chelsea"), top_k=3)
    assert len(preds[0]) == 3
    probs = [p.probability for p in preds[0]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1
    assert preds[0][0].label == model.labels[preds[0][0].index]


def test_single_logit_is_a_binary_probability():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(2, 1))
    model = cl.load_model(net, labels=["cat", "dog"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        p = torch.sigmoid(net(x)).item()
    preds = model.predict(x, top_k=2)[0]
    assert {q.label: q.probability for q in preds} == pytest.approx({"dog": p, "cat": 1 - p})


def test_normalisation_needs_both_mean_and_std():
    from convlens.models.transforms import make_transform

    with pytest.raises(cl.ConvlensError, match="a mean without a std"):
        make_transform((32, 32), mean=(0.5, 0.5, 0.5), source="convlens checkpoint")
    with pytest.raises(cl.ConvlensError, match="a std without a mean"):
        make_transform((32, 32), std=(0.5, 0.5, 0.5), crop=0.875)
    _, described = make_transform((32, 32), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert described.endswith("mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25)")
