"""``convlens explain``: the files it writes hold the API's values; bad input exits 2 and writes nothing."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens.cli import main

from conftest import TinyNet


def run(capsys, *args):
    """Run the CLI in this process (fast); return (exit code, stdout, stderr).

    The model files are pickled modules, so every command gets --trust-code.
    """
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args] + ["--trust-code"])
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("explain")
    torch.manual_seed(0)
    tiny = folder / "tiny.pt"
    torch.save(TinyNet(), tiny)
    no_gap = folder / "maxpool.pt"  # global MAX pooling: CAM is not defined
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
               no_gap)
    pictures = []
    for name, size, colour in (("red", (40, 30), (200, 30, 30)), ("noise", (50, 64), None)):
        path = folder / f"{name}.png"
        if colour is None:
            array = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(array).save(path)
        else:
            Image.new("RGB", size, colour).save(path)
        pictures.append(path)
    return {"tiny": tiny, "no_gap": no_gap, "pictures": pictures}


def test_writes_overlays_raw_maps_and_a_figure_per_image(capsys, tmp_path, files):
    out = tmp_path / "maps"
    code, stdout, err = run(capsys, "explain", files["tiny"], *files["pictures"], "--methods", "gradcam,gradcam++,saliency",
                            "--out", out, "--batch-size", "1", "--alpha", "0.5", "--colormap", "viridis")
    assert code == 0, err
    assert "layer: relu2 (auto)" in stdout
    expected = {f"{stem}_{m}.{ext}" for stem in ("red", "noise") for m in ("gradcam", "gradcampp", "saliency")
                for ext in ("png", "npy")} | {"red_explain.png", "noise_explain.png", "index.csv", "index.json"}
    assert {p.name for p in out.iterdir()} == expected
    model = cl.load_model(files["tiny"], trust_code=True)
    for path in files["pictures"]:
        original = Image.open(path)
        for method, slug in (("gradcam", "gradcam"), ("gradcam++", "gradcampp"), ("saliency", "saliency")):
            api = cl.explain(model, [original], method=method)
            np.testing.assert_allclose(np.load(out / f"{path.stem}_{slug}.npy"), api.raw[0].numpy(),
                                       rtol=1e-5, atol=1e-6)
            overlay = Image.open(out / f"{path.stem}_{slug}.png")
            assert overlay.size == original.size  # the original's full resolution, not the 224 crop
            expected_overlay = api.overlay([original], colormap="viridis", alpha=0.5)[0]
            assert np.array_equal(np.asarray(overlay.convert("RGB")), np.asarray(expected_overlay))
        assert Image.open(out / f"{path.stem}_explain.png").size[0] > 4 * 100


def test_one_target_per_image(capsys, tmp_path, files):
    out = tmp_path / "maps"
    code, _, err = run(capsys, "explain", files["tiny"], *files["pictures"], "--targets", "2,0", "--out", out)
    assert code == 0, err
    model = cl.load_model(files["tiny"], trust_code=True)
    api = cl.explain(model, [Image.open(files["pictures"][1])], method="gradcam", target=0)
    np.testing.assert_allclose(np.load(out / "noise_gradcam.npy"), api.raw[0].numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args,match", [
    (["--methods", "gradcm"], "unknown method 'gradcm'; did you mean 'gradcam'"),
    (["--layers", "fc"], "has no spatial output"),
    (["--layers", "layer9"], "unknown layer"),
    (["--targets", "9"], "out of range"),
    (["--targets", "0,1,2"], "3 classes for 2 images"),
    (["--methods", "gradcam,cam", "--model", "no_gap"], "global average pooling"),
    (["--colormap", "jett"], "unknown colormap"),
    (["--alpha", "2"], "between 0 and 1"),
    (["--picture", "missing.png"], "image not found"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, files, args, match):
    model = files["tiny"]
    pictures = list(files["pictures"])
    if "--model" in args:
        model = files[args[args.index("--model") + 1]]
        args = args[:args.index("--model")]
    if "--picture" in args:
        pictures.append(tmp_path / args[args.index("--picture") + 1])
        args = args[:args.index("--picture")]
    out = tmp_path / "maps"
    code, _, err = run(capsys, "explain", model, *pictures, *args, "--out", out)
    assert code == 2
    # a log may show the steps that ran before the error ("[1/2] explain: gradcam"); the error is one line
    errors = [line for line in err.strip().splitlines() if not re.match(r"\[\d+/\d+\] explain: ", line)]
    assert match in err and len(errors) == 1 and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("method,own_passes", [("gradcam", 1), ("saliency", 1), ("cam", 1)])
def test_one_checking_pass_plus_what_the_method_needs(capsys, files, tmp_path, monkeypatch, method, own_passes):
    """The check pass settles layer, target and the predicted class; nothing runs the model again for them."""
    torch.manual_seed(0)
    net = TinyNet()
    passes = []
    net.fc.register_forward_hook(lambda module, inputs, output: passes.append(output.shape[0]))
    monkeypatch.setattr("convlens.cli.common.ModelOptions.open", lambda self, source: cl.load_model(net, input_size=32))
    code, _, err = run(capsys, "explain", "tiny", files["pictures"][0], "--methods", method, "--out", tmp_path / "o")
    assert code == 0, err
    assert len(passes) == 1 + own_passes


def test_target_all_writes_the_per_class_grid(capsys, files, tmp_path):
    out = tmp_path / "all"
    code, stdout, err = run(capsys, "explain", files["tiny"], *files["pictures"], "--methods", "gradcam,cam",
                            "--targets", "all", "--out", out)
    assert code == 0, err
    stem = files["pictures"][0].stem
    raw = np.load(out / f"{stem}_gradcam.npy")
    net = torch.load(files["tiny"], weights_only=False)
    expected = cl.explain(net, cl.load_model(net).preprocess([files["pictures"][0]]), method="gradcam",
                          target="all").raw[0]
    assert raw.shape == (3, *expected.shape[1:]) and np.allclose(raw, expected.numpy(), atol=1e-6)
    with Image.open(out / f"{stem}_gradcam.png") as grid:
        assert grid.size[0] > grid.size[1]  # original + 3 classes in one row of 4
    assert not (out / f"{stem}_explain.png").exists()
    code, _, err = run(capsys, "explain", files["tiny"], files["pictures"][0], "--methods", "saliency",
                       "--targets", "all", "--out", tmp_path / "refused")
    assert code == 2 and "one class at a time" in err and not (tmp_path / "refused").exists()


# -- output names and the index ------------------------------------------------------------------------

def test_stems_take_the_folders_that_tell_same_named_inputs_apart(tmp_path, monkeypatch):
    from convlens.fileio import distinct_stems

    monkeypatch.chdir(tmp_path)
    assert distinct_stems(["data/circle/00000.png", "data/cross/00000.png", "cat.jpg"]) == [
        "circle_00000", "cross_00000", "cat"]
    # nested: each input takes only as many folders as it needs
    assert distinct_stems(["a/x/1.png", "b/x/1.png", "c/y/1.png"]) == ["a_x_1", "b_x_1", "y_1"]
    # the same file twice (however it is spelt), and names that would still clash, get a count
    assert distinct_stems(["a.png", "./a.png", "a.jpg", "a-2.png"]) == ["a", "a-2", "a-3", "a-2-2"]


def test_inputs_with_one_name_in_two_folders_and_the_index(capsys, tmp_path, files):
    folders = {"circle": (220, 30, 30), "cross": (30, 30, 220)}
    inputs = []
    for folder, colour in folders.items():
        (tmp_path / "data" / folder).mkdir(parents=True)
        inputs.append(tmp_path / "data" / folder / "00000.png")
        Image.new("RGB", (24, 20), colour).save(inputs[-1])
    inputs.append(inputs[0])  # the same file again
    out = tmp_path / "maps"
    code, stdout, err = run(capsys, "explain", files["tiny"], *inputs, "--methods", "gradcam,saliency", "--out", out)
    assert code == 0, err
    stems = ["circle_00000", "cross_00000", "circle_00000-2"]
    expected = {f"{stem}_{m}.{ext}" for stem in stems for m in ("gradcam", "saliency") for ext in ("png", "npy")}
    expected |= {f"{stem}_explain.png" for stem in stems} | {"index.csv", "index.json"}
    assert {p.name for p in out.iterdir()} == expected
    assert np.array_equal(np.load(out / "circle_00000_gradcam.npy"), np.load(out / "circle_00000-2_gradcam.npy"))
    assert "wrote 15 files" in stdout

    model = cl.load_model(files["tiny"], trust_code=True)
    api = cl.explain(model, [Image.open(p) for p in inputs], method="gradcam")
    predicted = [p[0].label for p in model.predict([Image.open(p) for p in inputs])]
    with open(out / "index.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows == json.loads((out / "index.json").read_text())
    assert {row["file"] for row in rows} == expected - {"index.csv", "index.json"}
    by_file = {row["file"]: row for row in rows}
    for stem, path, target, guess in zip(stems, inputs, api.target_names, predicted):
        assert by_file[f"{stem}_gradcam.npy"] == {"file": f"{stem}_gradcam.npy", "input": str(path),
                                                  "method": "gradcam", "target_class": target,
                                                  "predicted_class": guess}
        assert by_file[f"{stem}_explain.png"]["method"] == "gradcam,saliency"
        assert by_file[f"{stem}_saliency.png"]["target_class"] == target


def test_the_index_says_all_for_the_per_class_grid(capsys, tmp_path, files):
    out = tmp_path / "all"
    code, _, err = run(capsys, "explain", files["tiny"], files["pictures"][0], "--target", "all", "--out", out)
    assert code == 0, err
    rows = json.loads((out / "index.json").read_text())
    assert [(r["file"], r["target_class"]) for r in rows] == [("red_gradcam.png", "all"), ("red_gradcam.npy", "all")]


def test_a_log_gets_one_line_per_method_and_batch(capsys, tmp_path, files):
    code, _, err = run(capsys, "explain", files["tiny"], *files["pictures"], "--methods", "gradcam,saliency",
                       "--batch-size", "1", "--out", tmp_path / "o")
    assert code == 0, err
    assert "\r" not in err
    assert err.splitlines() == ["[1/4] explain: gradcam, batch 1/2", "[2/4] explain: gradcam, batch 2/2",
                                "[3/4] explain: saliency, batch 1/2", "[4/4] explain: saliency, batch 2/2"]
