"""The atlas benchmark scripts still run (tiny settings); their figures live in docs/benchmarks.md, not here."""

import importlib.util
from pathlib import Path

import pytest


def _load(name: str):
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_scan_benchmark_prints_its_ratios(capsys):
    pytest.importorskip("ray")
    # the Ray comparison needs its own cluster; the Ray engine is tested in test_atlas_ray.py
    assert _load("bench_atlas").main(["--quick", "--threads", "1", "--skip", "ray"]) == 0
    out = capsys.readouterr().out
    assert "x the forward passes (limit 1.3x)" in out and "% (limit 10 %)" in out


def test_quick_dissection_benchmark_compares_trained_and_random_weights(capsys):
    assert _load("dissect_shapes").main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    trained = int(out.split("trained ")[-1].split(",")[0])
    random = int(out.split("random ")[-1].split()[0])
    assert trained == 8 and random <= trained  # 8 concepts: the trained model covers them all
