"""TCAV (Kim et al. 2018): known answers on a hand-made model, captum's TCAV on the same CAVs, scipy's t-test,
the image sources (folders, dissection masks, random pools) and their one-line errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens.concepts import fit_cav
from convlens.concepts.tcav import p_value
from convlens.errors import ConvlensError

D = 3 * 4 * 4
UP = torch.zeros(D)
UP[0] = 1.0


class Directions(nn.Module):
    """``body`` is the identity, so its activation is the input; logits: ``a.u``, ``-a.u`` and ``|a|^2 / 2``.

    The gradient of logit 0 at ``body`` is ``u`` for every input, of logit 1 ``-u``, of logit 2 the
    activation itself: a class that depends on no direction.
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Identity()

    def forward(self, x):
        a = self.body(x).flatten(1)
        return torch.stack([a @ UP, -(a @ UP), 0.5 * a.square().sum(1)], 1)


def _noise(generator, n):
    return torch.randn(n, 3, 4, 4, generator=generator)


@pytest.fixture(scope="module")
def directions():
    generator = torch.Generator().manual_seed(0)
    concept = _noise(generator, 20) + 4 * UP.view(1, 3, 4, 4)  # differs from the random images along u only
    randoms = [_noise(generator, 20) for _ in range(10)]
    inputs = _noise(generator, 40)
    # half the inputs on each side of u: a direction-free class then has no reason to lean either way
    inputs[:, 0, 0, 0] = inputs[:, 0, 0, 0].abs() * torch.tensor([1.0, -1.0]).repeat(20)
    model = cl.load_model(Directions(), input_size=4)
    return model, cl.tcav(model, [0, 1, 2], {"up": concept}, ["body"], randoms, inputs=inputs), randoms


def test_a_concept_along_the_class_direction_scores_one_and_is_significant(directions):
    _, result, _ = directions
    row = result.row("0", "up", "body")
    assert row.scores == [1.0] * 10 and row.score == 1.0 and row.std == 0.0
    assert 0.2 < row.random_score < 0.8  # random CAVs point anywhere
    assert row.significant and row.p_value < 0.05
    assert row.accuracy > 0.85


def test_the_opposite_direction_scores_zero_and_is_significant(directions):
    _, result, _ = directions
    row = result.row("1", "up", "body")
    assert row.scores == [0.0] * 10 and row.significant
    # the same CAVs: the random scores of the opposite class are one minus the first's
    assert row.random_scores == [1.0 - s for s in result.row("0", "up", "body").random_scores]


def test_a_class_that_depends_on_no_direction_is_not_significant(directions):
    _, result, _ = directions
    row = result.row("2", "up", "body")
    assert 0.35 < row.score < 0.65 and not row.significant and row.p_value > 0.05


def test_the_p_value_is_scipys_two_sided_t_test_on_the_same_scores(directions):
    from scipy.stats import ttest_ind

    _, result, _ = directions
    for row in result.rows:
        with warnings.catch_warnings():  # constant score lists: scipy warns of precision loss
            warnings.simplefilter("ignore", RuntimeWarning)
            expected = float(ttest_ind(row.scores, row.random_scores).pvalue)
        assert row.p_value == pytest.approx(expected, rel=1e-12)
    assert p_value([1.0] * 10, [1.0] * 10) == 1.0  # undefined t: no evidence


def test_bonferroni_divides_alpha_by_the_number_of_tests(directions):
    model, _, randoms = directions
    generator = torch.Generator().manual_seed(3)
    concept = _noise(generator, 12) + 4 * UP.view(1, 3, 4, 4)
    result = cl.tcav(model, [0, 2], {"up": concept}, ["body"], randoms, inputs=_noise(generator, 6), bonferroni=True,
                     alpha=0.04)
    assert result.threshold == pytest.approx(0.02)
    assert all(row.significant == (row.p_value < 0.02) for row in result.rows)


def test_fit_cav_finds_the_direction_that_separates_the_concept():
    generator = torch.Generator().manual_seed(5)
    other = torch.randn(30, D, generator=generator)
    concept = torch.randn(30, D, generator=generator) + 5 * UP
    cav = fit_cav(concept, other, seed=1)
    assert cav.vector.norm().item() == pytest.approx(1.0, abs=1e-6)
    assert float(cav.vector @ UP) > 0.9 and cav.accuracy == 1.0
    assert float(fit_cav(other, concept, seed=1).vector @ UP) < -0.85  # towards the first argument
    assert torch.equal(fit_cav(concept, other, seed=1).vector, cav.vector)  # seeded: the same split, the same CAV


