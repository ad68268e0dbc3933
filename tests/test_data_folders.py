"""Data folders: symlinks that leave DATA, symlink loops, files that are not images, 20,000 images in flat memory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import convlens as cl
from convlens.errors import ConvlensWarning

def _png(path: Path, colour=(200, 30, 30), size=16) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)


def test_symlinks_that_leave_the_data_folder_are_left_out_unless_asked_and_a_loop_is_one_line(tmp_path, cli):
    from convlens.data.folders import image_files, scan_class_folders

    elsewhere = tmp_path / "elsewhere"
    _png(elsewhere / "secret.png")
    _png(elsewhere / "folder" / "far.png")
    data = tmp_path / "data"
    for name in ("a", "b"):
        _png(data / name / f"{name}0.png")
    (data / "a" / "leak.png").symlink_to(elsewhere / "secret.png")
    (data / "b" / "far").symlink_to(elsewhere / "folder", target_is_directory=True)
    (data / "a" / "again.png").symlink_to(data / "b" / "b0.png")  # a link inside the folder is read
    with pytest.warns(ConvlensWarning, match=r"left out 2 symlink\(s\) .* lead outside it .*--follow-links"):
        source = cl.atlas.open_data(data)
    assert source.keys == ["a/a0.png", "a/again.png", "b/b0.png"] and source.labels == [0, 0, 1]
    with pytest.warns(ConvlensWarning, match="left out 2 symlink"):
        assert [p.name for p in image_files(data)] == ["a0.png", "again.png", "b0.png"]
    with pytest.warns(ConvlensWarning, match="left out 2 symlink"):
        assert scan_class_folders(data)[1] == [0, 0, 1]
    followed = cl.atlas.open_data(data, follow_links=True)
    assert followed.keys == ["a/a0.png", "a/again.png", "a/leak.png", "b/b0.png", "b/far/far.png"]
    assert [p.name for p in image_files(data, follow_links=True)] == ["a0.png", "again.png", "leak.png", "b0.png",
                                                                      "far.png"]
    # the CLI: one warning line without the option, every image with it
    code, out, err = cli("scan", "shapes", data, "--layers", "features.relu3", "--top", 1, "--out",
                         tmp_path / "a.sqlite")
    assert code == 0 and err.count("convlens: warning: left out 2 symlink(s)") == 1, err
    assert "features.relu3: 64 units, 3 images" in out
    code, out, err = cli("scan", "shapes", data, "--layers", "features.relu3", "--top", 1, "--follow-links",
                         "--out", tmp_path / "b.sqlite")
    assert code == 0 and "warning" not in err and "features.relu3: 64 units, 5 images" in out, err
    assert cl.atlas.open_atlas(tmp_path / "b.sqlite").source().keys == followed.keys  # the store remembers
    # loops: a folder link back to its parent (followed only when asked), a link to itself
    (data / "b" / "up").symlink_to(data, target_is_directory=True)
    with pytest.warns(ConvlensWarning, match="left out 2 symlink"):
        assert len(cl.atlas.open_data(data, follow_links=False).keys) == 3  # not followed: no loop
    with pytest.raises(cl.ConvlensError, match=r"symlink loop: .*b/up leads back into a folder it is in"):
        cl.atlas.open_data(data, follow_links=True)
    (data / "b" / "up").unlink()
    (data / "a" / "self.png").symlink_to(data / "a" / "self.png")
    code, out, err = cli("scan", "shapes", data, "--layers", "features.relu3", "--out", tmp_path / "c.sqlite")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "symlink loop: " in err and "self.png" in err, err
    assert not (tmp_path / "c.sqlite").exists()


def test_a_folder_where_half_the_files_are_not_images_scans_the_rest_and_says_how_many_were_skipped(tmp_path, cli):
    data = tmp_path / "data"
    good = []
    for i in range(6):
        _png(data / f"{i:02d}.png", colour=(40 * i, 0, 0))
        good.append(f"{i:02d}.png")
        (data / f"{i:02d}b.png").write_bytes(b"this is not a PNG at all" * (i + 1))  # broken images
        (data / f"notes{i}.txt").write_text("not an image")                     # other files: not listed
    (data / "00c.png").write_bytes(_png_bytes()[:40])                          # a truncated PNG, first of all
    code, out, err = cli("scan", "shapes", data, "--layers", "features.relu3", "--top", 2, "--part-size", 4,
                         "--out", tmp_path / "a.sqlite")
    lines = [line for line in err.strip().splitlines() if not line.endswith("] scan")]  # progress lines aside
    assert code == 0 and lines == ["convlens: warning: skipped 7 unreadable image(s) of 13"], err
    assert "features.relu3: 64 units, 6 images" in out and "(7 unreadable image(s) skipped)" in out
    atlas = cl.atlas.open_atlas(tmp_path / "a.sqlite")
    seen = {atlas.keys[i] for i in atlas.stats["features.relu3"].top_image.ravel() if i >= 0}
    assert seen <= set(good)
    # the skipped count survives a resume: the second run has nothing left to scan and says the same
    code, out, err = cli("scan", "shapes", data, "--layers", "features.relu3", "--top", 2, "--part-size", 4,
                         "--out", tmp_path / "a.sqlite")
    assert code == 0 and err.strip().splitlines() == ["convlens: warning: skipped 7 unreadable image(s) of 13"], err


def _png_bytes(size: int = 8) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


MEMORY_PROBE = r"""
import io, os, resource, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
import convlens as cl
from convlens.models.loading import from_module

root = Path(sys.argv[1])
buffer = io.BytesIO()
Image.new("RGB", (16, 16), (200, 40, 40)).save(buffer, format="PNG")
model = from_module(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()), input_size=16)
# the scan is what is measured, not torchvision's per-image transform: a plain one keeps the test quick
model.transform = lambda picture: torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255).permute(2, 0, 1)
for count in (1000, 20000):
    data = root / str(count)
    for name in ("a", "b"):
        (data / name).mkdir(parents=True)
        first = data / name / "00000.png"
        first.write_bytes(buffer.getvalue())
        for i in range(1, count // 2):  # 20,000 files, one PNG's bytes: linked, not written again
            os.link(first, data / name / f"{i:05d}.png")
    atlas = cl.scan(model, data, ["1"], k=4, batch_size=100, part_size=5000, out=root / f"{count}.sqlite")
    assert atlas.stats["1"].images == count
    print(count, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
"""


def test_twenty_thousand_tiny_images_scan_in_flat_memory(tmp_path):
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    peaks = dict(line.split() for line in done.stdout.split("\n") if line)
    growth_mib = (int(peaks["20000"]) - int(peaks["1000"])) / 1024  # ru_maxrss is in KiB on Linux
    # measured: 8 MiB (the lists of paths, keys and labels: about 300 B an image, and the allocator's slack);
    # holding the decoded images would add about 26 MiB (16x16 RGB PIL images), their model inputs about
    # 64 MiB (float32, 3 KiB each). Small batches keep the allocator's own growth out of the figure.
    assert growth_mib < 20, growth_mib
    assert cl.atlas.open_atlas(tmp_path / "20000.sqlite").keys[-1] == "b/09999.png"
