"""How many shapes images per second convlens generates (in memory, and written to disk with masks).

No peer library makes this dataset, so the figures stand alone. Run on an idle machine:

    PYTHONPATH=src python benchmarks/shapes_speed.py --n 4000 --repeats 5

Each size is measured in one process and with ``--workers`` processes (default:
one per CPU core); the samples are the same either way. CPU time (of the one
process) is reported too, because on a shared machine the wall clock partly
measures the neighbours.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from convlens.data import shapes_dataset, write_shapes


def images_per_second(n: int, size: int, repeats: int, workers: int = 1) -> tuple[float, float]:
    """(median wall-clock, median CPU-time of this process) images/second of generating ``n`` samples."""
    wall, cpu = [], []
    for repeat in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in shapes_dataset(n, seed=repeat, size=size, workers=workers):
            pass
        wall.append(n / (time.perf_counter() - start))
        cpu.append(n / max(time.process_time() - start_cpu, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


def written_per_second(n_per_class: int, size: int, workers: int = 1) -> float:
    """Wall-clock images/second of writing ``8 * n_per_class`` PNGs with their masks."""
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        write_shapes(folder, n_per_class, seed=0, size=size, workers=workers)
        return 8 * n_per_class / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    results = {}
    for size in args.sizes:
        wall, cpu = images_per_second(args.n, size, args.repeats)
        pool_wall, _ = images_per_second(args.n, size, args.repeats, args.workers)
        disk = written_per_second(max(1, args.n // 40), size)
        pool_disk = written_per_second(max(1, args.n // 40), size, args.workers)
        results[size] = (wall, cpu, pool_wall, disk, pool_disk)
        print(f"{size:>4} px: in memory {wall:6.0f} images/s in one process ({cpu:6.0f} per CPU-second), "
              f"{pool_wall:6.0f}/s with {args.workers} processes; written as PNG + mask {disk:5.0f}/s, "
              f"{pool_disk:5.0f}/s with {args.workers} processes (medians of {args.repeats}, wall clock)")
    return results


if __name__ == "__main__":
    main()
