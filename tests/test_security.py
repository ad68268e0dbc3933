"""Loading a model file runs no code from it unless the caller opts in (``trust_code`` / ``--trust-code``).

The malicious file here is a pickle whose ``__reduce__`` calls a function that
writes a marker file and then returns a working module: the marker shows
whether loading ran code from the file, the module that the opt-in really
gives back a model.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import convlens as cl
from convlens.models import ARCHITECTURES

from conftest import TinyNet


def _plant(marker: str) -> torch.nn.Module:
    """What the malicious file makes the unpickler call: a side effect, then a real model."""
    Path(marker).write_text("code from the model file ran")
    torch.manual_seed(0)
    return TinyNet()


class _Trojan:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _plant, (self.marker,)


@pytest.fixture
def trojan(tmp_path) -> tuple[Path, Path]:
    """(a malicious model.pt, the marker file its code would create)."""
    path, marker = tmp_path / "model.pt", tmp_path / "pwned.txt"
    torch.save(_Trojan(marker), path)
    assert not marker.exists()
    return path, marker


@pytest.fixture
def full_unpickler_calls(monkeypatch) -> list:
    """Every torch.load call that could run code from a file (weights_only not True) is recorded here."""
    calls, original = [], torch.load

    def spy(*args, **kwargs):
        if kwargs.get("weights_only") is not True:
            calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


def _reference_logits(x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return TinyNet().eval()(x)


def test_pickled_module_is_refused_by_default_and_runs_no_code(trojan):
    path, marker = trojan
    with pytest.raises(cl.ConvlensError) as refused:
        cl.load_model(path)
    message = str(refused.value)
    assert "pickled Python object" in message and "runs code" in message
    assert "trust_code=True" in message and "--trust-code" in message and "state_dict" in message
    assert "_plant" in message  # says what the file would import
    assert "\n" not in message
    assert not marker.exists()


@pytest.mark.parametrize("command", ["layers", "predict"])
def test_cli_refuses_pickled_module_with_one_line_and_exit_2(cli, trojan, picture, command):
    path, marker = trojan
    args = [command, path] + ([picture] if command == "predict" else [])
    code, out, err = cli(*args)
    assert code == 2
    assert err.startswith("convlens: error:") and err.count("\n") == 1 and "--trust-code" in err
    assert not marker.exists()


def test_trust_code_loads_the_module_and_runs_its_code(trojan):
    path, marker = trojan
    model = cl.load_model(path, trust_code=True)
    assert marker.exists()  # the opt-in is what let the file's code run
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_logits(x))


def test_cli_trust_code_opts_in(cli, trojan, picture):
    path, marker = trojan
    code, out, err = cli("predict", path, picture, "--json", "--trust-code")
    assert code == 0, err
    assert marker.exists() and '"predictions"' in out


def test_state_dict_with_arch_loads_without_the_opt_in(tmp_path, monkeypatch, cli, picture, full_unpickler_calls):
    monkeypatch.setitem(ARCHITECTURES, "tinynet", TinyNet)
    torch.manual_seed(0)
    path = tmp_path / "weights.pth"
    torch.save(TinyNet().state_dict(), path)
    model = cl.load_model(path, arch="tinynet")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_logits(x))
    code, _, err = cli("predict", path, picture, "--arch", "tinynet")
    assert code == 0, err
    assert full_unpickler_calls == []


def test_convlens_checkpoint_loads_without_the_opt_in(tmp_path, full_unpickler_calls):
    from convlens.models.nets import ShapesNet

    torch.manual_seed(0)
    net = ShapesNet(num_classes=3, widths=(4, 8)).eval()
    path = tmp_path / "checkpoint.pt"
    torch.save({"convlens": "0", "arch": "shapesnet", "arch_kwargs": {"num_classes": 3, "widths": [4, 8]},
                "state_dict": net.state_dict(), "labels": ["a", "b", "c"], "input_size": [16, 16],
                "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}, "output": "logits"}, path)
    model = cl.load_model(path)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x))
    assert model.labels == ["a", "b", "c"] and model.input_size == (16, 16)
    assert cl.load_model("shapes").labels  # the bundled model is a convlens checkpoint too
    assert full_unpickler_calls == []


def test_torchscript_loads_without_the_opt_in(tmp_path, cli, picture, full_unpickler_calls):
    torch.manual_seed(0)
    path = tmp_path / "tiny.ts"
    torch.jit.save(torch.jit.script(TinyNet().eval()), path)
    model = cl.load_model(path)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _reference_logits(x))
    code, out, err = cli("predict", path, picture, "--json")
    assert code == 0, err
    assert full_unpickler_calls == []
