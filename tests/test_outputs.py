"""Output places: checked before any work, one-line errors, and explain's files land as a complete set or not at all.

Tests run as root, where a chmod'ed folder still takes files: an unwritable
place is a path under an existing file, or a probe that the file system refuses
(monkeypatched).
"""

import errno
import re
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import convlens.fileio as fileio
from convlens.errors import ConvlensError
from convlens.fileio import check_output_dir, check_output_file, staged_folder


@pytest.fixture
def blocker(tmp_path) -> Path:
    """An ordinary file where a folder is expected."""
    path = tmp_path / "blocker.txt"
    path.write_text("keep me")
    return path


@pytest.fixture
def read_only(monkeypatch):
    """Every new file is refused, as on a read-only mount."""
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fileio.tempfile, "mkstemp", refuse)


def _listing(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- the checks -----------------------------------------------------------------------------------

def test_a_folder_that_exists_or_can_be_made_passes_and_nothing_is_written(tmp_path):
    assert check_output_dir(tmp_path) == tmp_path
    assert check_output_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert check_output_file(tmp_path / "c" / "report.html") == tmp_path / "c" / "report.html"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("case,message", [
    ("file", "--out {blocker} is a file, not a folder; pass a folder name"),
    ("under", "cannot write --out {blocker}/maps/x: {blocker} is a file, not a folder; pass another --out"),
])
def test_a_file_in_the_way_of_a_folder_is_one_line(blocker, case, message):
    path = blocker if case == "file" else blocker / "maps" / "x"
    with pytest.raises(ConvlensError) as caught:
        check_output_dir(path)
    assert str(caught.value) == message.format(blocker=blocker)


def test_a_folder_in_the_way_of_a_file_is_one_line(tmp_path, blocker):
    with pytest.raises(ConvlensError, match="is a folder, not a file; pass a file name"):
        check_output_file(tmp_path)
    with pytest.raises(ConvlensError, match=f"{blocker} is a file, not a folder"):
        check_output_file(blocker / "report.html", option="OUT")


def test_a_place_that_takes_no_files_is_one_line(tmp_path, read_only):
    with pytest.raises(ConvlensError) as caught:
        check_output_dir(tmp_path / "maps")
    assert str(caught.value) == (f"cannot write --out {tmp_path}/maps: {tmp_path} does not take new files "
                                 "(Read-only file system); pass another --out")


# -- a set of files, complete or not at all ---------------------------------------------------------

def test_a_staged_set_appears_at_once_with_the_usual_modes(tmp_path):
    target = tmp_path / "new" / "maps"
    with staged_folder(target) as stage:
        (stage / "a.txt").write_text("a")
        assert not target.exists()
    assert _listing(tmp_path) == {"new/maps/a.txt": b"a"}
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_staged_set_joins_an_existing_folder(tmp_path):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "old.txt").write_text("old")
    (tmp_path / "maps" / "b.txt").write_text("stale")
    with staged_folder(tmp_path / "maps") as stage:
        (stage / "b.txt").write_text("b")
    assert _listing(tmp_path) == {"maps/b.txt": b"b", "maps/old.txt": b"old"}


def test_a_failure_half_way_leaves_nothing_behind(tmp_path):
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.txt").write_text("old")
    for target in (tmp_path / "kept", tmp_path / "deep" / "er" / "maps"):
        with pytest.raises(ConvlensError, match=f"^no space left on device while writing {target}; nothing half-written"):
            with staged_folder(target) as stage:
                (stage / "a.txt").write_text("a")
                raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]  # no stage, no parents made for it
    assert _listing(tmp_path) == {"kept/old.txt": b"old"}


# -- the commands ----------------------------------------------------------------------------------

@pytest.fixture
def run(cli):
    return cli


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for name in ("one", "two"):
        path = tmp_path / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.fixture
def calls(monkeypatch):
    """Records every model load, heatmap, report, training and dataset run a command starts."""
    import convlens.data.shapes
    import convlens.evaluation.runner
    import convlens.heatmaps
    import convlens.models
    import convlens.report
    import convlens.train

    record = []

    def recorder(name):
        def called(*args, **kwargs):
            record.append(name)
            raise RuntimeError(f"{name} ran before the output place was checked")
        return called

    # the commands import these when they run, so the modules that define them are patched
    for module, name in [(convlens.models, "load_model"), (convlens.heatmaps, "explain"),
                         (convlens.report, "build_report"), (convlens.evaluation.runner, "evaluate"),
                         (convlens.train, "train"), (convlens.data.shapes, "write_shapes")]:
        monkeypatch.setattr(module, name, recorder(name))
    return record


