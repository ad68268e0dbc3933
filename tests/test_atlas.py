"""Whole-dataset scans: mergeable accumulators, the store, resume, dataset examples, Network Dissection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens.atlas import open_atlas, scan
from convlens.atlas.accumulators import LayerStats
from convlens.atlas.dissect import dissect
from convlens.atlas.examples import dataset_examples
from convlens.models.loading import from_module

LAYERS = ["features.relu3", "features.relu4"]


@pytest.fixture(scope="module")
def shapes_model():
    return cl.load_model("shapes")


def test_quantile_sketch_is_within_its_stated_error_of_numpy_on_a_million_values():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(0, 2, 500_000), -rng.lognormal(1, 1, 300_000),
                             rng.normal(0, 3, 200_000)]).astype(np.float32)
    stats = LayerStats(1, 1000, 1000, k=1)
    stats.update(torch.from_numpy(values).reshape(1, 1, 1000, 1000), torch.tensor([0]))
    exact_values = values.astype(np.float64)
    for q in [*np.linspace(0.001, 0.999, 97), 0.5, 0.99, 0.995]:
        exact = np.quantile(exact_values, q, method="lower")
        estimate = stats.quantile(q)[0]
        assert abs(estimate - exact) <= stats.grid.alpha * abs(exact), q
    assert stats.grid.alpha < 0.008
    assert stats.count == 10 ** 6 and stats.positive[0] == int((values > 0).sum())
    assert stats.mean[0] == pytest.approx(exact_values.mean(), rel=1e-6)
    assert stats.std[0] == pytest.approx(exact_values.std(), rel=1e-6)


def _assert_same(a: LayerStats, b: LayerStats) -> None:
    for name in ("top_image", "top_y", "top_x", "top_value", "positive", "sketch", "class_images"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.images, a.count) == (b.images, b.count)
    for name in ("mean", "std", "max", "class_sum", "selectivity"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-6, atol=1e-9, err_msg=name)


def test_merge_of_two_scans_equals_the_scan_of_the_union(shapes_model):
    options = dict(shapes=24, seed=4, layers=LAYERS, k=5, batch_size=8, part_size=8)
    whole = scan(shapes_model, **options)
    first = scan(shapes_model, indices=range(0, 16), **options)
    second = scan(shapes_model, indices=range(16, 24), **options)
    for merged in (first.merge(second), second.merge(first)):
        for layer in LAYERS:
            _assert_same(merged.stats[layer], whole.stats[layer])
    relu4 = whole.stats["features.relu4"]
    assert relu4.images == 24 and relu4.count == 24 * 8 * 8
    assert relu4.class_images.tolist() == [3] * 8  # shapes sample i has class i % 8
    # the statistics are the plain ones of the recorded maps
    maps = cl.activations(shapes_model, [cl.atlas.open_data(shapes=24, seed=4).image(i) for i in range(24)],
                          ["features.relu4"])["features.relu4"].double()
    np.testing.assert_allclose(relu4.mean, maps.mean(dim=(0, 2, 3)).numpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(relu4.max, maps.amax(dim=(0, 2, 3)).numpy(), rtol=1e-6)
    best = maps.flatten(2).amax(dim=2)  # (N, C)
    np.testing.assert_array_equal(relu4.top_image[:, 0], best.argmax(dim=0).numpy())


def test_an_interrupted_scan_resumes_from_its_last_committed_part(shapes_model, tmp_path):
    options = dict(shapes=24, seed=4, layers=LAYERS, k=5, batch_size=8, part_size=8)
    store = tmp_path / "atlas.sqlite"

    def stop_after_two_parts(done, total):
        if done > 16:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        scan(shapes_model, out=store, progress=stop_after_two_parts, **options)
    assert open_atlas(store).stats["features.relu4"].images == 16  # two committed parts of 8
    seen = []
    resumed = scan(shapes_model, out=store, progress=lambda done, total: seen.append((done, total)), **options)
    assert seen == [(8, 8)]  # only the last part ran again
    whole = scan(shapes_model, **options)
    reopened = open_atlas(store)
    for layer in LAYERS:
        _assert_same(resumed.stats[layer], whole.stats[layer])
        _assert_same(reopened.stats[layer], whole.stats[layer])
    assert reopened.keys[:2] == ["shapes/4/0", "shapes/4/1"]


class Planted(nn.Module):
    """A 1x1 convolution on the normalised input: unit 0 = red, unit 1 = -red (its complement), unit 2 = green."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1.0
            self.conv.weight[1, 0] = -1.0
            self.conv.weight[2, 1] = 1.0
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean(dim=(2, 3)))


