"""One-line errors that say what is really wrong (each used to be one line, but misleading or an IndexError)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens.errors import first_line
from convlens.models import ARCHITECTURES, Model

from conftest import TinyNet


def one_line_error(code: int, err: str) -> bool:
    return code == 2 and err.startswith("convlens: error:") and err.count("\n") == 1


@pytest.fixture
def scripted(tmp_path) -> Path:
    path = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.script(TinyNet().eval()), path)
    return path


# -- TorchScript cannot be explained -------------------------------------------

def test_explain_on_torchscript_says_it_cannot_be_hooked(cli, tmp_path, scripted, picture):
    out = tmp_path / "maps"
    code, _, err = cli("explain", scripted, picture, "--out", out)
    assert one_line_error(code, err), err
    assert "TorchScript model cannot be hooked" in err and "--arch" in err and "spatial" not in err
    assert not out.exists()
    with pytest.raises(cl.ConvlensError, match="TorchScript model cannot be hooked"):
        cl.explain(cl.load_model(scripted), [Image.open(picture)], method="gradcam")


def test_predict_on_torchscript_still_works(cli, scripted, picture):
    code, out, err = cli("predict", scripted, picture, "--json")
    assert code == 0, err
    assert '"probability"' in out


# -- a corrupt Keras file is not "File not found" ------------------------------

@pytest.mark.parametrize("name", ["model.keras", "model.h5"])
def test_corrupt_keras_file_cannot_be_read_as_keras(cli, tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 this is not really an archive" * 4)
    code, _, err = cli("layers", path)
    assert one_line_error(code, err), err
    assert "cannot be read as a Keras file" in err and "not found" not in err.lower()


# -- a missing file is not an "unknown model" ----------------------------------

@pytest.mark.parametrize("source", ["model.pt", "weights.pth", "run/last.ckpt", "exports/net"])
def test_missing_model_file_is_not_found(cli, tmp_path, source):
    path = tmp_path / source
    code, _, err = cli("layers", path)
    assert one_line_error(code, err), err
    assert f"model file not found: {path}" in err
    with pytest.raises(cl.ConvlensError, match="model file not found"):
        cl.load_model(source)  # relative, as typed: the suffix or separator makes it a path


def test_a_mistyped_name_is_still_an_unknown_model():
    with pytest.raises(cl.ConvlensError, match="unknown model 'resnett18'; did you mean 'resnet18'"):
        cl.load_model("resnett18")


# -- a symbolic link loop is not "image not found" -----------------------------

def test_symlink_loop_image_says_so(cli, tmp_path):
    loop = tmp_path / "loop.png"
    os.symlink(tmp_path / "other.png", loop)
    os.symlink(loop, tmp_path / "other.png")
    code, _, err = cli("predict", "shapes", loop)
    assert one_line_error(code, err), err
    assert "symbolic link loop" in err and "not found" not in err
    dangling = tmp_path / "dangling.png"
    os.symlink(tmp_path / "gone.png", dangling)
    with pytest.raises(cl.ConvlensError, match="broken symbolic link"):
        cl.load_image(dangling)
    with pytest.raises(cl.ConvlensError, match="image not found"):
        cl.load_image(tmp_path / "absent.png")


# -- DeepDream on a tiny image says how large it must be -----------------------

def test_deepdream_on_a_tiny_image_gives_the_size_it_needs(cli, tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (2, 2), (90, 120, 200)).save(tiny)
    out = tmp_path / "dream.png"
    code, _, err = cli("deepdream", "shapes", tiny, "--layers", "features.conv4", "--steps", 1, "--out", out)
    assert one_line_error(code, err), err
    assert "too small for DeepDream" in err and "0x0" not in err
    assert "need at least 9x9" in err and "at least 24x24 pixels" in err
    assert not out.exists()
    # The size it names is the real minimum: one pixel less fails, that size works.
    model = cl.load_model("shapes")
    with pytest.raises(cl.ConvlensError, match="at least 24x24 pixels"):
        cl.deepdream(model, Image.new("RGB", (23, 23)), ["features.conv4"], steps=0)
    assert cl.deepdream(model, Image.new("RGB", (24, 24)), ["features.conv4"], steps=0).shape == (3, 24, 24)


# -- an exception without a message: no IndexError -----------------------------

def test_first_line():
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(ValueError("\n  \nsecond line\nthird")) == "second line"
    assert first_line(OSError("only")) == "only"


class _Silent(nn.Module):
    def forward(self, x):
        raise RuntimeError()


def _raise_empty(*args, **kwargs):
    raise RuntimeError()


def _weights_only_refuses(*args, weights_only=None, **kwargs):
    if weights_only:
        raise pickle.UnpicklingError("Weights only load failed; `weights_only` set to False may succeed")
    raise RuntimeError()


@pytest.mark.parametrize("site", ["state dict", "model file", "trusted model file", "TorchScript", "forward"])
def test_an_empty_library_message_becomes_its_type_name(tmp_path, monkeypatch, scripted, site):
    monkeypatch.setitem(ARCHITECTURES, "tinynet", TinyNet)
    path = tmp_path / "weights.pt"
    torch.save(TinyNet().state_dict(), path)
    if site == "state dict":
        monkeypatch.setattr(torch, "load", _raise_empty)
        call, expected = lambda: cl.load_model("tinynet", weights=path), f"cannot read weights file {path}: "
    elif site == "model file":
        monkeypatch.setattr(torch, "load", _raise_empty)
        call, expected = lambda: cl.load_model(path), f"cannot read model file {path}: "
    elif site == "trusted model file":
        monkeypatch.setattr(torch, "load", _weights_only_refuses)
        call, expected = lambda: cl.load_model(path, trust_code=True), f"cannot read model file {path}: "
    elif site == "TorchScript":
        monkeypatch.setattr(torch.jit, "load", _raise_empty)
        call, expected = lambda: cl.load_model(scripted), f"cannot load TorchScript file {scripted}: "
    else:
        call, expected = lambda: cl.summarize(cl.load_model(_Silent())), "cannot run on a 224x224 input ("
    with pytest.raises(cl.ConvlensError) as raised:
        call()
    assert expected + "RuntimeError" in str(raised.value)  # was an IndexError from an empty message


def test_cli_device_error_without_a_message(cli, monkeypatch, picture, tmp_path):
    monkeypatch.setattr(Model, "to", _raise_empty)
    code, _, err = cli("activations", "shapes", picture, "--device", "cpu", "--out", tmp_path / "acts")
    assert one_line_error(code, err), err
    assert "cannot use device 'cpu': RuntimeError" in err
