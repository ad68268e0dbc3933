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


# -- TorchScript is code: refused when it does more than tensor maths ---------------------------------------

class _FileWriter(torch.nn.Module):
    """Maps ``target`` into a tensor with ``shared=True`` and writes through it: creates or overwrites the file."""

    def __init__(self, target: str, shared: bool = True):
        super().__init__()
        self.target, self.shared = target, shared
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        mapped = torch.from_file(self.target, self.shared, 8, dtype=torch.uint8)
        mapped.fill_(65)
        return self.fc(x.mean((2, 3))) + mapped.float().sum() * 0


def _save_to(x: torch.Tensor, name: str) -> torch.Tensor:
    torch.save(x, name)
    return x


class _Saver(torch.nn.Module):
    """Calls a scripted function that writes a file with ``torch.save``."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(_save_to(x, self.target).mean((2, 3)))


class _Identity(torch.nn.Module):
    def forward(self, x):
        return x


def _writing_hook(module: _Identity, inputs: tuple[torch.Tensor], output: torch.Tensor):
    mapped = torch.from_file("/tmp/convlens-never-written", True, 8, dtype=torch.uint8)
    output.add_(mapped.float().sum() * 0)


class _Hooked(torch.nn.Module):
    """Clean ``forward``; the file access hides in a scripted forward hook of a submodule."""

    def __init__(self):
        super().__init__()
        self.inner = _Identity()
        self.inner.register_forward_hook(_writing_hook)
        self.fc = torch.nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(self.inner(x).mean((2, 3)))


class _SetState(torch.nn.Module):
    """Writes ``target`` from ``__setstate__``, which ``torch.jit.load`` runs while loading."""

    def __init__(self, target: str):
        super().__init__()
        self.target = target
        self.scale = torch.ones(1)

    def forward(self, x):
        return x.mean((2, 3)) * self.scale

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.scale, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        mapped = torch.from_file(state[1], True, 8, dtype=torch.uint8)
        mapped.fill_(66)
        self.scale = state[0] + mapped.float().sum() * 0
        self.target, self.training = state[1], state[2]


def _read_later(x: torch.Tensor) -> torch.Tensor:
    return x


class _Forked(torch.nn.Module):
    """Runs a function through ``torch.jit.fork``, whose body inlining does not open."""

    def forward(self, x):
        return torch.jit.wait(torch.jit.fork(_read_later, x)).mean((2, 3))


class _Failing(torch.nn.Module):
    def forward(self, x):
        if x.shape[1] == 3:
            raise ValueError("this model wants grayscale input")
        return x.mean((2, 3))


def _script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file an evil model would overwrite; its bytes must survive."""
    path = tmp_path / "precious.bin"
    path.write_bytes(b"precious data")
    return path


def _evil(kind: str, tmp_path: Path, victim: Path) -> tuple[Path, str]:
    """(the TorchScript file, the operator the refusal must name)"""
    made = {
        "overwrite": (lambda: _FileWriter(str(victim)), "aten::from_file"),
        "create": (lambda: _FileWriter(str(tmp_path / "created.bin")), "aten::from_file"),
        "read": (lambda: _FileWriter(str(victim), shared=False), "aten::from_file"),
        "save": (lambda: _Saver(str(tmp_path / "created.bin")), "aten::save"),
        "hook": (_Hooked, "aten::from_file"),
        "fork": (_Forked, "prim::fork"),
    }
    build, op = made[kind]
    return _script(build(), tmp_path / f"{kind}.pt"), op


EVIL = ["overwrite", "create", "read", "save", "hook", "fork"]


@pytest.mark.parametrize("kind", EVIL)
def test_torchscript_that_touches_files_is_refused_naming_the_op(tmp_path, victim, kind):
    path, op = _evil(kind, tmp_path, victim)
    with pytest.raises(cl.ConvlensError) as refused:
        cl.load_model(path)
    message = _one_line(refused)
    assert f"calls {op} in " in message and "--trust-code" in message and "trust_code=True" in message
    assert victim.read_bytes() == b"precious data" and not (tmp_path / "created.bin").exists()


@pytest.mark.parametrize("command", ["layers", "predict"])
def test_cli_refuses_a_file_writing_torchscript_with_one_line(cli, tmp_path, victim, picture, command):
    path, _ = _evil("overwrite", tmp_path, victim)
    created, _ = _evil("create", tmp_path, victim)
    for model in (path, created):
        code, out, err = cli(command, model, *([picture] if command == "predict" else []))
        assert code == 2 and err.count("\n") == 1 and "aten::from_file" in err, err
    assert victim.read_bytes() == b"precious data" and not (tmp_path / "created.bin").exists()