def _write(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _planted_folder(root, brightness) -> list[tuple[int, int]]:
    """32x32 images: a red square ('blob') of the given brightness, and a green bar ('bar') in every third."""
    rng = np.random.default_rng(0)
    corners = []
    for i, red in enumerate(brightness):
        image = np.zeros((32, 32, 3), dtype=np.uint8)
        y, x = (int(v) for v in rng.integers(2, 24, 2))
        corners.append((y, x))
        image[y:y + 8, x:x + 8, 0] = red
        blob = np.zeros((32, 32), dtype=np.uint8)
        blob[y:y + 8, x:x + 8] = 255
        _write(root / "masks" / "blob" / f"{i:02d}.png", blob)
        if i % 3 == 0:
            bar = np.zeros((32, 32), dtype=np.uint8)
            bar[:, 0:2] = 255
            image[:, 0:2, 1] = 255
            _write(root / "masks" / "bar" / f"{i:02d}.png", bar)
        _write(root / f"{i:02d}.png", image)
    return corners


@pytest.fixture
def planted_data(tmp_path):
    """12 planted images whose squares all have the same red, and the planted model."""
    corners = _planted_folder(tmp_path / "data", [255] * 12)
    return from_module(Planted(), name="planted", input_size=32), tmp_path / "data", corners


def test_top_images_of_a_planted_unit_are_where_it_is_known_to_be_largest(tmp_path):
    brightness = np.random.default_rng(1).permutation(np.linspace(100, 250, 12).round()).astype(np.uint8)
    corners = _planted_folder(tmp_path, brightness)
    model = from_module(Planted(), name="planted", input_size=32)
    atlas = scan(model, tmp_path, ["conv"], k=4, batch_size=5)
    red = atlas.stats["conv"]
    brightest = np.argsort(-brightness.astype(int), kind="stable")[:4].tolist()
    assert red.top_image[0].tolist() == brightest
    # the maximum of a square of one value is first reached at its top-left corner
    assert [(red.top_y[0, r], red.top_x[0, r]) for r in range(4)] == [corners[i] for i in brightest]
    assert red.top_value[0, 0] == pytest.approx((brightness[brightest[0]] / 255 - 0.485) / 0.229, rel=1e-6)
    # the complement unit is largest on black pixels, which every image has: the smallest indices win the tie
    assert red.top_image[1].tolist() == [0, 1, 2, 3]
    examples = dataset_examples(atlas, "conv", [0], model=model, k=2, pattern_steps=0)[0]
    assert examples.keys == [f"{i:02d}.png" for i in brightest[:2]]
    # a 1x1 convolution sees one pixel: the receptive-field crop at the maximum is that pixel
    assert [crop.size for crop in examples.crops] == [(1, 1), (1, 1)]
    assert np.asarray(examples.crops[0])[0, 0].tolist() == [int(brightness[brightest[0]]), 0, 0]
    assert examples.whole[0].size == (32, 32) and examples.pattern is None


def test_dissection_labels_a_planted_unit_with_iou_one_and_its_complement_gets_the_lowest(planted_data, tmp_path):
    model, data, _ = planted_data
    result = dissect(model, data, ["conv"], out=tmp_path / "dissection", batch_size=5)
    concepts = result.concepts
    assert concepts == ["bar", "blob"]
    iou = result.iou["conv"]
    blob, bar = concepts.index("blob"), concepts.index("bar")
    # unit 0 is red: its top 0.5 % region is the red square, exactly the blob mask
    assert iou[0, blob] == 1.0
    assert iou[2, bar] == 1.0  # unit 2 is green: the bar
    assert iou[1, blob] == iou[:, blob].min() == 0.0  # the complement fires everywhere but the blob
    assert result.labels("conv") == ["blob", None, "bar"]
    assert result.unique_detectors == {"conv": 2}
    table = (tmp_path / "dissection" / "dissection.csv").read_text().splitlines()
    assert table[1].startswith("conv,0,") and table[1].endswith(",blob,1.000000")
    stored = cl.atlas.store.AtlasStore.open(tmp_path / "dissection" / "atlas.sqlite")
    assert [(row[0], row[1], row[3], row[4]) for row in stored.dissection()] == [
        ("conv", 0, "blob", 1.0), ("conv", 1, None, float(iou[1].max())), ("conv", 2, "bar", 1.0)]
    stored.close()
    assert sorted(p.name for p in (tmp_path / "dissection" / "figures").iterdir()) == ["conv-unit0.png",
                                                                                       "conv-unit2.png"]


def test_dissection_on_shapes_finds_more_unique_detectors_in_the_trained_model_than_in_random_weights(shapes_model):
    trained = dissect(shapes_model, shapes=96, seed=7, layers=["features.relu4"], k=4, batch_size=48)
    torch.manual_seed(0)
    random = cl.models.loading.from_module(type(shapes_model.module)(), input_size=64)
    control = dissect(random, shapes=96, seed=7, layers=["features.relu4"], k=4, batch_size=48)
    assert trained.unique_detectors["features.relu4"] > control.unique_detectors["features.relu4"]


def test_class_folders_with_masks_beside_and_a_csv_list_are_datasets(shapes_model, tmp_path):
    from convlens.data import write_shapes

    root = write_shapes(tmp_path / "shapes", 3, seed=5, size=64, classes=["circle", "square"])
    source = cl.atlas.open_data(root)
    assert source.classes == ["circle", "square"] and source.concepts == ["circle", "square"]
    assert source.labels == [0, 0, 0, 1, 1, 1] and source.keys[0] == "circle/00000.png"
    result = dissect(shapes_model, root, ["features.relu4"], k=2, figures=False)
    assert result.concepts == ["circle", "square"] and result.atlas.stats["features.relu4"].images == 6
    listing = tmp_path / "list.csv"
    listing.write_text("path,class\n" + "".join(f"shapes/train/{key},{source.classes[label]}\n"
                                                  for key, label in zip(source.keys, source.labels)))
    listed = cl.atlas.open_data(listing)
    assert listed.labels == source.labels and listed.classes == source.classes
    a = scan(shapes_model, root, ["features.relu4"], k=2)
    b = scan(shapes_model, listing, ["features.relu4"], k=2)
    np.testing.assert_array_equal(a.stats["features.relu4"].top_image, b.stats["features.relu4"].top_image)
    np.testing.assert_allclose(a.stats["features.relu4"].class_means, b.stats["features.relu4"].class_means)


# -- bad input ------------------------------------------------------------------------------

def test_bad_inputs_are_one_line_errors_and_write_nothing(shapes_model, tmp_path, planted_data):
    out = tmp_path / "out.sqlite"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(cl.ConvlensError, match="the dataset is empty"):
        scan(shapes_model, empty, LAYERS, out=out)
    with pytest.raises(cl.ConvlensError, match="has no spatial output"):
        scan(shapes_model, shapes=4, layers=["gap"], out=out)
    assert not out.exists()
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.new("RGB", (64, 64), (i * 40, 0, 0)).save(flat / f"{i}.png")
    with pytest.raises(cl.ConvlensError, match="no concept masks"):
        dissect(shapes_model, flat, LAYERS, out=tmp_path / "d")
    model, data, _ = planted_data
    (data / "masks" / "blob" / "04.png").unlink()
    with pytest.raises(cl.ConvlensError, match=r"1 of 12 images have no concept mask \(first: 04.png\)"):
        dissect(model, data, ["conv"], out=tmp_path / "d")
    assert not (tmp_path / "d").exists()
    scan(shapes_model, shapes=8, seed=1, layers=LAYERS, out=out, k=2)
    before = out.read_bytes()
    torch.manual_seed(0)
    other = from_module(type(shapes_model.module)(), input_size=64)
    with pytest.raises(cl.ConvlensError, match="written for the model with weights fingerprint"):
        scan(other, shapes=8, seed=1, layers=LAYERS, out=out, k=2)
    with pytest.raises(cl.ConvlensError, match="written for layers 'features.relu3,features.relu4', not "
                                               "'features.relu4'"):
        scan(shapes_model, shapes=8, seed=1, layers=["features.relu4"], out=out, k=2)
    with pytest.raises(cl.ConvlensError, match="written for the data"):
        scan(shapes_model, shapes=8, seed=2, layers=LAYERS, out=out, k=2)
    with pytest.raises(cl.ConvlensError, match="not the one that wrote the atlas"):
        dataset_examples(out, "features.relu4", [0], model=other, pattern_steps=0)
    assert out.read_bytes() == before
    with pytest.raises(cl.ConvlensError, match="unit 128 is out of range"):
        dataset_examples(out, "features.relu4", [128], model=shapes_model, pattern_steps=0)
    with pytest.raises(cl.ConvlensError, match="cannot reach the Ray cluster at '127.0.0.1:9'"):
        scan(shapes_model, shapes=4, layers=LAYERS, out=tmp_path / "ray.sqlite", engine="ray",
             ray_address="127.0.0.1:9")
    assert not (tmp_path / "ray.sqlite").exists()


def test_cli_scan_examples_dissect_and_their_errors(tmp_path, cli):
    atlas = tmp_path / "atlas.sqlite"
    code, out, err = cli("scan", "shapes", "--shapes", 32, "--seed", 3, "--layers", "features.relu4",
                         "--top", 3, "--out", atlas)
    assert code == 0 and "features.relu4: 128 units, 32 images, map 8x8" in out, err
    code, out, err = cli("examples", atlas, "--layer", "features.relu4", "--units", "0,5", "--steps", 4,
                         "--out", tmp_path / "examples")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "examples").iterdir()) == ["features.relu4-unit0.png",
                                                                         "features.relu4-unit5.png"]
    code, out, err = cli("dissect", "shapes", "--shapes", 32, "--seed", 3, "--layers", "features.relu4",
                         "--no-figures", "--out", tmp_path / "dissection")
    assert code == 0 and "| features.relu4 | 128 |" in out, err
    for args, message in [
        (["scan", "shapes", "--shapes", 0, "--out", tmp_path / "x.sqlite"], "Invalid value for '--shapes'"),
        (["scan", "shapes", "--shapes", 4, "--layers", "head", "--out", tmp_path / "x.sqlite"],
         "has no spatial output"),
        (["scan", "shapes", "--shapes", 32, "--seed", 3, "--layers", "features.relu3", "--out", atlas],
         "written for layers"),
        (["examples", tmp_path / "none.sqlite", "--layer", "x", "--units", 0, "--out", tmp_path / "e"],
         "atlas not found"),
        (["scan", "shapes", "--shapes", 4, "--engine", "ray", "--ray-address", "127.0.0.1:9",
          "--out", tmp_path / "x.sqlite"], "cannot reach the Ray cluster"),
    ]:
        code, out, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.sqlite").exists() and not (tmp_path / "e").exists()


