"""The heatmap benchmark script still runs (tiny model); its figures live in the README, not here."""

import importlib.util
from pathlib import Path


def test_quick_benchmark_runs_and_prints_ratios(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "bench_heatmaps.py"
    spec = importlib.util.spec_from_file_location("bench_heatmaps", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "x baseline" in out and "x faster" in out
    identical = float(out.split("max |map diff|")[1].split()[0])
    assert identical < 1e-4  # exact Score-CAM equals pytorch-grad-cam's maps
