"""The heatmap benchmark script still runs (tiny model); its figures live in docs/benchmarks.md, not here."""

import importlib.util
import re
from pathlib import Path


def _load(name: str):
    path = Path(__file__).parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_benchmark_runs_and_prints_ratios(capsys):
    bench = _load("bench_heatmaps")
    assert bench.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "x baseline" in out
    # Score-CAM at both mask settings: a ratio each, and maps equal to pytorch-grad-cam's
    exact = re.findall(r"convlens scorecam \(exact\) .* ([\d.]+)x faster .*max \|map diff\| (\S+)", out)
    assert len(exact) == 2
    assert all(float(ratio) > 0 and float(diff) < 1e-5 for ratio, diff in exact)
    assert "align_corners=True" in out and "align_corners=False" in out
    assert re.search(r"batch 784 \(rule", out)  # 802,816 pixels / (32 x 32) masked pixels per image
    assert float(re.search(r"floor ratio \(peer's passes / convlens' passes\): +([\d.]+)x", out).group(1)) > 0
    assert "at most" in out and "of that peak" in out


def test_quick_attribution_benchmark_compares_equal_outputs(capsys):
    bench = _load("bench_attribution")
    assert bench.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    diffs = [float(d) for d in re.findall(r"x\s+(\S+)\n", out)]
    assert len(diffs) == 9 and all(d < 1e-4 for d in diffs)  # occlusion, LIME, KernelSHAP: the same attributions
    assert re.search(r"convlens is [\d.]+x faster than captum's default", out)


def test_quick_lrp_benchmark_compares_equal_outputs_with_zennit(capsys):
    bench = _load("bench_lrp")
    assert bench.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"convlens lrp .* (\S+)\n", out).group(1)) < 1e-4  # the same relevances, timed
    assert re.search(r"convlens lrp takes [\d.]+x one forward \+ backward and is [\d.]+x faster than zennit", out)


def test_quick_fullgrad_benchmark_prints_ratios_and_equal_maps(capsys):
    bench = _load("bench_fullgrad")
    assert bench.main(["--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    ratios = [float(r) for r in re.findall(r"([\d.]+)x baseline", out)]
    assert len(ratios) == 3 and all(r > 0 for r in ratios)
    assert float(re.search(r"max \|map diff\| \(biases='exact'\) (\S+)", out).group(1)) < 1e-5
