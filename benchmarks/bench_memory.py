"""Peak memory of ``convlens explain`` and ``convlens report`` on a big photo, against the model's own footprint.

A big photo should cost little more than a small one: heatmap overlays and
figures are drawn at most :data:`convlens.render.overlay.MAX_SIDE` pixels on
the longest side. Each command runs in its own subprocess, once on an
``--size`` x ``--size`` photo-like PNG (smooth gradients and soft blobs, so the
file stays small while the decoded image is large) and once on a 224x224 one
(the model's own footprint: interpreter, torch, weights, one forward and
backward pass). The difference is what the big photo costs; the bound is
1.5 GB. ``explain`` runs with the bundled shapes model and resnet18 (random
weights); ``report`` with the shapes model only by default, since on resnet18
its filter-pattern sections take most of an hour on two CPU cores
(``--report-models shapes,resnet18`` adds it).

Peak RSS comes from ``os.wait4`` on each child, so each figure is that one
command's own peak, not the largest of all children so far.

    PYTHONPATH=src python benchmarks/bench_memory.py                   # 8000x8000, ~10 minutes on 2 cores
    PYTHONPATH=src python benchmarks/bench_memory.py --size 300 --small 64 --explain-models shapes --report-models ""
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

#: The bound the big photo must stay under, above the same command on a small photo.
BOUND_BYTES = int(1.5 * 1024**3)
MODELS = {"shapes": ["shapes"], "resnet18": ["resnet18", "--weights", "none"]}


def photo_like(size: int, path: Path) -> Path:
    """A ``size`` x ``size`` RGB PNG with smooth colour gradients and soft blobs, built in row bands.

    Built band by band so that making a 30000 px image does not itself take gigabytes.
    """
    rng = np.random.default_rng(0)
    centres = rng.uniform(0, size, (6, 2))
    radii = rng.uniform(size / 12, size / 5, 6)
    colours = rng.uniform(0, 255, (6, 3)).astype(np.float32)
    xs = np.arange(size, dtype=np.float32)
    band = max(1, min(size, 2_000_000 // size))
    rows = []
    for top in range(0, size, band):
        ys = np.arange(top, min(size, top + band), dtype=np.float32)[:, None]
        pixels = np.empty((len(ys), size, 3), np.float32)
        pixels[..., 0] = 255 * xs / size
        pixels[..., 1] = 255 * ys / size
        pixels[..., 2] = 128
        for (cx, cy), radius, colour in zip(centres, radii, colours):
            weight = np.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * radius**2))[..., None]
            pixels = pixels * (1 - weight) + colour * weight
        rows.append(pixels.round().astype(np.uint8))
    Image.fromarray(np.concatenate(rows)).save(path, optimize=False, compress_level=9)
    return path


def peak_rss(args: list[str]) -> int:
    """Run ``convlens ARGS`` in a fresh interpreter; its peak resident memory in bytes (exit status checked)."""
    command = [sys.executable, "-c", "from convlens.cli import main; main()", *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # os.wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the largest child so far.
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"convlens {' '.join(args)} failed ({process.returncode}):\n{error}")
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is kilobytes on Linux, bytes on macOS
    return usage.ru_maxrss * scale


def _command(command: str, model: list[str], image: Path, out: Path) -> list[str]:
    if command == "explain":
        return ["explain", *model, str(image), "--methods", "gradcam,saliency", "--out", str(out / "maps")]
    name, *weights = model
    return ["report", str(image), "--model", name, *weights, "--out", str(out / "report.html")]


def _names(text: str) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in MODELS]
    if unknown:
        raise SystemExit(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8000, help="side of the big photo in pixels")
    parser.add_argument("--small", type=int, default=224, help="side of the photo that gives the model's footprint")
    parser.add_argument("--explain-models", default="shapes,resnet18", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--report-models", default="shapes", help="comma-separated; '' skips the report")
    args = parser.parse_args(argv)
    runs = [("explain", name) for name in _names(args.explain_models)]
    runs += [("report", name) for name in _names(args.report_models)]
    worst = 0
    with tempfile.TemporaryDirectory(prefix="convlens-bench-memory-") as tmp:
        folder = Path(tmp)
        big = photo_like(args.size, folder / "big.png")
        small = photo_like(args.small, folder / "small.png")
        print(f"big photo: {args.size}x{args.size} PNG, {big.stat().st_size / 1024:.0f} KB; "
              f"footprint measured on {args.small}x{args.small}")
        print(f"{'model':10s} {'command':26s} {'small':>9s} {'big':>9s} {'big-small':>10s}")
        for command, name in runs:
            base = peak_rss(_command(command, MODELS[name], small, folder / "small-out"))
            peak = peak_rss(_command(command, MODELS[name], big, folder / "big-out"))
            worst = max(worst, peak - base)
            label = "explain gradcam,saliency" if command == "explain" else command
            print(f"{name:10s} {label:26s} {base / 2**20:7.0f} MB {peak / 2**20:7.0f} MB "
                  f"{(peak - base) / 2**20:8.0f} MB")
    verdict = "within" if worst < BOUND_BYTES else "OVER"
    print(f"largest difference {worst / 2**20:.0f} MB: {verdict} the bound of {BOUND_BYTES / 2**30:.1f} GB")
    return 0 if worst < BOUND_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
