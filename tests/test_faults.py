"""Faults in the main jobs: a disk that fills up, SIGINT and SIGTERM mid-command, 16 predictions at once.

Each case ends on one stderr line with a known exit status, leaves no temporary
or partial file, and leaves what the folder held before byte for byte. The full
disk is real: a 4 MiB tmpfs mounted for the test (root only; skipped with the
reason elsewhere), filled up to a few pages before the command runs. The disk
tests run the command in this process (``cli``: the same ``main()`` as the
``convlens`` script) to save an interpreter start each; the signal tests need a
process to signal, so they start one.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from convlens.errors import ConvlensError
from convlens.fileio import disk_error

ROOT = Path(__file__).resolve().parents[1]
PROGRESS = re.compile(r"\[\d+/\d+\] ")  # a progress line of the work done before the fault


# -- helpers -------------------------------------------------------------------------------------------------
def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "MPLBACKEND": "Agg"}


def _listing(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones included) and its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder: Path) -> list[str]:
    """Temporary names a staged write would leave behind (``.name.xxxx.part``, probes)."""
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.name.endswith(".part") or p.name.startswith(".convlens-probe-")]


def _problems(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if not PROGRESS.match(line)]


def _whole_lines(journal: Path) -> list[dict]:
    raw = journal.read_bytes()
    assert raw == b"" or raw.endswith(b"\n"), "the journal ends in a part-line"
    return [json.loads(line) for line in raw.splitlines()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """A tiny eager CNN saved whole (needs --trust-code), and four small photos in data/."""
    root = tmp_path_factory.mktemp("faults")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    torch.save(net, root / "tiny.pt")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    for index in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "data" / f"p{index}.png")
    return root


TINY = ("--trust-code", "--input-size", "16")
EVALUATE = ("--methods", "gradcam", "--metrics", "deletion")


@pytest.fixture(scope="module")
def reference_results(files, tmp_path_factory) -> bytes:
    """results.csv of an evaluation nothing disturbed."""
    from convlens.cli import main

    out = tmp_path_factory.mktemp("reference") / "eval"
    with pytest.raises(SystemExit) as done:
        main(["evaluate", "shapes", str(files / "data"), *EVALUATE, "--out", str(out)])
    assert done.value.code in (0, None)
    return (out / "results.csv").read_bytes()


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (a disk that fills up quickly); skipped where mounting is not allowed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` up to ``leave`` free bytes with one file, and return that file (delete it to free the space)."""
    filler = disk / "filler"
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with open(filler, "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))
    stats = os.statvfs(disk)
    assert stats.f_bavail * stats.f_frsize <= leave + stats.f_frsize
    return filler


def _disk_full_line(err: str, out: Path) -> None:
    problems = _problems(err)
    assert len(problems) == 1, err
    assert re.fullmatch(rf"convlens: error: no space left on device while writing {re.escape(str(out))}; "
                        r"nothing half-written was left; free some space or choose another --out", problems[0]), err


# -- a disk that fills up ------------------------------------------------------------------------------------
def test_report_on_a_full_disk_leaves_the_earlier_report_as_it_was(cli, files, small_disk):
    out = small_disk / "report.html"
    out.write_bytes(b"<html>the earlier report</html>")
    (small_disk / "notes.txt").write_text("mine")
    fill(small_disk, leave=64 * 1024)  # the report (~1 MB) starts to be written, then the disk is full
    before = _listing(small_disk)
    code, _, err = cli("report", files / "data" / "p0.png", "--model", files / "tiny.pt", *TINY, "--out", out)
    assert code == 2
    _disk_full_line(err, out)
    assert _leftovers(small_disk) == [] and _listing(small_disk) == before


def test_evaluate_on_a_disk_that_fills_keeps_whole_journal_lines_and_resumes(cli, files, small_disk,
                                                                            reference_results):
    out = small_disk / "eval"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    filler = fill(small_disk, leave=24 * 1024)  # room for run.json and a few journal lines, not for the plots
    code, _, err = cli("evaluate", "shapes", files / "data", *EVALUATE, "--out", out)
    assert code == 2
    problems = _problems(err)
    assert len(problems) == 1 and problems[0].startswith("convlens: error: no space left on device while writing "
                                                         f"{out}"), err
    assert problems[0].endswith("nothing half-written was left; free some space or choose another --out")
    assert (out / "run.json").exists()  # the run had begun: the disk filled during it
    assert _leftovers(small_disk) == [] and (out / "notes.txt").read_text() == "mine"
    finished = _whole_lines(out / "journal.jsonl")
    assert all(record["method"] == "gradcam" for record in finished)
    filler.unlink()  # space again: the same command continues the run and ends where an undisturbed one does
    code, _, err = cli("evaluate", "shapes", files / "data", *EVALUATE, "--out", out)
    assert code == 0, err
    assert (out / "results.csv").read_bytes() == reference_results
    assert len(_whole_lines(out / "journal.jsonl")) == 4


def test_filters_on_a_full_disk_leave_the_earlier_set_as_it_was(cli, files, small_disk):
    out = small_disk / "filters"
    args = ("filters", files / "tiny.pt", "--layers", "2", "--grid", "1x2", "--steps", "2", "--size", "16", *TINY[:1],
            "--out", out)
    code, _, err = cli(*args)
    assert code == 0, err
    fill(small_disk, leave=4 * 1024)  # one page: the grid goes in, its JSON does not
    before = _listing(small_disk)
    code, _, err = cli(*args[:-2], "--seed", "1", "--out", out)
    assert code == 2
    _disk_full_line(err, out)
    assert _leftovers(small_disk) == [] and _listing(small_disk) == before


def test_a_journal_line_the_disk_half_took_is_taken_back(tmp_path, monkeypatch):
    """Before: a full disk mid-append left half a line, and the next run's line was glued to it."""
    import errno as errnos

    from convlens.evaluation import resume

    journal = resume.Journal(tmp_path / "journal.jsonl", "run1")
    record = {"image": "a.png", "method": "gradcam", "target": 0, "values": {"deletion": 0.5}, "curves": {}}
    journal.append(record)
    before = (tmp_path / "journal.jsonl").read_bytes()
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 10:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errnos.ENOSPC, "No space left on device")

    monkeypatch.setattr(resume.os, "write", half_then_full)
    with pytest.raises(ConvlensError, match=r"^no space left on device while writing .*journal\.jsonl; nothing half"):
        journal.append({**record, "image": "b.png"})
    assert (tmp_path / "journal.jsonl").read_bytes() == before


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on device while writing out/r.html; nothing "
                                                       "half-written was left; free some space or choose another --out"),
                                        (errno.EDQUOT, "disk quota exceeded while writing out/r.html"),
                                        (errno.EROFS, "read-only file system while writing out/r.html; nothing "
                                                      "half-written was left; choose another --out")])