class _GivenCAVs:
    """A captum ``Classifier`` that trains nothing and returns convlens's CAVs for the pair of concepts it gets."""

    def __init__(self, by_pair):
        self.by_pair = by_pair  # frozenset of concept ids -> (id of the concept the vector points to, other id, vector)
        self.current = None

    def train_and_eval(self, dataloader, **kwargs):
        labels = torch.cat([label for _, label in dataloader])
        self.current = self.by_pair[frozenset(labels.tolist())]
        return {"accs": torch.tensor(1.0)}

    def weights(self):
        _, _, vector = self.current
        return torch.stack([vector, -vector])

    def classes(self):
        first, second, _ = self.current
        return [first, second]


def test_scores_equal_captums_tcav_given_the_same_cavs(tmp_path):
    from captum.concept import TCAV, Concept
    from captum.concept._utils.classifier import Classifier
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    generator = torch.Generator().manual_seed(2)
    concept = torch.randn(12, 3, 8, 8, generator=generator) + 0.8
    randoms = [torch.randn(12, 3, 8, 8, generator=generator) for _ in range(10)]
    inputs = torch.randn(9, 3, 8, 8, generator=generator)
    ours = cl.tcav(cl.load_model(net, input_size=8), 1, {"bright": concept}, ["2"], randoms, inputs=inputs)

    def as_concept(ident, name, images):
        return Concept(ident, name, DataLoader(list(images), batch_size=4))

    bright = as_concept(0, "bright", concept)
    random_concepts = [as_concept(i + 1, f"random{i}", images) for i, images in enumerate(randoms)]
    pairs, sets = {}, []
    for run in range(10):
        following = random_concepts[(run + 1) % 10]
        pairs[frozenset({0, run + 1})] = (0, run + 1, ours.cavs[("bright", "2")][run].vector)
        pairs[frozenset({run + 1, following.id})] = (run + 1, following.id, ours.random_cavs["2"][run].vector)
        sets += [[bright, random_concepts[run]], [random_concepts[run], following]]
    classifier = type("Given", (_GivenCAVs, Classifier), {})(pairs)
    theirs = TCAV(net, ["2"], classifier=classifier, save_path=str(tmp_path)).interpret(inputs, sets, target=1)
    row = ours.row("1", "bright", "2")
    for run in range(10):
        concept_key = f"0-{run + 1}"
        random_key = f"{run + 1}-{(run + 1) % 10 + 1}"
        assert row.scores[run] == pytest.approx(float(theirs[concept_key]["2"]["sign_count"][0]), abs=1e-6)
        assert row.magnitudes[run] == pytest.approx(float(theirs[concept_key]["2"]["magnitude"][0]), abs=1e-6)
        assert row.random_scores[run] == pytest.approx(float(theirs[random_key]["2"]["sign_count"][0]), abs=1e-6)
    assert len(set(row.scores)) > 1  # the scores vary across runs: the comparison compares something


