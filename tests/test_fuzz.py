"""Image bytes from everywhere, through load_image, predict, explain and the mask reader (Hypothesis).

Every case is either a correct result, checked for something true about it (the
size, the first frame's colour, the rotation EXIF asks for), or a one-line
:class:`ConvlensError`; any other exception fails. Examples are bounded and
derandomised, so CI runs the same cases each time in a few seconds.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageCms

import convlens as cl
from convlens.data.shapes import load_mask
from convlens.errors import ConvlensError
from convlens.render.overlay import comparison_figure

FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "I;16", "F")
#: The formats each mode can be saved in (Pillow refuses the rest).
FORMATS = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), "JPEG": ("L", "RGB", "CMYK"),
           "GIF": ("L", "P"), "WEBP": ("RGB", "RGBA"), "TIFF": ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I", "F"),
           "BMP": ("1", "L", "P", "RGB")}


def _one_line(err: ConvlensError) -> None:
    assert str(err) and "\n" not in str(err)


def _encoded(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes:
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    image = Image.fromarray(array, "RGBA").convert("RGB").convert(mode) if mode not in ("I;16",) else \
        Image.fromarray(array[..., 0].astype(np.uint16) * 257)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _load(tmp_path, data: bytes, name: str = "x.img"):
    path = tmp_path / name
    path.write_bytes(data)
    try:
        return cl.load_image(path)
    except ConvlensError as err:
        _one_line(err)
        return None


sizes = st.tuples(st.integers(1, 40), st.integers(1, 40)) | st.sampled_from([(1, 300), (300, 1), (1, 1)])
encodings = st.sampled_from([(fmt, mode) for fmt, modes in FORMATS.items() for mode in modes])


@FUZZ
@given(encoding=encodings, size=sizes, seed=st.integers(0, 3))
def test_every_mode_and_format_loads_as_rgb_of_its_size(tmp_path, encoding, size, seed):
    fmt, mode = encoding
    picture = _load(tmp_path, _encoded(mode, size, fmt, seed))
    assert picture is not None and picture.mode == "RGB" and picture.size == size


@FUZZ
@given(encoding=encodings, size=sizes, cut=st.floats(0.0, 0.99), flips=st.lists(st.integers(0, 10**6), max_size=6))
def test_broken_bodies_give_an_image_or_one_line(tmp_path, encoding, size, cut, flips):
    fmt, mode = encoding
    data = bytearray(_encoded(mode, size, fmt, 0))
    for position in flips:  # bytes flipped anywhere, the header included
        data[position % len(data)] ^= 0xFF
    data = bytes(data[: max(1, int(len(data) * (1 - cut)))])
    picture = _load(tmp_path, data)
    assert picture is None or (picture.mode == "RGB" and min(picture.size) >= 1)


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(100_000, 100_000), (2**31 - 1, 1), (10_000, 10_000), (1, 2**31 - 1)])
def test_a_huge_declared_size_is_one_line_before_decoding(tmp_path, width, height):
    with pytest.raises(ConvlensError) as caught:
        cl.load_image(_write(tmp_path, _png_header(width, height)))
    _one_line(caught.value)
    with pytest.raises(ConvlensError) as caught:
        load_mask(_write(tmp_path, _png_header(width, height)))
    _one_line(caught.value)


def _write(tmp_path, data: bytes, name: str = "x.png"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])  # animated GIF, WebP, APNG; multi-page TIFF
def test_an_animation_or_a_multi_page_file_gives_its_first_frame(tmp_path, fmt):
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    frames = [Image.new("RGB", (12, 9), colour) for colour in colours]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=50, lossless=True)
    picture = cl.load_image(_write(tmp_path, buffer.getvalue(), f"a.{fmt.lower()}"))
    assert picture.size == (12, 9)
    assert np.abs(np.asarray(picture).astype(int) - colours[0]).max() <= 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_picture_as_it_asks(tmp_path, orientation):
    array = np.zeros((6, 10, 3), dtype=np.uint8)
    array[0, 0] = (255, 0, 0)  # a red top-left pixel shows where the corner went
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    picture = cl.load_image(_write(tmp_path, buffer.getvalue()))
    assert picture.size == ((6, 10) if orientation >= 5 else (10, 6))
    reference = Image.fromarray(array)  # EXIF 2..8 as Pillow's transposes, written out independently
    transposes = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                  5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                  8: Image.Transpose.ROTATE_90}
    if orientation in transposes:
        reference = reference.transpose(transposes[orientation])
    assert np.array_equal(np.asarray(picture), np.asarray(reference))


def test_an_icc_profile_loads_as_rgb(tmp_path):
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buffer = io.BytesIO()
    Image.new("RGB", (7, 5), (30, 60, 90)).save(buffer, format="PNG", icc_profile=profile)
    picture = cl.load_image(_write(tmp_path, buffer.getvalue()))
    assert picture.size == (7, 5) and picture.getpixel((3, 2)) == (30, 60, 90)


@settings(max_examples=10, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(encoding=encodings, size=sizes, cut=st.sampled_from([0.0, 0.0, 0.5]))
def test_predict_and_explain_take_whatever_loads(tmp_path, tiny, encoding, size, cut):
    fmt, mode = encoding
    data = _encoded(mode, size, fmt, 1)
    path = _write(tmp_path, data[: max(1, int(len(data) * (1 - cut)))], "p.img")
    model = cl.load_model(tiny, input_size=(16, 16))
    try:
        predictions = model.predict([path], top_k=3)
        explanation = cl.explain(model, [path], method="gradcam")
    except ConvlensError as err:
        _one_line(err)
        return
    assert abs(sum(p.probability for p in predictions[0]) - 1) < 1e-4  # 3 classes: top 3 is all of them
    maps = explanation.maps
    assert maps.shape[-2:] == (16, 16) and torch.isfinite(maps).all()


@FUZZ
@given(encoding=encodings, size=sizes, cut=st.floats(0.0, 0.99))
def test_the_mask_reader_gives_a_mask_of_the_size_or_one_line(tmp_path, encoding, size, cut):
    fmt, mode = encoding
    data = _encoded(mode, size, fmt, 2)
    path = _write(tmp_path, data[: max(1, int(len(data) * (1 - cut)))], "m.png")
    try:
        mask = load_mask(path)
    except ConvlensError as err:
        _one_line(err)
        return
    assert mask.dtype == bool and mask.ndim == 2 and min(mask.shape) >= 1
    if cut == 0:
        assert mask.shape == (size[1], size[0])


@pytest.mark.parametrize("size", [(1, 3000), (3000, 1)])
def test_the_comparison_figure_of_a_strip_stays_a_few_inches(size):
    """Before: a 1x3000 strip made a figure 9000 inches tall, and `convlens explain` took 134 s to draw it."""
    strip = Image.new("RGB", size, (90, 40, 40))
    figure = comparison_figure(strip, [("gradcam", strip)])
    width, height = figure.get_size_inches()
    assert width == 6.0 and 1.0 <= height <= 13.0


@pytest.mark.parametrize("size", [(1, 3000), (3000, 1), (2, 5000)])
def test_the_imagenet_preprocessing_of_a_strip_stays_small(size):
    """Before: Resize(256) made a 1x3000 strip 256x768000 (0.6 GB as float) before the 224 crop."""
    from convlens.models.transforms import imagenet_transform

    transform = imagenet_transform()
    resized = transform.transforms[1](transform.transforms[0](Image.new("RGB", size)))
    assert max(resized.shape[-2:]) == 8 * 256 and min(resized.shape[-2:]) >= 1
    assert transform(Image.new("RGB", size)).shape == (3, 224, 224)


def test_a_torchvision_preset_gets_the_middle_of_a_strip_not_the_whole_strip():
    """Before: resnet18's preset resized a 1x3000 strip to 256x768000 (0.6 GB) to keep 224 pixels of it."""
    model = cl.load_model("resnet18", weights="none")
    preset, seen = model.transform, []

    def recording(image):
        seen.append(image.size)
        return preset(image)

    recording.resize_size, recording.crop_size = preset.resize_size, preset.crop_size  # still a preset
    model.transform = recording
    strip = Image.fromarray(np.random.default_rng(0).integers(0, 256, (3000, 1, 3), dtype=np.uint8))
    assert model.preprocess([strip]).shape == (1, 3, 224, 224)
    assert seen == [(1, 8)]  # the middle 8 pixels: the 224 crop is 0.875 of them
    model.transform = preset
    moderate = Image.fromarray(np.random.default_rng(1).integers(0, 256, (400, 10, 3), dtype=np.uint8))
    assert torch.equal(model.preprocess([moderate])[0], preset(moderate))  # same result as the preset alone
