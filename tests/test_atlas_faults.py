"""The atlas store under faults: kill -9 mid-run, two writers, damaged files, hostile names, a full disk."""

from __future__ import annotations

import math
import multiprocessing
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

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
    found = tables(store) if store.exists() else {}
    return sorted(row[1] for row in found.get("parts", []) if row[0] == job)


# -- kill -9 ---------------------------------------------------------------------------------

def test_scan_killed_at_six_points_then_run_again_equals_an_uninterrupted_scan(tmp_path, cli, forkserver):
    reference = tmp_path / "reference.sqlite"
    code, out, err = cli("scan", "shapes", *SCAN, "--out", reference)
    assert code == 0, err
    store = tmp_path / "atlas.sqlite"
    # inside the store's creation, inside the commit of a part (before COMMIT), or right after it
    for point, committed in [("create:0:before", []), ("scan:0:before", []), ("scan:1:after", [0, 1]),
                             ("scan:2:before", [0, 1]), ("scan:3:after", [0, 1, 2, 3]),
                             ("scan:4:before", [0, 1, 2, 3])]:
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


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except FileNotFoundError:
        return False


def test_a_second_scan_of_a_store_being_written_is_refused_on_one_line_and_the_store_is_not_mixed(
        tmp_path, cli, forkserver):
    reference = tmp_path / "reference.sqlite"
    assert cli("scan", "shapes", *SCAN, "--out", reference)[0] == 0
    store = tmp_path / "atlas.sqlite"
    # the first scan stops itself (SIGSTOP) right after committing part 1, holding the store's writer lock
    first = forkserver.Process(target=_cli_child, args=([str(a) for a in ("scan", "shapes", *SCAN, "--out", store)],
                                                        "scan:1:after:STOP"))
    first.start()
    try:
        for _ in range(600):
            if _stopped(first.pid):
                break
            first.join(0.05)
        assert _stopped(first.pid)
        before = store.read_bytes()
        code, _, err = cli("scan", "shapes", *SCAN, "--out", store)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"another convlens scan or dissect is writing {store}" in err and "wait for it to finish" in err
        assert store.read_bytes() == before and part_numbers(store, "scan") == [0, 1]
    finally:
        os.kill(first.pid, signal.SIGCONT)
        first.join(60)
    assert first.exitcode == 0
    assert_same_store(store, reference)
    assert not Path(f"{store}.lock").exists()


