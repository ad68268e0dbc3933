"""convlens starts at once and behaves on a shared machine.

``--help``, ``--version`` and argument errors never import torch (each case runs
in a fresh interpreter, since this test process has torch loaded already);
``import convlens`` is lazy; OpenMP waits passively and torch gets a thread
count that does not oversubscribe the machine.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import convlens
from convlens.cli import app, common, main

ROOT = Path(__file__).resolve().parents[1]

#: Runs the CLI in a fresh interpreter, then says whether torch got loaded and how it exited.
PROBE = """
import sys
from convlens.cli import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code or 0
print(f"torch loaded: {'torch' in sys.modules}; exit: {code}")
"""


def _fresh(code: str, *args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path}, timeout=120)


@pytest.mark.parametrize("args,code,shows", [
    (["--help"], 0, "Commands"),
    (["--version"], 0, f"convlens {convlens.__version__}"),
    (["report", "--help"], 0, "--device"),
    (["explain", "--help"], 0, "--methods"),
    (["report", "--no-such-flag"], 2, "No such option"),
    (["explain", "shapes"], 2, "Missing argument 'IMAGES'"),
])
def test_help_version_and_argument_errors_leave_torch_unloaded(args, code, shows):
    result = _fresh(PROBE, *args)
    assert result.stdout.strip().endswith(f"torch loaded: False; exit: {code}"), result.stdout + result.stderr
    assert shows in result.stdout + result.stderr


def test_every_command_help_leaves_torch_numpy_and_pil_unloaded():
    commands = sorted(c.name or c.callback.__name__ for c in app.registered_commands)
    code = ("import sys\nfrom convlens.cli import main\n"
            f"for command in {commands!r}:\n"
            "    try:\n        main([command, '--help'])\n    except SystemExit:\n        pass\n"
            "print('loaded:', sorted(m for m in ('torch', 'numpy', 'PIL', 'matplotlib', 'jinja2', 'fastapi', 'uvicorn') if m in sys.modules))")
    result = _fresh(code)
    assert result.stdout.strip().splitlines()[-1] == "loaded: []", result.stderr
    assert result.stdout.count("Usage: ") == len(commands) == 17


def test_version_is_the_package_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert convlens.__version__ == project["version"] == "0.1.0"


def test_import_convlens_is_lazy_and_the_public_names_still_resolve():
    result = _fresh("import sys\nimport convlens as cl\nprint('torch' in sys.modules)\n"
                    "import convlens.heatmaps  # loads convlens.capture, the submodule, on the way\n"
                    "print(cl.explain.__module__, cl.capture.__module__, callable(cl.capture), 'torch' in sys.modules)\n"
                    "print(all(hasattr(cl, name) for name in cl.__all__), set(cl.__all__) <= set(dir(cl)))")
    assert result.stdout.split() == ["False", "convlens.heatmaps.engine", "convlens.capture", "True", "True",
                                     "True", "True"], result.stderr


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'gradcam'"):
        convlens.gradcam  # noqa: B018


# -- threads ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cpus,quota,requested,expected", [
    (2, None, None, 2),      # the CPUs this process may run on
    (64, 2.0, None, 2),      # a container limited to 2 CPUs on a 64-core host: not 64 threads
    (64, 1.5, None, 2),      # a fractional quota still gets its partly used CPU
    (4, 0.25, None, 1),      # never below one
    (16, None, "3", None),   # OMP_NUM_THREADS set by the user: torch follows it, convlens keeps out
])
def test_thread_count(cpus, quota, requested, expected):
    assert common.thread_count(cpus, quota, requested) == expected


@pytest.mark.parametrize("text,cpus", [("200000 100000\n", 2.0), ("150000 100000", 1.5), ("max 100000", None),
                                       ("garbage", None), (None, None)])
def test_cgroup_quota(tmp_path, text, cpus):
    path = tmp_path / "cpu.max"
    if text is not None:
        path.write_text(text)
    assert common._cgroup_cpus(str(path)) == cpus


def test_main_makes_openmp_wait_passively_unless_told_otherwise(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    with pytest.raises(SystemExit):
        main(["--version"])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_a_command_gives_torch_the_chosen_thread_count(cli, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(common, "machine_threads", lambda environ=None: 1 if before != 1 else 2)
    try:
        code, _, err = cli("layers", "shapes")
        assert code == 0, err
        assert torch.get_num_threads() == (1 if before != 1 else 2)
    finally:
        torch.set_num_threads(before)


def test_openmp_threads_set_by_the_user_are_left_alone(cli, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(3)  # what the user's own code chose, not what the machine would suggest
    try:
        code, _, err = cli("layers", "shapes")
        assert code == 0, err
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# -- the benchmark scripts still run (their figures live in docs/benchmarks.md) ----------------------------
def _bench(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_startup_benchmark_times_help_version_and_torch(capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p))
    best = _bench("bench_startup").main(["--repeat", "1"])
    assert set(best) == {"convlens --help", "convlens --version", "python -c 'import torch'"}
    assert "faster than importing torch alone" in capsys.readouterr().out


def test_busy_benchmark_runs_quiet_then_beside_hogs(capsys, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p))
    ratio = _bench("bench_busy").main(["--command=--version", "--hogs", "1", "--no-policy"])
    out = capsys.readouterr().out
    assert ratio > 0 and "OMP_WAIT_POLICY: ACTIVE" in out and "beside 1 CPU-bound procs" in out
