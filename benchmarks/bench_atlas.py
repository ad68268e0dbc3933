"""What a whole-dataset scan costs: against the truncated forward passes alone, in memory, and on Ray.

Three measurements, each printed as a ratio against its limit (issue #14):

* **scan cost**: ``convlens.scan`` (accumulators and the SQLite store, part by part)
  against the truncated forward passes alone over the same images: the same
  DataLoader and the same ``capture(stop=True)`` forward, no statistics. The
  two are interleaved ``--repeat`` times and the medians compared. Limit 1.3x.
* **memory**: peak resident memory of a scan of ``--many`` images against one of
  ``--few`` (each in a fresh process). Limit: within 10 %.
* **Ray on one machine**: ``engine="ray"`` (a local Ray cluster with ``--threads``
  CPUs, one single-threaded actor per CPU; actor start-up included) against the
  local engine (one process, ``--threads`` threads) on the same images,
  interleaved. Limit 1.5x.

Nothing downloads: the images are generated shapes images; ``--model`` is
``shapes`` (the bundled model) or a torchvision name run with random weights
(``--size`` px images).

    python benchmarks/bench_atlas.py                     # shapes model, a few minutes on 2 cores
    python benchmarks/bench_atlas.py --model resnet18 --layers layer3,layer4 --size 224 --images 256
    python benchmarks/bench_atlas.py --quick             # seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import convlens as cl
from convlens.atlas import open_data, scan
from convlens.atlas.scan import _Images
from convlens.capture import capture


def load(name: str, size: int) -> cl.Model:
    if name == "shapes":
        return cl.load_model("shapes")
    return cl.load_model(name, weights="none", input_size=size)


def forward_only(model: cl.Model, source, layers: list[str], batch_size: int) -> int:
    """The baseline: read the images with the same DataLoader and run the truncated forward pass, nothing else."""
    loader = torch.utils.data.DataLoader(_Images(model, source), batch_size=batch_size)
    seen = 0
    with capture(model, layers, stop=True) as rec, torch.inference_mode():
        for _, x, _, _, _ in loader:
            rec.forward(x)
            seen += len(x)
    return seen


def interleaved(functions: dict, repeat: int) -> dict[str, float]:
    times = {name: [] for name in functions}
    for _ in range(repeat):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def child_scan(args) -> None:
    """Run one scan in this (fresh) process and print its peak resident memory in MiB."""
    torch.set_num_threads(args.threads)
    model = load(args.model, args.size)
    source = open_data(shapes=args.child, seed=11, size=args.size if args.model != "shapes" else 64)
    with tempfile.TemporaryDirectory() as tmp:
        scan(model, source, args.layers.split(","), out=Path(tmp) / "atlas.sqlite", batch_size=args.batch_size)
    print(json.dumps({"images": args.child, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def peak_memory(args, images: int) -> float:
    command = [sys.executable, __file__, "--child", str(images), "--model", args.model, "--layers", args.layers,
               "--size", str(args.size), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["max_rss_mib"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--layers", default="features.relu3,features.relu4")
    parser.add_argument("--size", type=int, default=224, help="image size for a torchvision model")
    parser.add_argument("--images", type=int, default=1024, help="images of the cost and Ray comparisons")
    parser.add_argument("--few", type=int, default=2000)
    parser.add_argument("--many", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--part-size", type=int, default=256, help="images per part on Ray (a part per actor call)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: cost, memory, ray")
    parser.add_argument("--quick", action="store_true", help="tiny run for the test suite")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.few, args.many, args.repeat, args.batch_size = 32, 16, 64, 1, 16
        args.layers = "features.relu4"
    if args.child is not None:
        child_scan(args)
        return 0
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    model = load(args.model, args.size)
    layers = args.layers.split(",")
    source = open_data(shapes=args.images, seed=11, size=args.size if args.model != "shapes" else 64)
    print(f"model {args.model}, layers {args.layers}, {args.images} images of {source.spec['size']} px, "
          f"batch {args.batch_size}, {args.threads} threads, median of {args.repeat}")
    if "cost" not in skip:
        with tempfile.TemporaryDirectory() as tmp:
            runs = [0]

            def full_scan():
                runs[0] += 1
                scan(model, source, layers, out=Path(tmp) / f"atlas{runs[0]}.sqlite", batch_size=args.batch_size)

            medians = interleaved({"forward": lambda: forward_only(model, source, layers, args.batch_size),
                                   "scan": full_scan}, args.repeat)
        ratio = medians["scan"] / medians["forward"]
        print(f"scan cost: truncated forward alone {medians['forward']:.2f} s, scan {medians['scan']:.2f} s: "
              f"{ratio:.2f}x the forward passes (limit 1.3x) "
              f"[{args.images / medians['scan']:.0f} images/s]")
    if "memory" not in skip:
        few, many = peak_memory(args, args.few), peak_memory(args, args.many)
        print(f"memory: peak RSS {few:.0f} MiB scanning {args.few} images, {many:.0f} MiB scanning {args.many}: "
              f"{100 * (many / few - 1):+.1f} % (limit 10 %)")
    if "ray" not in skip:
        import ray

        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
        try:
            medians = interleaved({
                "local": lambda: scan(model, source, layers, batch_size=args.batch_size, part_size=args.part_size),
                "ray": lambda: scan(model, source, layers, batch_size=args.batch_size, part_size=args.part_size,
                                    engine="ray", concurrency=args.threads)}, args.repeat)
        finally:
            ray.shutdown()
        print(f"ray on one machine: local {medians['local']:.2f} s, ray {medians['ray']:.2f} s "
              f"({args.threads} actors): {medians['ray'] / medians['local']:.2f}x the local engine (limit 1.5x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
