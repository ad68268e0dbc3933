"""How many shapes images per second convlens generates (in memory, and written to disk with masks).

No peer library makes this dataset, so the figures stand alone. Run on an idle machine:

    PYTHONPATH=src python benchmarks/shapes_speed.py --n 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from convlens.data import shapes_dataset, write_shapes


def images_per_second(n: int, size: int, repeats: int) -> tuple[float, float]:
    """(median wall-clock, median CPU-time) images/second of generating ``n`` samples of ``size`` x ``size``.

    CPU time is reported too because on a shared machine the wall clock mostly measures the neighbours.
    """
    wall, cpu = [], []
    for repeat in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        for _ in shapes_dataset(n, seed=repeat, size=size):
            pass
        wall.append(n / (time.perf_counter() - start))
        cpu.append(n / max(time.process_time() - start_cpu, 1e-9))
    return statistics.median(wall), statistics.median(cpu)


def written_per_second(n_per_class: int, size: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as folder:
        start, start_cpu = time.perf_counter(), time.process_time()
        write_shapes(folder, n_per_class, seed=0, size=size)
        return (8 * n_per_class / (time.perf_counter() - start),
                8 * n_per_class / max(time.process_time() - start_cpu, 1e-9))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    args = parser.parse_args(argv)
    results = {}
    for size in args.sizes:
        wall, cpu = images_per_second(args.n, size, args.repeats)
        disk_wall, disk_cpu = written_per_second(max(1, args.n // 40), size)
        results[size] = (wall, cpu, disk_wall, disk_cpu)
        print(f"{size:>4} px: in memory {wall:6.0f} images/s wall clock, {cpu:6.0f} per CPU-second "
              f"(median of {args.repeats}); written as PNG + mask {disk_wall:5.0f}/s wall, {disk_cpu:5.0f} per CPU-s "
              f"(one process, one core)")
    return results


if __name__ == "__main__":
    main()