def test_report_atlas_section_shows_detectors_with_patterns_and_examples(shapes_model):
    from convlens.report.atlas_section import atlas_section
    from convlens.report.context import Context
    from convlens.report.sections import SECTIONS

    from convlens.progress import Steps

    assert SECTIONS[-1] is atlas_section
    seen = []
    steps = Steps(1, seen.append)
    ctx = Context(shapes_model, cl.summarize(shapes_model), [],
                  {"atlas_images": 48, "atlas_layers": ["features.relu4"], "atlas_units": 2, "atlas_examples": 2,
                   "atlas_steps": 2}, steps)
    steps.begin("atlas")
    section = atlas_section(ctx)
    assert [str(step) for step in seen] == ["[1/1] atlas", "[1/1] atlas: dissection (1/2)",
                                            "[1/1] atlas: examples of features.relu4 (2/2)"]
    html = str(section.html)
    assert "features.relu4" in html and html.count("data:image/png;base64,") == 2 * 3  # pattern + 2 examples
    assert "unique" in section.note and "48 generated shapes images" in section.note
    plain = Context(from_module(nn.Sequential(nn.Conv2d(3, 2, 3)), input_size=16), cl.summarize(shapes_model), [],
                    {})
    assert atlas_section(plain) is None  # no data and not a shapes model: left out