def _hot_journal_child(path: str) -> None:
    """Rewrite every unit row with a tiny page cache (pages spill into the file), then die before COMMIT."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA cache_size = 2")
    db.execute("BEGIN IMMEDIATE")
    db.execute("UPDATE units SET mean = mean + 1, m2 = m2 + 1")
    db.execute("UPDATE sketches SET counts = zeroblob(length(counts))")
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_store_killed_mid_commit_is_refused_by_readers_and_rolled_back_by_the_resumed_scan(
        tmp_path, cli, forkserver):
    reference = tmp_path / "reference.sqlite"
    assert cli("scan", "shapes", *SCAN, "--out", reference)[0] == 0
    store = tmp_path / "atlas.sqlite"
    store.write_bytes(reference.read_bytes())
    child = forkserver.Process(target=_hot_journal_child, args=(str(store),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    journal = Path(f"{store}-journal")
    assert journal.exists() and store.read_bytes() != reference.read_bytes()  # the file holds half a commit
    damaged, hot = store.read_bytes(), journal.read_bytes()
    code, _, err = cli("examples", store, "--layer", "features.relu3", "--units", 0, "--steps", 0,
                       "--out", tmp_path / "examples")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "left mid-write" in err, err
    assert "run the same command again" in err
    assert store.read_bytes() == damaged and journal.read_bytes() == hot and not (tmp_path / "examples").exists()
    code, _, err = cli("scan", "shapes", *SCAN, "--out", store)  # SQLite rolls the journal back; nothing left to do
    assert code == 0, err
    assert store.read_bytes() == reference.read_bytes() and not journal.exists()


# -- damaged files -------------------------------------------------------------------------

DISSECT = ["--shapes", 8, "--seed", 3, "--layers", "features.relu3", "--top", 2, "--part-size", 4]


@pytest.fixture(scope="module")
def dissected(tmp_path_factory):
    """A store with scan and dissection tables."""
    from convlens.cli import main

    folder = tmp_path_factory.mktemp("base") / "dissection"
    with pytest.raises(SystemExit) as exited:
        main([str(a) for a in ("dissect", "shapes", *DISSECT, "--no-figures", "--out", folder)])
    assert not exited.value.code
    return folder / "atlas.sqlite"


def _damage(store: Path, how: str) -> None:
    data = bytearray(store.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    if how == "header":
        data[0:16] = b"not a database!!"
    elif how == "truncated":
        data = data[:len(data) // 2]
    elif how == "middle page":
        middle = (len(data) // page) // 2
        data[middle * page:(middle + 1) * page] = bytes((i * 37 + 11) % 256 for i in range(page))
    elif how == "bogus wal":
        Path(f"{store}-wal").write_bytes(b"\x37\x7f\x06\x82" + bytes(range(256)) * 16)
    store.write_bytes(bytes(data))


@pytest.mark.parametrize("how, message", [
    ("header", "is not a convlens atlas"), ("truncated", "is damaged"), ("middle page", "is damaged"),
    ("bogus wal", "convlens writes a rollback journal, never a write-ahead log")])
def test_a_damaged_store_is_one_line_for_examples_dissect_and_a_resumed_scan_and_is_left_as_it_was(
        tmp_path, cli, dissected, how, message):
    folder = tmp_path / "dissection"
    folder.mkdir()
    store = folder / "atlas.sqlite"
    store.write_bytes(dissected.read_bytes())
    _damage(store, how)
    files = {path.name: path.read_bytes() for path in folder.iterdir()}
    for args in [("examples", store, "--layer", "features.relu3", "--units", 0, "--steps", 0, "--out",
                  tmp_path / "examples"),
                 ("scan", "shapes", *DISSECT, "--out", store),
                 ("dissect", "shapes", *DISSECT, "--no-figures", "--out", folder)]:
        code, out, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args[0], err)
        assert "Traceback" not in err
        assert {path.name: path.read_bytes() for path in folder.iterdir()} == files, args[0]
    assert not (tmp_path / "examples").exists()


# -- a full disk ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs (needs root and mount rights; skipped otherwise)."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip() or 'not root'})")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` until ``leave`` bytes are free."""
    filler = disk / "filler"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def test_a_disk_that_fills_during_scan_is_one_line_and_leaves_a_store_of_whole_parts_a_rerun_resumes(
        tmp_path, cli, small_disk):
    reference = tmp_path / "reference.sqlite"
    assert cli("scan", "shapes", *SCAN, "--out", reference)[0] == 0
    size = reference.stat().st_size
    # no room for the store: nothing is left behind
    filler = _fill(small_disk, 8192)
    store = small_disk / "atlas.sqlite"
    code, _, err = cli("scan", "shapes", *SCAN, "--out", store)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no space left on the device" in err, err
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
    # room for the store but not for the journal of the next commit: the parts committed so far stay
    filler.unlink()
    filler = _fill(small_disk, size + size // 2)
    code, _, err = cli("scan", "shapes", *SCAN, "--out", store)
    lines = err.strip().splitlines()  # the progress lines of the parts done, then the error
    assert code == 2 and lines[-1].startswith("convlens: error: no space left on the device"), err
    assert all(line.endswith("] scan") for line in lines[:-1]), err
    assert "run the same command again to resume" in err
    db = sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)
    assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
    committed = [row[0] for row in db.execute("SELECT part FROM parts ORDER BY part")]
    assert 1 <= len(committed) < 6 and committed == list(range(len(committed)))
    assert db.execute("SELECT images FROM layers").fetchone() == (2 * len(committed),)
    db.close()
    filler.unlink()
    seen = []
    atlas = cl.scan(cl.load_model("shapes"), shapes=12, seed=3, layers=["features.relu3"], k=3, batch_size=2,
                    part_size=2, out=store, model_source="shapes", progress=lambda done, total: seen.append(total))
    assert set(seen) == {12 - 2 * len(committed)} and atlas.stats["features.relu3"].images == 12
    assert_same_store(store, reference)


# -- names are data ------------------------------------------------------------------------

HOSTILE_LAYER = "conv'\";DROP TABLE units;--<script>alert(1)</script>\nünï"
HOSTILE_CLASSES = ["b\"q'uote; DROP TABLE classes;--", "<script>alert('x')</script>\nzweite Zeile ü"]


