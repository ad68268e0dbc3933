"""The engine seam: one literal mapping of engines, one check of the name, and Ray imported only for Ray."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import convlens as cl
from convlens.engines import ENGINES, LocalEngine, RayEngine, resolve_engine

ROOT = Path(__file__).resolve().parents[1]


def test_the_engines_are_one_literal_mapping():
    source = (ROOT / "src" / "convlens" / "engines" / "__init__.py").read_text(encoding="utf-8")
    found = [node.value for node in ast.walk(ast.parse(source))
             if isinstance(node, (ast.Assign, ast.AnnAssign))
             and any(getattr(target, "id", None) == "ENGINES"
                     for target in (node.targets if isinstance(node, ast.Assign) else [node.target]))]
    assert len(found) == 1 and isinstance(found[0], ast.Dict)
    assert [key.value for key in found[0].keys] == list(ENGINES) == ["local", "ray"]
    assert [value.id for value in found[0].values] == [engine.__name__ for engine in ENGINES.values()]


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_engine_resolves_by_its_name_and_offers_the_seam(name):
    engine = resolve_engine(name)
    assert isinstance(engine, ENGINES[name]) and engine.name == name
    assert callable(engine.check) and callable(engine.connect) and isinstance(engine.distributed, bool)
    assert resolve_engine(engine) is engine  # an engine object passes through as is


def test_an_unknown_engine_is_one_line_naming_the_choices():
    with pytest.raises(cl.ConvlensError) as raised:
        resolve_engine("spark")
    assert str(raised.value) == "unknown engine 'spark'; choose local or ray"


def test_the_ray_options_reach_the_ray_engine_and_the_local_engine_needs_none():
    engine = resolve_engine("ray", "127.0.0.1:6379", 3, 0.5)
    assert (engine.ray_address, engine.concurrency, engine.num_gpus) == ("127.0.0.1:6379", 3, 0.5)
    assert engine.distributed and not resolve_engine("local", "127.0.0.1:6379").distributed
    assert isinstance(resolve_engine(), LocalEngine)


def test_the_ray_engine_checks_its_options_on_one_line_before_starting_anything():
    with pytest.raises(cl.ConvlensError, match=r"^--concurrency must be at least 1, got 0$"):
        RayEngine(concurrency=0).check()
    with pytest.raises(cl.ConvlensError, match="a Ray address looks like HOST:PORT"):
        RayEngine(ray_address="no-port").check()


def test_the_local_engine_imports_neither_ray_nor_torch():
    code = ("import sys\nfrom convlens.engines import resolve_engine\nengine = resolve_engine('local')\n"
            "engine.check(); engine.connect()\nprint('ray' in sys.modules, 'torch' in sys.modules)")
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.stdout.split() == ["False", "False"], result.stderr


@pytest.mark.parametrize("command", [["scan", "shapes", "--shapes", "4"], ["dissect", "shapes", "--shapes", "4"],
                                     ["evaluate", "shapes", "DATA"]])
def test_cli_an_unknown_engine_is_one_line_exit_2_and_nothing_written(command, tmp_path, cli):
    args = [str(tmp_path) if arg == "DATA" else arg for arg in command]
    code, _, err = cli(*args, "--engine", "spark", "--out", tmp_path / "out")
    assert code == 2 and err.strip() == "convlens: error: unknown engine 'spark'; choose local or ray", err
    assert not (tmp_path / "out").exists()


def test_the_api_refuses_an_unknown_engine_before_writing(tmp_path):
    with pytest.raises(cl.ConvlensError, match="unknown engine 'spark'"):
        cl.scan(object(), shapes=4, out=tmp_path / "x.sqlite", engine="spark")
    from convlens.evaluation import evaluate

    with pytest.raises(cl.ConvlensError, match="unknown engine 'spark'"):
        evaluate(object(), tmp_path, methods=["gradcam"], metrics=["deletion"], out_dir=tmp_path / "out",
                 engine="spark")
    assert not (tmp_path / "x.sqlite").exists() and not (tmp_path / "out").exists()
