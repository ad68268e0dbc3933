"""The shapes dataset: deterministic, masks exactly the drawn pixels, boxes around them, round trip on disk."""

import json

import numpy as np
import pytest
import torch

from convlens.data import (SHAPE_CLASSES, ShapesTorchDataset, generate_shape, mask_path, read_mask, shape_sample,
                           shapes_dataset, write_shapes)
from convlens.errors import ConvlensError


@pytest.fixture(scope="module")
def samples():
    return list(shapes_dataset(96, seed=3, size=64))


def test_at_least_eight_classes_and_every_class_appears(samples):
    assert len(SHAPE_CLASSES) >= 8 and len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)
    assert {s.class_name for s in samples} == set(SHAPE_CLASSES)
    assert all(SHAPE_CLASSES[s.label] == s.class_name for s in samples)
    assert [s.label for s in samples[:16]] == list(range(8)) * 2


def test_deterministic_given_seed_and_independent_of_n(samples):
    again = list(shapes_dataset(10, seed=3, size=64))
    for a, b in zip(samples, again):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.boxes == b.boxes
    other = next(iter(shapes_dataset(1, seed=4, size=64)))
    assert not np.array_equal(other.image, samples[0].image)
    assert np.array_equal(generate_shape(123, 48).image, generate_shape(np.random.default_rng(123), 48).image)


def test_types_and_shapes(samples):
    s = samples[0]
    assert s.image.dtype == np.uint8 and s.image.shape == (64, 64, 3)
    assert s.mask.dtype == bool and s.mask.shape == (64, 64)


@pytest.mark.parametrize("index", range(16))
def test_mask_is_exactly_the_drawn_pixels(index):
    # on a flat background every pixel that differs from it belongs to an object, and vice versa
    rng = np.random.default_rng([7, index])
    sample = generate_shape(rng, 64, class_index=index % len(SHAPE_CLASSES), clutter=False, two_objects=0.5)
    background = sample.image[~sample.mask][0]
    changed = (sample.image != background).any(axis=-1)
    assert np.array_equal(changed, sample.mask)


def test_objects_have_flat_colours_on_cluttered_backgrounds(samples):
    for s in samples:
        for obj in s.object_masks:
            colours = np.unique(s.image[obj], axis=0)
            assert len(colours) == (2 if s.class_name == "stripes" else 1), s.class_name


def test_boxes_are_tight_around_each_object_and_the_union_is_the_mask(samples):
    for s in samples:
        assert len(s.boxes) == len(s.object_masks) >= 1
        union = np.zeros_like(s.mask)
        for (x0, y0, x1, y1), obj in zip(s.boxes, s.object_masks):
            inside = np.zeros_like(obj)
            inside[y0:y1, x0:x1] = True
            assert obj.sum() > 20 and not (obj & ~inside).any()  # the box contains the object
            assert obj[y0].any() and obj[y1 - 1].any() and obj[:, x0].any() and obj[:, x1 - 1].any()  # tight
            assert not (union & obj).any()  # objects never overlap
            union |= obj
        assert np.array_equal(union, s.mask)


def test_two_object_samples_exist_and_share_the_class(samples):
    pairs = [s for s in samples if len(s.boxes) == 2]
    assert 5 <= len(pairs) <= 50
    ys, xs = np.nonzero(pairs[0].object_masks[0])
    assert pairs[0].object_masks[1].sum() > 0 and len(ys) > 0


def test_write_to_disk_and_read_mask_round_trip(tmp_path):
    root = write_shapes(tmp_path, 2, seed=5, size=32, split="train", classes=["circle", "star", "ring"])
    assert root == tmp_path / "train"
    images = sorted(p for p in root.rglob("*.png") if not p.name.endswith(".mask.png"))
    assert [p.relative_to(root).as_posix() for p in images] == [
        "circle/00000.png", "circle/00001.png", "ring/00000.png", "ring/00001.png", "star/00000.png", "star/00001.png"]
    annotations = json.loads((root / "annotations.json").read_text())
    from PIL import Image

    for index in range(6):  # sample i of the writer is sample i of the generator
        expected = shape_sample(index, 5, 32, ["circle", "star", "ring"])
        path = root / f"{expected.class_name}/{index // 3:05d}.png"
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected.image)
        assert np.array_equal(read_mask(path), expected.mask)
        assert annotations["images"][f"{expected.class_name}/{index // 3:05d}.png"]["boxes"] == \
            [list(b) for b in expected.boxes]
    assert mask_path(images[0]).name == "00000.mask.png"
    assert read_mask(tmp_path / "nowhere.png") is None
    assert not list(tmp_path.rglob("*.part"))


def test_worker_processes_change_nothing(tmp_path):
    one = list(shapes_dataset(140, seed=6, size=32))
    many = list(shapes_dataset(140, seed=6, size=32, workers=2))  # three chunks of 64 over two processes
    assert len(many) == 140
    for a, b in zip(one, many):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask) and a.boxes == b.boxes
    serial = write_shapes(tmp_path / "serial", 9, seed=6, size=32, split=None)
    parallel = write_shapes(tmp_path / "parallel", 9, seed=6, size=32, split=None, workers=2)
    files = sorted(p.relative_to(serial) for p in serial.rglob("*") if p.is_file())
    assert len(files) == 8 * 9 * 2 + 1
    assert files == sorted(p.relative_to(parallel) for p in parallel.rglob("*") if p.is_file())
    assert all((serial / f).read_bytes() == (parallel / f).read_bytes() for f in files)
    with pytest.raises(ConvlensError, match="--workers must be at least 1"):
        write_shapes(tmp_path / "none", 1, workers=0)


def test_torch_dataset_matches_the_generator():
    dataset = ShapesTorchDataset(9, seed=2, size=32)
    image, label = dataset[8]
    expected = shape_sample(8, 2, 32)
    assert label == expected.label == 0 and len(dataset) == 9
    assert torch.equal((image * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(expected.image))
    with pytest.raises(IndexError):
        dataset[9]


@pytest.mark.parametrize("call,match", [
    (lambda: generate_shape(0, size=10), "at least 24"),
    (lambda: list(shapes_dataset(2, classes=["circle", "sqare"])), "did you mean 'square'"),
    (lambda: list(shapes_dataset(2, classes=["circle"])), "at least two"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ConvlensError, match=match):
        call()


def test_bad_write_arguments_write_nothing(tmp_path):
    with pytest.raises(ConvlensError, match="at least 1"):
        write_shapes(tmp_path / "out", 0)
    assert not (tmp_path / "out").exists()


def test_speed_benchmark_runs():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "shapes_speed.py"
    spec = importlib.util.spec_from_file_location("shapes_speed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--n", "8", "--repeats", "1", "--sizes", "32"])
    assert set(results) == {32} and len(results[32]) == 5 and all(rate > 0 for rate in results[32])