def _commands(out: Path, photo: Path, data: Path) -> dict[str, list]:
    return {
        "explain": ["explain", "shapes", photo, "--out", out],
        "evaluate": ["evaluate", "shapes", data, "--out", out],
        "activations": ["activations", "shapes", photo, "--out", out],
        "filters": ["filters", "shapes", "--layers", "features.conv1", "--out", out],
        "class-model": ["class-model", "shapes", "--classes", "0", "--out", out],
        "train": ["train", data, "--out", out],
        "shapes": ["shapes", out, "--per-class", "1"],
        "report": ["report", photo, "--out", out / "report.html"],
        "deepdream": ["deepdream", "shapes", photo, "--layers", "features.conv1", "--out", out / "dream.png"],
    }


@pytest.mark.parametrize("command", list(_commands(Path("o"), Path("p"), Path("d"))))
@pytest.mark.parametrize("place", ["under a file", "read-only"])
def test_every_writing_command_checks_its_output_first(run, calls, blocker, photos, tmp_path, monkeypatch,
                                                       command, place):
    if place == "read-only":
        out = tmp_path / "fresh"
        monkeypatch.setattr(fileio.tempfile, "mkstemp",
                            lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "Read-only file system")))
    else:
        out = blocker / "out"
    before = _listing(tmp_path)
    code, _, err = run(*_commands(out, photos[0], tmp_path)[command])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot write" in err and ("is a file" in err or "Read-only file system" in err)
    assert calls == []  # failed fast: no model loaded, nothing computed
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("command", ["explain", "activations", "filters", "class-model", "train", "shapes"])
def test_a_folder_output_that_is_a_file_is_refused(run, calls, blocker, photos, tmp_path, command):
    code, _, err = run(*_commands(blocker, photos[0], tmp_path)[command])
    assert code == 2 and f"{blocker} is a file, not a folder" in err and len(err.strip().splitlines()) == 1
    assert calls == [] and blocker.read_text() == "keep me"


@pytest.mark.parametrize("command", ["report", "deepdream"])
def test_a_file_output_that_is_a_folder_is_refused(run, calls, photos, tmp_path, command):
    (tmp_path / "taken").mkdir()
    args = _commands(tmp_path, photos[0], tmp_path)[command]
    args[args.index("--out") + 1] = tmp_path / "taken"
    code, _, err = run(*args)
    assert code == 2 and "is a folder, not a file" in err and calls == []


def test_explain_leaves_no_part_of_the_set_when_the_disk_fills(run, photos, tmp_path, monkeypatch):
    import convlens.cli.explain as cli_explain

    real_save = cli_explain.save_image
    saved = []

    def fill_up_on_the_third(image, path):
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        return real_save(image, path)

    monkeypatch.setattr(cli_explain, "save_image", fill_up_on_the_third)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    before = _listing(tmp_path)
    for out in (tmp_path / "maps", tmp_path / "kept"):
        saved.clear()
        code, _, err = run("explain", "shapes", *photos, "--methods", "gradcam,saliency", "--out", out)
        problems = [line for line in err.strip().splitlines() if not re.match(r"\[\d+/\d+\] ", line)]
        assert code == 2 and len(problems) == 1, err  # one line, after the progress lines of the work done
        assert f"no space left on device while writing {out}; nothing half-written was left; free some" in err
        assert len(saved) == 2  # two overlays (and their .npy) had been written when the disk filled
    assert _listing(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept", "one.png", "two.png"]


def test_explain_writes_the_whole_set(run, photos, tmp_path):
    (tmp_path / "maps").mkdir()
    (tmp_path / "maps" / "notes.txt").write_text("mine")
    code, out, err = run("explain", "shapes", *photos, "--methods", "gradcam,saliency", "--out", tmp_path / "maps")
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert names == sorted(["notes.txt", "index.csv", "index.json", *(f"{stem}_{kind}" for stem in ("one", "two") for kind in (
        "gradcam.png", "gradcam.npy", "saliency.png", "saliency.npy", "explain.png"))])
    assert Image.open(tmp_path / "maps" / "one_gradcam.png").size == (40, 48)  # under the cap: full size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["maps", "one.png", "two.png"]
