"""The atlas store under faults: kill -9 mid-run, two writers, damaged files, hostile names, a full disk."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

import convlens as cl
from convlens.atlas.store import AtlasStore
from convlens.atlas.storefile import TEST_KILL

SCAN = ["--shapes", 12, "--seed", 3, "--layers", "features.relu3", "--top", 3, "--batch-size", 2, "--part-size", 2]


def tables(path: Path) -> dict[str, list[tuple]]:
    """Every table of a store, its rows in a fixed order (read-only)."""
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {name: sorted(db.execute(f'SELECT * FROM "{name}"').fetchall(),
                             key=lambda row: tuple(repr(v) for v in row if not isinstance(v, float)))
                for name in names}
    finally:
        db.close()


def assert_same_store(a: Path, b: Path) -> None:
    """Every table equal: integers, text and blobs (the sketches) exactly, floats to 1e-9."""
    left, right = tables(a), tables(b)
    assert list(left) == list(right)
    for name in left:
        assert len(left[name]) == len(right[name]), name
        for row_a, row_b in zip(left[name], right[name]):
            assert len(row_a) == len(row_b)
            for x, y in zip(row_a, row_b):
                if isinstance(x, float) and isinstance(y, float) and not (math.isinf(x) or math.isinf(y)):
                    assert x == pytest.approx(y, rel=1e-9, abs=1e-12), (name, row_a, row_b)
                else:
                    assert x == y, (name, row_a, row_b)


def _cli_child(args: list[str], kill_at: str) -> None:
    os.environ[TEST_KILL] = kill_at
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from convlens.cli import main

    main([str(a) for a in args])


@pytest.fixture(scope="module")
def forkserver():
    """Processes forked from a fresh one that imported torch and convlens and ran nothing: fast to start, and
    free of the OpenMP pool a fork of this (busy) process would inherit locked."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "convlens.cli", "convlens.atlas"])
    return context


def killed_cli(context, *args, kill_at: str) -> int:
    """Run the CLI in a new process that SIGKILLs itself at ``kill_at``; its exit code."""
    child = context.Process(target=_cli_child, args=([str(a) for a in args], kill_at))
    child.start()
    child.join(120)
    if child.exitcode is None:
        child.kill()
    return child.exitcode


def part_numbers(store: Path, job: str) -> list[int]:
    if not store.exists():
        return []
    return sorted(row[1] for row in tables(store)["parts"] if row[0] == job)


# -- kill -9 ---------------------------------------------------------------------------------

def test_scan_killed_at_five_points_then_run_again_equals_an_uninterrupted_scan(tmp_path, cli, forkserver):
    reference = tmp_path / "reference.sqlite"
    code, out, err = cli("scan", "shapes", *SCAN, "--out", reference)
    assert code == 0, err
    store = tmp_path / "atlas.sqlite"
    # inside the commit of a part (the journal is hot), or right after it
    for point, committed in [("scan:0:before", []), ("scan:1:after", [0, 1]), ("scan:2:before", [0, 1]),
                             ("scan:3:after", [0, 1, 2, 3]), ("scan:4:before", [0, 1, 2, 3])]:
        assert killed_cli(forkserver, "scan", "shapes", *SCAN, "--out", store, kill_at=point) == -signal.SIGKILL, point
        assert part_numbers(store, "scan") == committed, point
        if committed:  # the journal of a commit cut before it was synced is not hot: readers see the parts
            assert cl.atlas.open_atlas(store).stats["features.relu3"].images == 2 * len(committed)
    seen = []
    atlas = cl.scan(cl.load_model("shapes"), shapes=12, seed=3, layers=["features.relu3"], k=3, batch_size=2,
                    part_size=2, out=store, model_source="shapes", progress=lambda done, total: seen.append(total))
    assert set(seen) == {4}  # only the two parts never committed ran again
    assert atlas.stats["features.relu3"].images == 12
    assert not Path(f"{store}-journal").exists() and not Path(f"{store}.lock").exists()
    assert_same_store(store, reference)


def test_dissect_killed_at_six_points_then_run_again_equals_an_uninterrupted_dissect(tmp_path, cli, forkserver):
    args = ["dissect", "shapes", *SCAN, "--no-figures"]
    code, out, err = cli(*args, "--out", tmp_path / "reference")
    assert code == 0, err
    folder = tmp_path / "dissection"
    store = folder / "atlas.sqlite"
    for point, scanned, dissected in [
            ("scan:2:after", 3, []), ("dissect:0:before", 6, []), ("dissect:1:after", 6, [0, 1]),
            ("dissect:3:before", 6, [0, 1, 2]), ("dissect:4:after", 6, [0, 1, 2, 3, 4]),
            ("dissect:5:after", 6, [0, 1, 2, 3, 4, 5])]:  # the last: every part committed, no outputs yet
        assert killed_cli(forkserver, *args, "--out", folder, kill_at=point) == -signal.SIGKILL, point
        assert len(part_numbers(store, "scan")) == scanned and part_numbers(store, "dissect") == dissected, point
    assert not (folder / "dissection.csv").exists()
    code, out, err = cli(*args, "--out", folder)
    assert code == 0, err
    assert_same_store(store, tmp_path / "reference" / "atlas.sqlite")
    for name in ("dissection.csv", "summary.md"):
        assert (folder / name).read_text() == (tmp_path / "reference" / name).read_text()
    assert sorted(p.name for p in folder.iterdir()) == ["atlas.sqlite", "dissection.csv", "summary.md"]