def _images(folder, count, colour=(200, 30, 30), seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.clip(rng.normal(0, 40, (12, 12, 3)) + colour, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return folder


def test_concepts_and_random_sets_come_from_folders_and_pools(tiny, tmp_path):
    _images(tmp_path / "concepts" / "red", 10)
    _images(tmp_path / "concepts" / "blue", 11, (30, 30, 200), seed=1)
    _images(tmp_path / "pool", 24, (120, 120, 120), seed=2)
    _images(tmp_path / "inputs", 3, seed=3)
    model = cl.load_model(tiny, input_size=12)
    result = cl.tcav(model, 0, tmp_path / "concepts", ["conv2"], tmp_path / "pool", inputs=tmp_path / "inputs",
                     random_size=12)
    assert [row.concept for row in result.rows] == ["blue", "red"]
    assert all(len(row.scores) == 10 for row in result.rows)


def test_dissection_masks_give_the_images_that_show_each_concept(tmp_path):
    from convlens.concepts.sources import concept_sets

    _images(tmp_path / "data", 12)
    for i in range(12):
        for concept, present in (("stripes", i < 11), ("dots", i % 2 == 0)):
            mask = np.zeros((12, 12), np.uint8)
            mask[2:5, 2:5] = 255 if present else 0
            (tmp_path / "data" / "masks" / concept).mkdir(parents=True, exist_ok=True)
            Image.fromarray(mask).save(tmp_path / "data" / "masks" / concept / f"{i:03d}.png")
    with pytest.raises(ConvlensError, match=r"concept 'dots' has 6 image\(s\).*at least 10"):
        concept_sets(tmp_path / "data")
    for i in range(1, 12, 2):  # now 11 images show dots too; an empty mask file shows nothing
        Image.fromarray(np.full((12, 12), 255, np.uint8)).save(tmp_path / "data" / "masks" / "dots" / f"{i:03d}.png")
    sets = {s.name: [p.name for p in s.items] for s in concept_sets(tmp_path / "data")}
    assert sets["stripes"] == [f"{i:03d}.png" for i in range(11)]
    assert len(sets["dots"]) == 12


@pytest.mark.parametrize("case, message", [
    ("nine", r"concept 'red' has 9 image\(s\)"),
    ("missing random", r"random folder not found"),
    ("few random sets", r"3 random set\(s\) given for 10 runs"),
    ("runs", r"at least 10 runs"),
    ("small pool", r"random pool .* has 12 image\(s\)"),
    ("layer", r"unknown layer 'conv9'"),
])
def test_bad_input_is_one_line(tiny, tmp_path, case, message):
    _images(tmp_path / "concepts" / "red", 9 if case == "nine" else 10)
    _images(tmp_path / "inputs", 2)
    random = {"missing random": tmp_path / "nowhere", "small pool": _images(tmp_path / "pool", 12),
              "few random sets": [tmp_path / "concepts" / "red"] * 3}.get(case, [tmp_path / "concepts" / "red"] * 10)
    with pytest.raises(ConvlensError, match=message) as info:
        cl.tcav(cl.load_model(tiny, input_size=12), 0, tmp_path / "concepts", ["conv9" if case == "layer" else "conv2"], random,
                inputs=tmp_path / "inputs", n_runs=3 if case == "runs" else 10)
    assert "\n" not in str(info.value)


def test_a_layer_the_class_does_not_depend_on_is_one_line(tmp_path):
    class SideBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            self.unused(x)
            return self.used(x).mean((2, 3))

    generator = torch.Generator().manual_seed(0)
    images = [torch.randn(10, 3, 4, 4, generator=generator) for _ in range(11)]
    with pytest.raises(ConvlensError, match="does not depend on layer 'unused'"):
        cl.tcav(cl.load_model(SideBranch(), input_size=4), 0, {"c": images[0]}, ["unused"], images[1:],
                inputs=images[0][:2])


def test_the_model_is_given_back_as_it_was(tiny, tmp_path):
    _images(tmp_path / "concepts" / "red", 10)
    tiny.train()
    before = {name: p.requires_grad for name, p in tiny.named_parameters()}
    cl.tcav(cl.load_model(tiny, input_size=12), 0, tmp_path / "concepts", ["relu1"], [tmp_path / "concepts" / "red"] * 10,
            inputs=tmp_path / "concepts" / "red")
    assert tiny.training and {name: p.requires_grad for name, p in tiny.named_parameters()} == before
    assert not tiny._forward_hooks and not any(m._forward_hooks for m in tiny.modules())


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A tiny saved model, generated shapes as concepts (masks beside) and class inputs, a pool of noise images."""
    from conftest import TinyNet
    from convlens.data import write_shapes

    root = tmp_path_factory.mktemp("tcav_cli")
    torch.manual_seed(0)
    torch.save(TinyNet().eval(), root / "tiny.pt")
    (root / "labels.txt").write_text("circle\ncross\nsquare\n")
    write_shapes(root / "concepts", 10, seed=1, size=24, split=None, classes=["circle", "cross"])
    write_shapes(root / "inputs", 3, seed=2, size=24, split=None, classes=["circle", "cross"])
    _images(root / "pool", 24, (120, 120, 120), seed=4)
    args = ["tcav", root / "tiny.pt", "--trust-code", "--input-size", "24", "--labels", root / "labels.txt",
            "--concepts", root / "concepts", "--random", root / "pool", "--inputs", root / "inputs",
            "--classes", "circle,cross", "--layers", "relu1,conv2", "--random-size", "12"]
    return root, args


def test_the_cli_writes_the_apis_table_csv_and_figures(shapes_run, cli, tmp_path):
    import csv

    root, args = shapes_run
    code, out, err = cli(*args, "--out", tmp_path / "t")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["tcav.csv", "tcav.md", "tcav_conv2.png",
                                                                  "tcav_relu1.png"]
    model = cl.load_model(str(root / "tiny.pt"), trust_code=True, input_size=(24, 24), labels=root / "labels.txt")
    expected = cl.tcav(model, ["circle", "cross"], root / "concepts", ["relu1", "conv2"], root / "pool",
                       inputs=root / "inputs", random_size=12)
    with open(tmp_path / "t" / "tcav.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(expected.rows) == 8  # 2 classes x 2 concepts x 2 layers
    for row, want in zip(rows, expected.rows):
        assert (row["class"], row["concept"], row["layer"]) == (want.class_, want.concept, want.layer)
        assert float(row["tcav"]) == want.score and float(row["p_value"]) == want.p_value
        assert row["significant"] == str(want.significant)
    assert expected.markdown() in out  # the table is printed


@pytest.mark.parametrize("case, message", [
    ("nine", "has 9 image(s)"),
    ("missing random", "random folder not found"),
    ("runs", "'--runs': Input should be greater than or equal to 10"),
])
def test_bad_cli_input_is_one_line_exit_2_and_nothing_written(shapes_run, cli, tmp_path, case, message):
    import shutil

    root, args = shapes_run
    args = list(args)
    if case == "nine":
        shutil.copytree(root / "concepts", tmp_path / "concepts")
        for path in sorted((tmp_path / "concepts" / "cross").glob("0000[0-9].png"))[:1]:
            path.unlink()
        args[args.index("--concepts") + 1] = tmp_path / "concepts"
    elif case == "missing random":
        args[args.index("--random") + 1] = tmp_path / "nowhere"
    else:
        args += ["--runs", "0"]
    code, out, err = cli(*args, "--out", tmp_path / "t")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob(".t.*"))


def test_store_gets_a_tcav_table_and_another_models_store_is_refused(shapes_run, cli, tmp_path):
    import sqlite3

    root, args = shapes_run
    model = cl.load_model(str(root / "tiny.pt"), trust_code=True, input_size=(24, 24))
    cl.scan(model, shapes=4, size=24, layers=["conv2"], out=tmp_path / "atlas.sqlite")
    code, _, err = cli(*args, "--store", tmp_path / "atlas.sqlite", "--no-figures", "--out", tmp_path / "t")
    assert code == 0, err
    with open(tmp_path / "t" / "tcav.csv") as handle:
        expected = [line.split(",") for line in handle.read().splitlines()[1:]]
    with sqlite3.connect(tmp_path / "atlas.sqlite") as db:
        stored = db.execute("SELECT * FROM tcav").fetchall()
    assert len(stored) == len(expected) == 8
    for row, want in zip(stored, expected):
        assert row[:3] == tuple(want[:3]) and row[3] == float(want[3]) and row[7] == float(want[7])
        assert row[8] == (want[8] == "True") and row[10] == 10
    code, _, err = cli(*args, "--store", tmp_path / "atlas.sqlite", "--no-figures", "--out", tmp_path / "t")
    with sqlite3.connect(tmp_path / "atlas.sqlite") as db:  # a second run replaces its rows
        assert db.execute("SELECT COUNT(*) FROM tcav").fetchone()[0] == 8
    from convlens.atlas.store import AtlasStore

    with AtlasStore.open(tmp_path / "atlas.sqlite") as store:
        assert sorted(store.tcav()) == sorted(stored)

    torch.manual_seed(1)
    other = cl.load_model(nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), input_size=24)
    cl.scan(other, shapes=4, size=24, layers=["0"], out=tmp_path / "other.sqlite")
    code, _, err = cli(*args, "--store", tmp_path / "other.sqlite", "--out", tmp_path / "u")
    assert code == 2 and "written for another model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "u").exists()
