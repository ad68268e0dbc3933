"""``convlens report`` on a quiet machine and beside CPU-bound processes: wall time, CPU time, their ratio.

A shared machine is the usual case (a laptop with a browser, a CI runner, a
server with other jobs). PyTorch's OpenMP threads spin while they wait for
work unless ``OMP_WAIT_POLICY=PASSIVE``, which ``convlens`` sets for itself
(:func:`convlens.cli.common.wait_passively`); beside busy processes the
spinning threads take CPU from both. The command runs once on the machine as
it is, then again beside ``--hogs`` processes doing ``while True: pass``
(killed when it ends, whatever happens). Wall and CPU time come from
``os.wait4`` on the command's own process.

    PYTHONPATH=src python benchmarks/bench_busy.py               # convlens's policy (PASSIVE)
    PYTHONPATH=src python benchmarks/bench_busy.py --no-policy   # OMP_WAIT_POLICY=ACTIVE: what spinning costs
    PYTHONPATH=src python benchmarks/bench_busy.py --threads 1   # OMP_NUM_THREADS=1 instead of one per CPU

Run it on a quiet machine: the "quiet" run is the reference, and other work
on the machine makes both runs slower in ways the ratio does not show.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_startup import convlens_command  # noqa: E402


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``command`` once: (wall seconds, CPU seconds of that process and the children it waited for)."""
    with tempfile.TemporaryFile() as errors:  # a file, not a pipe: progress bars must not fill a pipe and block
        start = time.perf_counter()
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            errors.seek(0)
            raise SystemExit(f"{shlex.join(command)} failed: {errors.read().decode(errors='replace')[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def beside_hogs(count: int, command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """:func:`timed` while ``count`` CPU-bound processes run; they are killed however the run ends."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them reach full speed before the command starts
        return timed(command, env)
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-policy", action="store_true",
                        help="Run with OMP_WAIT_POLICY=ACTIVE (threads spin) for comparison.")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the command (default: convlens's choice).")
    parser.add_argument("--hogs", type=int, default=2, help="CPU-bound processes beside the busy run.")
    parser.add_argument("--command", default="report --out {out}",
                        help="The convlens arguments; {out} is a temporary folder's report.html.")
    args = parser.parse_args(argv)

    env = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if args.no_policy:
        env["OMP_WAIT_POLICY"] = "ACTIVE"
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        command = convlens_command() + shlex.split(args.command.format(out=Path(folder) / "report.html"))
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        policy = env.get("OMP_WAIT_POLICY", "convlens's default, PASSIVE")
        threads = env.get("OMP_NUM_THREADS", "convlens's default, one per CPU")
        print(f"{shlex.join(command)}\n{os.cpu_count()} CPUs, 1-minute load average {load:.2f} before the runs; "
              f"OMP_WAIT_POLICY: {policy}; OMP_NUM_THREADS: {threads}")
        quiet_wall, quiet_cpu = timed(command, env)
        print(f"quiet:                  wall {quiet_wall:7.1f} s   CPU {quiet_cpu:7.1f} s")
        busy_wall, busy_cpu = beside_hogs(args.hogs, command, env)
        print(f"beside {args.hogs} CPU-bound procs: wall {busy_wall:7.1f} s   CPU {busy_cpu:7.1f} s")
    ratio = busy_wall / quiet_wall
    print(f"busy/quiet wall time: {ratio:.2f}x")
    return ratio


if __name__ == "__main__":
    main()
