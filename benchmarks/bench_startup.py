"""How fast ``convlens --help`` and ``convlens --version`` answer, against ``import torch`` (what they avoid).

Each command runs in a fresh subprocess ``--repeat`` times; the best wall time
is printed (the least disturbed by other work on the machine), with the
median and the peak resident memory of the best run (``os.wait4``, that
process's own peak). The ``convlens`` script next to this Python is used, as
a user runs it; without one, ``python -c 'from convlens.cli import main; main()'``.

    PYTHONPATH=src python benchmarks/bench_startup.py --repeat 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def convlens_command() -> list[str]:
    """The ``convlens`` console script of this Python's environment, or the same entry point through ``-c``."""
    script = Path(sys.executable).with_name("convlens")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from convlens.cli import main; main()"]


def timed(command: list[str]) -> tuple[float, float]:
    """Run ``command`` once: (wall seconds, peak RSS in MB of that process)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited with {process.returncode}")
    return wall, usage.ru_maxrss / 1024  # Linux reports kB


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="Runs per command (best and median are printed).")
    args = parser.parse_args(argv)
    torch_import = "python -c 'import torch'"
    cases = {
        "convlens --help": convlens_command() + ["--help"],
        "convlens --version": convlens_command() + ["--version"],
        torch_import: [sys.executable, "-c", "import torch"],
    }
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{os.cpu_count()} CPUs, 1-minute load average {load:.2f} before the runs; best of {args.repeat}")
    best = {}
    for name, command in cases.items():
        runs = [timed(command) for _ in range(args.repeat)]
        walls = [wall for wall, _ in runs]
        fastest = min(runs)
        best[name] = fastest[0]
        print(f"{name:<26} {fastest[0]:6.3f} s best  {statistics.median(walls):6.3f} s median  "
              f"{fastest[1]:6.0f} MB peak")
    print(f"convlens --help answers {best[torch_import] / best['convlens --help']:.1f}x faster than importing torch "
          "alone")
    return best


if __name__ == "__main__":
    main()