def test_disk_errors_read_as_one_line(code, words):
    assert disk_error(OSError(code, os.strerror(code)), "out/r.html").startswith(words)


@pytest.mark.parametrize("args,shows", [(["report", "--no-such-flag"], "No such option: --no-such-flag"),
                                        (["filters", "shapes", "--layers", "x", "--steps", "many"], "'--steps'"),
                                        (["explain", "shapes"], "Missing argument 'IMAGES'")])
def test_usage_mistakes_are_one_line(cli, args, shows):
    code, _, err = cli(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("convlens: error: ") and shows in err and f"(see convlens {args[0]} --help)" in err


# -- SIGINT and SIGTERM mid-command ------------------------------------------------------------------------
def _start(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import sys\nfrom convlens.cli import main\nmain(sys.argv[1:])",
                             *map(str, args)], cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for(process: subprocess.Popen, ready, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"the command ended (exit {process.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no {what} within {timeout} s")
        time.sleep(0.005)


def test_sigint_while_explain_writes_its_set_leaves_the_folder_as_it_was(files, tmp_path):
    out = tmp_path / "maps"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = _listing(tmp_path)
    images = sorted((files / "data").iterdir())
    process = _start("explain", "shapes", *images, "--methods", "gradcam,saliency", "--out", out, cwd=tmp_path)
    _wait_for(process, lambda: any(p.name.startswith(".maps.") for p in tmp_path.iterdir()),
              "the staging folder appeared")
    process.send_signal(signal.SIGINT)  # half-way through writing the set
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert _problems(err) == ["convlens: interrupted (SIGINT); nothing half-written was left"], err
    assert _leftovers(tmp_path) == [] and _listing(tmp_path) == before


def test_sigterm_mid_evaluate_keeps_whole_journal_lines_and_the_run_resumes(cli, files, tmp_path, reference_results):
    out = tmp_path / "eval"
    journal = out / "journal.jsonl"
    process = _start("evaluate", "shapes", files / "data", *EVALUATE, "--out", out, cwd=tmp_path)
    _wait_for(process, lambda: journal.exists() and journal.stat().st_size > 0, "the first journal line")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert _problems(err) == ["convlens: interrupted (SIGTERM); nothing half-written was left"], err
    assert _leftovers(tmp_path) == []
    assert 1 <= len(_whole_lines(journal)) < 4
    code, _, err = cli("evaluate", "shapes", files / "data", *EVALUATE, "--out", out)
    assert code == 0, err
    assert (out / "results.csv").read_bytes() == reference_results


# -- many at once --------------------------------------------------------------------------------------------
#: Imports convlens and torch once, then forks 16 processes that each run `convlens predict` at the same time
#: (16 fresh interpreters would spend a minute importing torch on 2 cores); prints each one's exit status,
#: peak resident memory (kB, from wait4) and answer.
SIXTEEN = """
import json, os, sys
import torch, torchvision  # noqa: F401  (imported, not yet run: no thread pool exists to fork)
from convlens.cli import main
import convlens.images, convlens.models, rich.console, rich.table  # noqa: F401  (what predict imports)
image, folder = sys.argv[1:]
children = []
for number in range(16):
    pid = os.fork()
    if pid == 0:
        out = os.open(os.path.join(folder, f"{number}.json"), os.O_WRONLY | os.O_CREAT, 0o644)
        err = os.open(os.path.join(folder, f"{number}.err"), os.O_WRONLY | os.O_CREAT, 0o644)
        os.dup2(out, 1)
        os.dup2(err, 2)
        code = 1
        try:
            main(["predict", "shapes", image, "--json", "--top", "2"])
        except SystemExit as exit:
            code = exit.code or 0
        sys.stdout.flush()
        os._exit(code)
    children.append(pid)
for pid in children:
    _, status, usage = os.wait4(pid, 0)
    print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def test_sixteen_predictions_at_once_all_answer_within_the_machines_memory(files, tmp_path):
    folder = tmp_path / "answers"
    folder.mkdir()
    done = subprocess.run([sys.executable, "-c", SIXTEEN, str(files / "data" / "p0.png"), str(folder)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.split("\n") if line.strip()]
    assert len(rows) == 16 and all(code == "0" for code, _ in rows), done.stdout + done.stderr
    answers = {(folder / f"{number}.json").read_text() for number in range(16)}
    assert len(answers) == 1  # all the same answer
    (answer,) = [json.loads(text) for text in answers]
    assert answer[0]["predictions"][0]["probability"] > 0.5
    peak_kb = sum(int(peak) for _, peak in rows)  # resident peaks, shared library pages counted 16 times
    total_kb = int(re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text()).group(1))
    assert peak_kb < total_kb, f"16 predictions peaked at {peak_kb} kB together; the machine has {total_kb} kB"