def test_setstate_is_refused_before_torch_jit_load_runs_it(tmp_path):
    marker = tmp_path / "setstate.bin"
    path = _script(_SetState(str(marker)), tmp_path / "state.pt")
    assert not marker.exists()
    with pytest.raises(cl.ConvlensError) as refused:
        cl.load_model(path)
    assert "__setstate__" in _one_line(refused) and "while loading" in str(refused.value)
    assert not marker.exists()  # refused before torch.jit.load could run it
    cl.load_model(path, trust_code=True)
    assert marker.exists()  # what the opt-in allows: the file's code ran while loading


def test_trust_code_runs_a_file_writing_torchscript(tmp_path, victim):
    path, _ = _evil("overwrite", tmp_path, victim)
    model = cl.load_model(path, trust_code=True)
    model(torch.zeros(1, 3, 4, 4))
    assert victim.read_bytes().startswith(b"AAAAAAAA")  # the opt-in let it write: that is what it guards


def test_only_tensor_maths_is_vouched_for():
    from convlens.models.torchscript import why_refused

    for kind in ("aten::conv2d", "aten::add_", "aten::linear", "prim::Constant", "prim::If", "prim::GetAttr",
                 "quantized::conv2d", "torchvision::nms"):
        assert why_refused(kind) is None, kind
    for kind in ("aten::from_file", "aten::save", "prim::rpc_sync", "prim::CallFunction", "prim::fork",
                 "c10d::broadcast_", "profiler::_record_function_enter", "debugprims::load_tensor", "evil::op",
                 "prim::PythonOp"):
        assert why_refused(kind) is not None, kind


@pytest.mark.parametrize("build", ["script", "trace"])
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_scripted_and_traced_torchvision_models_load_without_the_opt_in(tmp_path, arch, build):
    import torchvision

    torch.manual_seed(0)
    module = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    compiled = torch.jit.script(module) if build == "script" else torch.jit.trace(module, x)
    path = tmp_path / f"{arch}.pt"
    torch.jit.save(compiled, str(path))
    with torch.no_grad():
        torch.testing.assert_close(cl.load_model(path)(x), module(x))


@pytest.mark.parametrize("command", ["layers", "predict"])
def test_a_failing_torchscript_model_reports_its_own_error_on_one_line(cli, tmp_path, picture, command):
    path = _script(_Failing(), tmp_path / "failing.pt")
    code, out, err = cli(command, path, *([picture] if command == "predict" else []))
    assert code == 2 and err.count("\n") == 1, err
    assert "ValueError: this model wants grayscale input" in err and "input size" not in err


# -- weights files and Keras files -----------------------------------------------------------------------------

def test_a_pickled_weights_file_is_refused_on_convlens_own_line(cli, trojan, picture):
    path, marker = trojan
    with pytest.raises(cl.ConvlensError) as refused:
        cl.load_model("resnet18", weights=path)
    message = _one_line(refused)
    assert message.startswith(f"weights file {path} is a pickled Python object") and "state_dict()" in message
    assert "Weights only load failed" not in message and "_plant" in message
    code, _, err = cli("predict", "resnet18", picture, "--weights", path)
    assert code == 2 and err.count("\n") == 1 and "pickled Python object" in err
    assert not marker.exists()


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def keras():
    keras = pytest.importorskip("keras")
    return keras


def _tiny_keras(keras, lambda_layer: bool = False):
    layers = [keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)]
    if lambda_layer:
        layers.append(keras.layers.Lambda(lambda t: t * 2))
    return keras.Sequential(layers + [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])


def test_keras_lambda_layers_stay_refused_after_unsafe_deserialization_is_enabled(keras, tmp_path):
    from keras.src.saving import serialization_lib

    path = tmp_path / "lambda.keras"
    _tiny_keras(keras, lambda_layer=True).save(path)
    before = serialization_lib.in_safe_mode()
    keras.config.enable_unsafe_deserialization()  # what another library in the user's process may have done
    try:
        with pytest.raises(cl.ConvlensError) as refused:
            cl.load_model(path)
        assert "Lambda" in _one_line(refused) or "lambda" in str(refused.value)
    finally:
        from keras.src.backend.common import global_state

        global_state.set_global_attribute("safe_mode_saving", before)


def test_keras_archive_with_unsafe_member_paths_loads_with_one_warning_line(keras, cli, tmp_path, recwarn):
    import zipfile

    path = tmp_path / "slip.keras"
    _tiny_keras(keras).save(path)
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("../../evil.txt", "x")
        archive.writestr("/absolute_evil.txt", "x")
    code, out, err = cli("layers", path)
    assert code == 0, err
    warnings_shown = [line for line in err.splitlines() if "warning" in line.lower()]
    assert warnings_shown == [f"convlens: warning: {path} contains 2 member(s) with unsafe paths (such as "
                              "'../../evil.txt'), which were skipped"], err
    assert not (tmp_path.parent.parent / "evil.txt").exists()
    assert not any("Skipping invalid path" in str(w.message) for w in recwarn.list)
