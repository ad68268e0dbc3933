import numpy as np
import pytest
import torch
from PIL import Image

import convlens as cl


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_every_pil_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    if mode == "I;16":
        image = Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100))
    else:
        image = rgb.convert(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}.png" if mode != "CMYK" else tmp_path / "img.jpg"
    image.save(path)
    loaded = cl.load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (30, 20)


def test_sixteen_bit_scales_to_full_range():
    array = np.array([[0, 65535]], dtype=np.uint16)
    assert np.asarray(cl.load_image(array))[0, :, 0].tolist() == [0, 255]


def test_rgba_is_composited_on_white():
    array = np.zeros((2, 2, 4), dtype=np.uint8)  # fully transparent black
    assert np.asarray(cl.load_image(array)).min() == 255


def test_arrays_and_tensors_in_either_layout():
    chw = torch.rand(3, 8, 10)
    assert cl.load_image(chw).size == (10, 8)
    assert cl.load_image(chw.permute(1, 2, 0).numpy()).size == (10, 8)
    assert cl.load_image(np.zeros((8, 10), dtype=np.float32)).size == (10, 8)


def test_sample_image_ships_with_scikit_image():
    assert cl.sample_image("chelsea").size == (451, 300)


@pytest.mark.parametrize("case,match", [("missing", "not found"), ("truncated", "cannot read"),
                                        ("garbage", "cannot read"), ("folder", "folder")])
def test_bad_images_raise_one_line_errors(tmp_path, case, match):
    path = tmp_path / "bad.png"
    if case == "truncated":
        Image.new("RGB", (64, 64), "red").save(path)
        path.write_bytes(path.read_bytes()[:40])
    elif case == "garbage":
        path.write_bytes(b"hello")
    elif case == "folder":
        path = tmp_path
    with pytest.raises(cl.ConvlensError, match=match) as err:
        cl.load_image(path)
    assert "\n" not in str(err.value)


def test_empty_image_list():
    with pytest.raises(cl.ConvlensError, match="no images"):
        cl.load_images([])
