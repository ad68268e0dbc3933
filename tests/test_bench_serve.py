"""The explorer's benchmark script still runs (few requests); its figures live in docs/benchmarks.md, not here.

It runs as its own process, as a user runs it: a server thread and uvicorn's logging must not
share the test process's captured streams.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")


def test_quick_serve_benchmark_runs_and_every_client_is_answered(tmp_path):
    root = Path(__file__).parent.parent
    env = {**os.environ, "PYTHONPATH": str(root / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_serve.py"), "--models", "shapes",
                           "--requests", "3", "--clients", "4", "--concurrent", "8", "--memory-requests", "8",
                           "--max-growth", "500"], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    p50, p95 = map(float, re.search(r"one client, 3 Grad-CAM views: p50 ([\d.]+) ms, p95 ([\d.]+) ms", out).groups())
    assert 0 < p50 <= p95
    assert "4 clients at once, 8 views: 8/8 answered 200 with a PNG" in out
    assert re.search(r"memory: RSS \d+ MB before a warm-up of 4 views, then over 8 more views \d+( -> \d+){4} MB", out)
