"""Big photos: overlays and figures drawn at a capped size, decompression bombs refused on one line."""

import importlib.util
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from PIL import Image

import convlens as cl
from convlens.errors import ConvlensError
from convlens.models.transforms import imagenet_transform
from convlens.render.overlay import MAX_SIDE, colorize, comparison_figure, overlay_heatmap


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims ``width`` x ``height`` RGB pixels in a few bytes (its data is never reached)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00"))
                     + chunk(b"IEND", b""))
    return path


def test_colorize_gives_matplotlibs_own_colours():
    values = np.concatenate([np.linspace(0, 1, 1001), [0.0, 1.0, -0.5, 1.5, 0.999999]]).astype(np.float32)
    for name in ("jet", "viridis", "gray"):
        expected = (colormaps[name](np.clip(values, 0, 1))[:, :3] * 255).round().astype(np.uint8)
        np.testing.assert_array_equal(colorize(values[None], name)[0], expected)


def test_a_photo_within_the_cap_is_blended_as_before():
    """At or under MAX_SIDE nothing changes: full resolution, the same pixels as the float formula."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))
    heatmap = torch.from_numpy(rng.random((224, 224), dtype=np.float32))
    transform = imagenet_transform(224, 256)
    blended = np.asarray(overlay_heatmap(photo, heatmap, transform=transform, alpha=0.3))
    # by hand: the crop box is (68.75, 18.75, 331.25, 281.25) -> pixels 69..331 x 19..281
    resized = np.asarray(Image.fromarray(heatmap.numpy()).resize((262, 262), Image.BILINEAR))
    colours = (colormaps["jet"](resized)[..., :3] * 255).round()
    original = np.asarray(photo).astype(np.float64)
    expected = original.copy()
    expected[19:281, 69:331] = 0.7 * original[19:281, 69:331] + 0.3 * colours
    assert blended.shape == (300, 400, 3)
    assert np.abs(blended.astype(np.float64) - expected.round()).max() <= 1  # float32 vs float64 rounding
    np.testing.assert_array_equal(blended[:19], np.asarray(photo)[:19])  # outside the box: untouched


def test_a_big_photo_is_drawn_at_the_cap_with_its_crop_box_scaled():
    photo = Image.new("RGB", (4000, 2000), (128, 128, 128))
    blended = overlay_heatmap(photo, torch.ones(224, 224), transform=imagenet_transform(224, 256), alpha=0.5)
    assert MAX_SIDE == 2048 and blended.size == (2048, 1024)
    # crop box in the original: (1125, 125, 2875, 1875); scaled by 2048/4000: (576, 64, 1472, 960)
    inside = tuple(int(round(0.5 * 128 + 0.5 * c)) for c in colorize(np.ones((1, 1)), "jet")[0, 0])
    array = np.asarray(blended)
    assert tuple(array[64, 576]) == inside and tuple(array[959, 1471]) == inside
    for y, x in ((63, 576), (64, 575), (960, 1471), (959, 1472), (0, 0)):
        assert tuple(array[y, x]) == (128, 128, 128)
    assert overlay_heatmap(photo, torch.ones(8, 8), max_side=100).size == (100, 50)
    assert overlay_heatmap(photo, torch.ones(8, 8), max_side=None).size == (4000, 2000)


def test_overlay_memory_does_not_grow_with_the_photo():
    photo = Image.new("RGB", (4000, 4000), (90, 120, 150))
    tracemalloc.start()  # NumPy reports its buffers to tracemalloc
    try:
        overlay_heatmap(photo, torch.rand(224, 224, generator=torch.Generator().manual_seed(0)))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a 2048x2048 crop box blended in float32 is ~140 MB; at full size it was ~1.5 GB
    assert peak < 200 * 2**20, f"{peak / 2**20:.0f} MB"


def test_the_comparison_figure_gets_pictures_at_the_cap():
    photo = Image.new("RGB", (5000, 2500), (10, 20, 30))
    figure = comparison_figure(photo, [("gradcam", photo)], max_side=500)
    shown = [axis.images[0].get_array().shape for axis in figure.axes]
    assert shown == [(250, 500, 3), (250, 500, 3)]
    assert comparison_figure(photo, []).axes[0].images[0].get_array().shape == (1024, 2048, 3)


def test_a_decompression_bomb_is_a_one_line_error(tmp_path):
    path = png_header(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(ConvlensError) as caught:
        cl.load_image(path)
    message = str(caught.value)
    assert "too large: 900,000,000 pixels" in message and f"limit is {Image.MAX_IMAGE_PIXELS:,}" in message
    assert "scale it down" in message and "\n" not in message


def test_an_image_pillow_only_warns_about_is_refused_too(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow warns above 10,000, raises above 20,000
    Image.new("RGB", (120, 120), "red").save(tmp_path / "warned.png")
    with pytest.raises(ConvlensError, match="too large: 14,400 pixels, the limit is 10,000"):
        cl.load_image(tmp_path / "warned.png")
    Image.new("RGB", (100, 100), "red").save(tmp_path / "fine.png")
    assert cl.load_image(tmp_path / "fine.png").size == (100, 100)


def test_the_cli_refuses_a_bomb_with_exit_2(tmp_path, capsys):
    from convlens.cli import main

    bomb = png_header(tmp_path / "bomb.png", 30000, 30000)
    with pytest.raises(SystemExit) as exit_info:
        main(["explain", "shapes", str(bomb), "--out", str(tmp_path / "maps")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1 and "too large" in err
    assert not (tmp_path / "maps").exists()


def test_memory_benchmark_script_runs(capsys):
    path = Path(__file__).parent.parent / "benchmarks" / "bench_memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--size", "300", "--small", "64", "--explain-models", "shapes",
                       "--report-models", ""]) == 0
    out = capsys.readouterr().out
    assert "shapes     explain gradcam,saliency" in out and "within the bound of 1.5 GB" in out
