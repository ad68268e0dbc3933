"""The CLI: one-line errors with exit code 2, help with examples, real output."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from convlens.cli import app

from conftest import TinyNet

runner = CliRunner()


def run(*args):
    """Run through main() so ConvlensError handling is exercised; return (code, stdout, stderr)."""
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", "from convlens.cli import main; main()", *args],
                            capture_output=True, text=True, env=env)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.pt"
    torch.manual_seed(0)
    torch.save(TinyNet(), path)  # a pickled module (needs --trust-code): run() puts tests/ on the path to unpickle it
    return path


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("i") / "pic.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("command", sorted(c.name or c.callback.__name__ for c in app.registered_commands))
def test_every_command_has_help_with_an_example(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Example" in result.output


def test_predict_json(tiny_file, picture):
    code, out, err = run("predict", str(tiny_file), str(picture), "--trust-code", "--json", "--top", "2",
                         "--labels", str(_labels(picture.parent)))
    assert code == 0, err
    payload = json.loads(out)
    assert payload[0]["image"] == str(picture)
    assert [p["label"] for p in payload[0]["predictions"]][0] in {"a", "b", "c"}
    assert len(payload[0]["predictions"]) == 2


def _labels(folder):
    path = folder / "labels.txt"
    path.write_text("a\nb\nc\n")
    return path


def test_layers_table(tiny_file):
    code, out, err = run("layers", str(tiny_file), "--trust-code", "--input-size", "32")
    assert code == 0, err
    assert "conv2" in out and "(N, 8, 32, 32)" in out and "auto" in out
    assert "Total params: 443" in out


@pytest.mark.parametrize("args,match", [
    (["predict", "resnet18", "missing.png"], "image not found"),
    (["predict", "resnett18", "{picture}"], "did you mean 'resnet18'"),
    (["predict", "{tiny}", "{garbage}", "--trust-code"], "cannot read image"),
    (["layers", "{tiny}", "--trust-code", "--input-size", "abc"], "--input-size"),
    (["predict", "resnet18", "{picture}", "--weights", "{garbage}"], "cannot read weights"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_file, picture, args, match):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG broken")
    args = [a.format(picture=picture, tiny=tiny_file, garbage=garbage) for a in args]
    code, out, err = run(*args)
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_image_list_is_a_usage_error(tiny_file):
    code, _, err = run("predict", str(tiny_file))
    assert code == 2 and "Missing argument" in err
