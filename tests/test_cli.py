"""The CLI: one-line errors with exit code 2, help with examples, real output."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

import convlens
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
    # a list option given but empty: the one rule of cli.common.named_list, in each command family
    (["explain", "{tiny}", "{picture}", "--trust-code", "--methods", ","], "--methods needs at least one name"),
    (["activations", "{tiny}", "{picture}", "--trust-code", "--layers", " , "], "--layers needs at least one name"),
    (["filters", "{tiny}", "--trust-code", "--layers", "conv1", "--filters", ","], "--filters needs at least one name"),
    (["scan", "{tiny}", "--trust-code", "--shapes", "4", "--layers", ",", "--out", "{tmp}/atlas"],
     "--layers needs at least one name"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_file, picture, args, match):
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG broken")
    args = [a.format(picture=picture, tiny=tiny_file, garbage=garbage, tmp=tmp_path) for a in args]
    code, out, err = run(*args)
    assert code == 2
    assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_empty_image_list_is_a_usage_error(tiny_file):
    code, _, err = run("predict", str(tiny_file))
    assert code == 2 and "Missing argument" in err


# -- one vocabulary ---------------------------------------------------------------------------------------
COMMANDS = typer.main.get_command(app).commands
#: Commands that run a model take --device and --input-size (examples runs at the size its atlas was scanned
#: at, so it has --device only; train builds its model at --input-size and trains on the CPU).
MODEL_COMMANDS = ["activations", "class-model", "deepdream", "dissect", "evaluate", "explain", "factorize", "filters",
                  "layers", "predict", "report", "scan", "tcav"]
PLURALS = {"--methods": "--method", "--layers": "--layer", "--targets": "--target", "--metrics": "--metric"}


def _help(command: str) -> str:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_every_command_is_listed_once():
    assert sorted(COMMANDS) == sorted(MODEL_COMMANDS + ["examples", "serve", "shapes", "train"])


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help_describes_every_option_without_type_clutter(command):
    text = _help(command)
    for param in COMMANDS[command].params:
        if getattr(param, "hidden", False):
            continue
        assert (param.help or "").strip(), f"{command} {param.name} has no help"
        for name in param.opts if param.param_type_name == "option" else [param.metavar]:
            assert name in text, f"{command} --help does not show {name}"
    assert not re.search(r"<(bool|str|int|float|path|list)\b", text, re.IGNORECASE), text


def test_flags_read_bare_and_values_read_with_a_name():
    text = _help("explain")
    assert re.search(r"--trust-code +Allow", text) and re.search(r"--out +-o +PATH", text)
    assert re.search(r"--input-size +SIZE", text) and re.search(r"--batch-size +INTEGER", text)


@pytest.mark.parametrize("command", MODEL_COMMANDS + ["examples"])
def test_model_commands_take_device_and_input_size(command):
    names = {name for param in COMMANDS[command].params for name in param.opts}
    assert "--device" in names
    assert ("--input-size" in names) == (command != "examples")
    assert {"--weights", "--arch", "--trust-code"} <= names


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_lists_are_plural_with_the_singular_accepted(command):
    for param in COMMANDS[command].params:
        for plural, singular in PLURALS.items():
            if plural in param.opts:
                assert singular in param.opts, f"{command} {plural} lacks {singular}"
            elif singular in param.opts and not (command == "examples" and singular == "--layer"):
                pytest.fail(f"{command} spells {singular} without {plural}")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_short_m_means_model_and_colormap_is_one_name(command):
    for param in COMMANDS[command].params:
        if "-m" in param.opts:
            assert param.opts == ["--model", "-m"], f"{command}: -m is {param.opts}"
        if "--cmap" in param.opts:  # the old name, kept working but out of --help
            assert param.hidden and any("--colormap" in p.opts for p in COMMANDS[command].params)


def test_singular_spellings_and_one_item_lists_give_what_the_plurals_give(cli, tiny_file, picture, tmp_path):
    for spelling, out in [(["--methods", "gradcam", "--layers", "conv2", "--targets", "1"], tmp_path / "plural"),
                          (["--method", "gradcam", "--layer", "conv2", "--target", "1"], tmp_path / "singular")]:
        code, _, err = cli("explain", tiny_file, picture, "--trust-code", *spelling, "--out", out)
        assert code == 0, err
    plural, singular = (np.load(tmp_path / name / f"{picture.stem}_gradcam.npy") for name in ("plural", "singular"))
    model = convlens.load_model(tiny_file, trust_code=True)
    expected = convlens.explain(model, [picture], method="gradcam", layer="conv2", target=1).raw[0].numpy()
    np.testing.assert_array_equal(plural, singular)
    np.testing.assert_allclose(plural, expected, rtol=1e-5, atol=1e-6)


def test_the_old_cmap_spelling_still_works(cli, tiny_file, picture, tmp_path):
    for option, out in [("--colormap", tmp_path / "new"), ("--cmap", tmp_path / "old")]:
        code, _, err = cli("activations", tiny_file, picture, "--trust-code", "--layers", "conv2", option, "magma",
                           "--out", out)
        assert code == 0, err
    assert (tmp_path / "new" / "conv2.png").read_bytes() == (tmp_path / "old" / "conv2.png").read_bytes()


def test_an_unknown_device_is_one_line(cli, tiny_file, picture, tmp_path):
    code, _, err = cli("predict", tiny_file, picture, "--trust-code", "--device", "gpu7")
    assert code == 2 and "cannot use device 'gpu7'" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("spelling", ["--input-size", "--size"])  # --size: train's old name, out of --help
def test_train_takes_its_input_size_by_either_name(cli, tmp_path, monkeypatch, spelling):
    import convlens.train
    from convlens.errors import ConvlensError

    seen = []

    def stop(data_dir, out, config, **options):
        seen.append(config.size)
        raise ConvlensError("stopped by the test")

    monkeypatch.setattr(convlens.train, "train", stop)
    code, _, err = cli("train", tmp_path, "--out", tmp_path / "model", spelling, "16")
    assert code == 2 and "stopped by the test" in err and seen == [16]
    assert "--size" not in _help("train")
