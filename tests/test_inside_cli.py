"""The inside-the-network commands: files written, values equal the API's, bad input exits 2 writing nothing."""

import json

import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens.cli import main


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3), nn.Softmax(dim=1))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "small.pt"
    torch.save(small_cnn(), path)
    return path


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("i") / "cat.png"
    cl.sample_image("chelsea").resize((40, 32)).save(path)
    return path


def invoke(capsys, *args) -> tuple[int, str]:
    """Run the CLI in-process through main() (one-line errors, exit codes); return (code, stderr).

    The model file is a pickled module, so every command gets --trust-code.
    """
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in args] + ["--trust-code"])
    return exited.value.code or 0, capsys.readouterr().err


def test_activations_writes_one_grid_per_default_layer(capsys, model_file, picture, tmp_path):
    code, err = invoke(capsys, "activations", model_file, picture, "--out", tmp_path, "--channel", 5)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.channel5.png", "0.png", "2.channel5.png", "2.png",
                                                          "3.channel5.png", "3.png"]
    grid = Image.open(tmp_path / "0.png")
    assert grid.width >= 16 * 32  # 8 channels of 32x40 on one row of at most 16


def test_filters_writes_grids_and_the_api_values(capsys, model_file, tmp_path):
    code, err = invoke(capsys, "filters", model_file, "--layers", "0,3", "--grid", "2x2", "--steps", 4,
                       "--size", 16, "--seed", 3, "--tv", 0.1, "--out", tmp_path)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.json", "0.png", "3.json", "3.png"]
    record = json.loads((tmp_path / "3.json").read_text())
    api = cl.filter_patterns(small_cnn(), "3", max_filters=4, size=16, steps=4, seed=3, regularizers={"tv": 0.1})
    assert [f["index"] for f in record["filters"]] == [0, 1, 2, 3]
    assert [f["activation"] for f in record["filters"]] == pytest.approx(api.activations.tolist(), abs=1e-5)
    assert Image.open(tmp_path / "3.png").width > 2 * 16


def test_class_model_and_deepdream(capsys, model_file, picture, tmp_path):
    code, err = invoke(capsys, "class-model", model_file, "--classes", "0,2", "--size", 16, "--steps", 3,
                       "--out", tmp_path / "classes")
    assert code == 0, err
    record = json.loads((tmp_path / "classes" / "class_model.json").read_text())
    assert [c["index"] for c in record["classes"]] == [0, 2]
    code, err = invoke(capsys, "deepdream", model_file, picture, "--layers", "3", "--octaves", 2, "--steps", 2,
                       "--out", tmp_path / "dream.png")
    assert code == 0, err
    assert Image.open(tmp_path / "dream.png").size == (40, 32)


@pytest.mark.parametrize("args, message", [
    (["activations", "{model}", "{picture}", "--layers", "0,conv9"], "unknown layer 'conv9'"),
    (["activations", "{model}", "missing.png"], "image not found"),
    (["activations", "{model}", "{picture}", "--device", "tpu9"], "cannot use device 'tpu9'"),
    (["filters", "{model}", "--layers", "0", "--filters", "0,99", "--steps", "1", "--size", "16"],
     "filter index 99 is out of range"),
    (["filters", "{model}", "--layers", "3,9"], "unknown layer '9'"),
    (["filters", "{model}", "--layers", "3", "--grid", "8by8"], "--grid must look like 8x8"),
    (["filters", "{model}", "--layers", "3", "--size", "1"], "'--size': Input should be greater than or equal to 8"),
    (["class-model", "{model}", "--classes", "7", "--size", "16"], "class index 7 is out of range"),
    (["deepdream", "{model}", "{picture}", "--layers", "3", "--octaves", "7", "--octave-scale", "2"],
     "too small for DeepDream"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(capsys, model_file, picture, tmp_path, args, message):
    out = tmp_path / "out"
    args = [a.format(model=model_file, picture=picture) for a in args] + ["--out", out]
    code, err = invoke(capsys, *args)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists()