class Named(torch.nn.Module):
    """A 1x1 convolution (unit 0 = red, unit 1 = green) under a hostile name."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d(3, 2, 1, bias=False)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[0, 0] = 1.0
            conv.weight[1, 1] = 1.0
        self.add_module(HOSTILE_LAYER, conv)
        self.head = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.head(getattr(self, HOSTILE_LAYER)(x).mean(dim=(2, 3)))


def _hostile_data(root: Path) -> Path:
    """Eight 32x32 images in a list file: a red square (class 0) or a green one (class 1), masks beside."""
    import csv

    from PIL import Image

    rows = []
    for i in range(8):
        label = i % 2
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        mask = np.zeros((32, 32), dtype=np.uint8)
        y, x = 2 + 3 * i, 20 - 2 * i
        image[y:y + 8, x:x + 8, label] = 255
        mask[y:y + 8, x:x + 8] = 255
        Image.fromarray(image).save(root / f"{i}.png")
        Image.fromarray(mask).save(root / f"{i}.mask.png")
        rows.append([f"{i}.png", HOSTILE_CLASSES[label]])
    listing = root / "list.csv"
    with open(listing, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    return listing


def test_hostile_layer_and_class_names_go_through_the_store_the_outputs_and_the_report_as_data(tmp_path):
    import csv

    import jinja2

    from convlens.models.loading import from_module
    from convlens.report.atlas_section import atlas_section
    from convlens.report.context import Context

    listing = _hostile_data(tmp_path)
    model = from_module(Named(), name="named", input_size=32)
    result = cl.dissect(model, listing, [HOSTILE_LAYER], out=tmp_path / "out", k=2, batch_size=4)
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").iterdir())  # flat: a '/' in a name is no folder
    assert figures == [f"conv_DROP_TABLE_units_--_script_alert_1_script_ünï-unit{u}.png" for u in (0, 1)]
    assert sorted(result.concepts) == sorted(HOSTILE_CLASSES)
    red, green = result.concepts.index(HOSTILE_CLASSES[0]), result.concepts.index(HOSTILE_CLASSES[1])
    assert result.iou[HOSTILE_LAYER][0, red] == 1.0 and result.iou[HOSTILE_LAYER][1, green] == 1.0
    with AtlasStore.open(tmp_path / "out" / "atlas.sqlite") as store:
        assert store.layer_names() == [HOSTILE_LAYER]
        assert store.classes() == sorted(HOSTILE_CLASSES) and store.concepts() == result.concepts
        assert [row[3] for row in store.dissection()] == [HOSTILE_CLASSES[0], HOSTILE_CLASSES[1]]
        assert sorted(name for name, in store.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")) == [
            "class_means", "classes", "concept_pixels", "concepts", "dissection", "images", "layers", "meta",
            "overlaps", "parts", "sketches", "tops", "units"]
    reopened = cl.atlas.open_atlas(tmp_path / "out" / "atlas.sqlite")
    np.testing.assert_array_equal(reopened.stats[HOSTILE_LAYER].top_image, result.atlas.stats[HOSTILE_LAYER].top_image)
    with open(tmp_path / "out" / "dissection.csv", newline="", encoding="utf-8") as handle:
        table = list(csv.reader(handle))
    assert [(row[0], row[1], row[3]) for row in table[1:]] == [(HOSTILE_LAYER, "0", HOSTILE_CLASSES[0]),
                                                               (HOSTILE_LAYER, "1", HOSTILE_CLASSES[1])]
    summary = (tmp_path / "out" / "summary.md").read_text(encoding="utf-8").splitlines()
    assert len(summary) == 3  # header, rule, one row: no name breaks the table
    ctx = Context(model, cl.summarize(model), [], {"atlas_data": listing, "atlas_layers": [HOSTILE_LAYER],
                                                   "atlas_units": 2, "atlas_examples": 1, "atlas_steps": 0})
    section = atlas_section(ctx)
    # as report.html.j2 shows a section (autoescaped): the HTML as it is, the note as text
    html = jinja2.Environment(autoescape=True).from_string(
        '{{ s.html }}<p class="note">{{ s.note }}</p>').render(s=section)
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in html


def test_a_store_in_a_folder_that_cannot_be_made_is_one_line(cli):
    code, out, err = cli("scan", "shapes", *SCAN, "--out", "/proc/convlens-nowhere/atlas.sqlite")
    assert code == 2 and err.strip().splitlines() == [
        "convlens: error: cannot write the atlas /proc/convlens-nowhere/atlas.sqlite (No such file or directory); "
        "pass an --out in a folder you can write"], err


def test_a_layer_named_like_a_path_writes_its_figures_inside_the_output_folder(tmp_path):
    from convlens.models.loading import from_module

    escape = str(tmp_path / "escaped")  # an absolute path: joined as it is, it would replace the output folder
    module = torch.nn.Sequential()
    module.add_module(escape, torch.nn.Conv2d(3, 2, 1))
    model = from_module(module, input_size=16)
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        from PIL import Image

        Image.new("RGB", (16, 16), (60 * i, 20, 200)).save(data / f"{i}.png")
    files = cl.atlas.write_examples(cl.scan(model, data, [escape], k=2), escape, [0, 1], tmp_path / "out",
                                    model=model, pattern_steps=0)
    assert [f.parent for f in files] == [tmp_path / "out"] * 2
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        f"_{escape[1:].replace('/', '_')}-unit{u}.png" for u in (0, 1)]
    assert not list(tmp_path.glob("escaped*"))
