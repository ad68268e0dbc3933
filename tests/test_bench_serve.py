"""The explorer's benchmark script still runs (few requests); its figures live in the README, not here."""

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("fastapi")


def test_quick_serve_benchmark_runs_and_every_client_is_answered(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--models", "shapes", "--requests", "3", "--clients", "4", "--concurrent", "8",
                       "--memory-requests", "8", "--max-growth", "500"]) == 0
    out = capsys.readouterr().out
    p50, p95 = map(float, re.search(r"one client, 3 Grad-CAM views: p50 ([\d.]+) ms, p95 ([\d.]+) ms", out).groups())
    assert 0 < p50 <= p95
    assert "4 clients at once, 8 views: 8/8 answered 200 with a PNG" in out
    assert re.search(r"memory: RSS \d+ MB before a warm-up of 4 views, then over 8 more views \d+( -> \d+){4} MB", out)
