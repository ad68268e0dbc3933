"""``evaluate`` and ``convlens evaluate``: values in the table, resuming, masks on disk, one-line errors.

Until the heatmap engine is merged, methods come from stand-in explainers
registered here; ``convlens.METHODS`` names are used the same way once present.
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.capture import borrow
from convlens.errors import ConvlensError
from convlens.evaluation import evaluate, find_mask
from convlens.metrics import deletion, mean_ci, pointing_game
from convlens.models.loading import from_module
from convlens.models.transforms import mask_for_model

from conftest import TinyNet

METRICS = ["deletion", "drop", "pointing_strict", "road"]
FAST = ["deletion", "drop", "pointing_strict"]


def magnitude(model, x, targets):
    """A model-independent stand-in explainer: the input's magnitude."""
    return x.abs().sum(1)


def saliency(model, x, targets):
    """A gradient stand-in explainer: |d probability / d input|, channels summed."""
    x = x.clone().requires_grad_()
    with borrow(model.module) as module, torch.enable_grad():
        score = module(x).softmax(1).gather(1, targets.view(-1, 1)).sum()
        grad, = torch.autograd.grad(score, x)
    return grad.abs().sum(1)


STAND_INS = {"magnitude": magnitude, "saliency": saliency}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return from_module(TinyNet(), input_size=16)


@pytest.fixture
def data(tmp_path):
    """Four 20x20 images with a red square; three masks in the three supported places, one image without."""
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "loose").mkdir()
    (root / "loose" / "masks").mkdir()
    for i, (folder, mask_path) in enumerate([
        ("images", root / "masks" / "a0.png"),
        ("images", root / "images" / "a1.mask.png"),
        ("loose", root / "loose" / "masks" / "a2.png"),
        ("loose", None),
    ]):
        array = np.zeros((20, 20, 3), np.uint8)
        array[3 + 2 * i: 11 + 2 * i, 5:13] = (220, 40, 40)
        Image.fromarray(array).save(root / folder / f"a{i}.png")
        if mask_path is not None:
            Image.fromarray(((array[..., 0] > 0) * 255).astype(np.uint8)).save(mask_path)
    return root


def _table(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_find_mask_looks_in_the_three_places(data):
    assert find_mask(data / "images" / "a0.png").sum() == 64
    assert find_mask(data / "images" / "a1.png").sum() == 64
    assert find_mask(data / "loose" / "a2.png").sum() == 64
    assert find_mask(data / "loose" / "a3.png") is None


def test_table_values_are_the_metrics_themselves(model, data, tmp_path):
    result = evaluate(model, data, methods=STAND_INS, metrics=METRICS, out_dir=tmp_path / "out", batch_size=16)
    rows = _table(tmp_path / "out" / "results.csv")
    assert len(rows) == 8 and {r["method"] for r in rows} == {"magnitude", "saliency"}
    assert [r["image"] for r in rows if r["method"] == "saliency"] == [
        "images/a0.png", "images/a1.png", "loose/a2.png", "loose/a3.png"]
    # recompute one row by hand through the public metric functions
    picture = Image.open(data / "images" / "a1.png").convert("RGB")
    x = model.preprocess([picture])
    targets = model.probabilities(model(x)).argmax(1)
    maps = saliency(model, x, targets)
    row = next(r for r in rows if r["image"] == "images/a1.png" and r["method"] == "saliency")
    assert int(row["target"]) == int(targets[0])
    assert float(row["deletion"]) == pytest.approx(float(deletion(model, x, maps, targets).auc[0]), abs=1e-6)
    mask = mask_for_model(model, find_mask(data / "images" / "a1.png"), picture.size)
    assert float(row["pointing_strict"]) == float(pointing_game(maps, mask, tolerance=0)[0])
    # the image without a mask has no localisation value, and the summary skips it
    assert next(r for r in rows if r["image"] == "loose/a3.png")["pointing_strict"] == ""
    values = [float(r["drop"]) for r in rows if r["method"] == "magnitude"]
    ci = result.summary["magnitude"]["drop"]
    assert ci.mean == pytest.approx(np.mean(values)) and ci.n == 4
    assert result.summary["magnitude"]["pointing_strict"].n == 3
    from scipy.stats import t
    half = t.ppf(0.975, 3) * np.std(values, ddof=1) / 2
    assert ci.half_width == pytest.approx(half)
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| saliency |" in summary and "deletion ↓" in summary
    assert "<table>" in (tmp_path / "out" / "summary.html").read_text()
    assert (tmp_path / "out" / "deletion.png").stat().st_size > 1000


def test_an_interrupted_run_continues_and_gives_the_same_table(model, data, tmp_path):
    evaluate(model, data, methods=STAND_INS, metrics=FAST, out_dir=tmp_path / "clean")
    calls = []

    def interrupt_after_three(done, total):
        if done == 3:
            raise KeyboardInterrupt

    counting = {name: (lambda fn: lambda *a: calls.append(1) or fn(*a))(fn) for name, fn in STAND_INS.items()}
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, data, methods=counting, metrics=FAST, out_dir=tmp_path / "resumed",
                 progress=interrupt_after_three)
    partial = _table(tmp_path / "resumed" / "results.csv")  # complete for the first image, never half-written
    assert [(r["image"], r["method"]) for r in partial] == [("images/a0.png", "magnitude"),
                                                             ("images/a0.png", "saliency")]
    with open(tmp_path / "resumed" / "journal.jsonl", "a") as journal:
        journal.write('{"image": "loose/a2.png", "meth')  # killed in the middle of a line
    calls.clear()
    with pytest.warns(UserWarning, match=r"dropped 1 damaged journal line\(s\), to be recomputed; kept 3"):
        evaluate(model, data, methods=counting, metrics=FAST, out_dir=tmp_path / "resumed")
    assert len(calls) == 5  # 8 pairs, 3 already journalled
    assert (tmp_path / "resumed" / "results.csv").read_text() == (tmp_path / "clean" / "results.csv").read_text()
    lines = (tmp_path / "resumed" / "journal.jsonl").read_text().splitlines()
    assert len(lines) == 8 and all(json.loads(line) for line in lines)


def test_resuming_with_other_metrics_is_refused(model, data, tmp_path):
    evaluate(model, data, methods=STAND_INS, metrics=["drop"], out_dir=tmp_path / "out", limit=1)
    with pytest.raises(ConvlensError, match="other settings"):
        evaluate(model, data, methods=STAND_INS, metrics=["insertion"], out_dir=tmp_path / "out")


@pytest.mark.parametrize("options,match", [
    ({"metrics": ["delition"]}, "did you mean 'deletion'"),
    ({"methods": ["gradcamm"]}, "unknown method 'gradcamm'"),
    ({"limit": 0}, "--limit"),
    ({"data": "missing"}, "data not found"),
])
def test_bad_input_writes_nothing(model, data, tmp_path, options, match):
    arguments = {"methods": STAND_INS, "metrics": ["drop"], "data": data, **options}
    arguments["data"] = tmp_path / arguments["data"] if arguments["data"] == "missing" else arguments["data"]
    with pytest.raises(ConvlensError, match=match):
        evaluate(model, arguments.pop("data"), out_dir=tmp_path / "out", **arguments)
    assert not (tmp_path / "out").exists()


def test_localisation_without_any_mask_is_an_error(model, tmp_path):
    (tmp_path / "plain").mkdir()
    Image.new("RGB", (20, 20), (10, 200, 10)).save(tmp_path / "plain" / "green.png")
    with pytest.raises(ConvlensError, match="no masks found"):
        evaluate(model, tmp_path / "plain", methods=STAND_INS, metrics=["pointing"], out_dir=tmp_path / "out")


# -- the command line --------------------------------------------------------------------------------

@pytest.fixture
def run(monkeypatch, cli):
    """``convlens ARGS`` in this process through ``main()``, the stand-in explainers registered for the test."""
    from convlens.evaluation import EXPLAINERS

    for name, fn in STAND_INS.items():
        monkeypatch.setitem(EXPLAINERS, name, fn)

    return cli


@pytest.fixture
def model_file(tmp_path):
    """A tiny convlens checkpoint (what the script expects; a pickled module would need --trust-code)."""
    from convlens.models.nets import ShapesNet

    path = tmp_path / "tiny.pt"
    torch.manual_seed(0)
    net = ShapesNet(num_classes=3, widths=(4, 8))
    torch.save({"convlens": "test", "arch": "shapesnet", "arch_kwargs": {"num_classes": 3, "widths": [4, 8]},
                "state_dict": net.state_dict(), "input_size": [16, 16]}, path)
    return path


def test_cli_writes_the_table_and_summary(run, model_file, data, tmp_path):
    out = tmp_path / "eval"
    code, stdout, stderr = run("evaluate", str(model_file), str(data), "--methods", "magnitude,saliency",
                               "--metrics", "drop,pointing", "--out", str(out), "--limit", "3",
                               "--batch-size", "32")
    assert code == 0, stderr
    rows = _table(out / "results.csv")
    assert len(rows) == 6 and all(0 <= float(r["drop"]) <= 100 for r in rows)
    assert "| magnitude |" in stdout and "summary.html" in stdout
    # running again finds everything done and changes nothing
    before = (out / "results.csv").read_text()
    code, _, stderr = run("evaluate", str(model_file), str(data), "--methods", "magnitude,saliency",
                          "--metrics", "drop,pointing", "--out", str(out), "--limit", "3")
    assert code == 0, stderr
    assert (out / "results.csv").read_text() == before


@pytest.mark.parametrize("args,match", [
    (["--metrics", "pointin"], "did you mean 'pointing'"),
    (["--methods", "nosuchmethod"], "unknown method"),
    (["--methods", ","], "--methods needs at least one"),
])
def test_cli_bad_input_is_one_line_and_exit_2(run, model_file, data, tmp_path, args, match):
    code, _, stderr = run("evaluate", str(model_file), str(data), "--out", str(tmp_path / "o"),
                          "--methods", "magnitude", *args)
    assert code == 2 and match in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_metric_values_are_finite_or_missing(model, data, tmp_path):
    evaluate(model, data, methods={"saliency": saliency}, metrics=["energy_pointing", "iou", "increase"],
             out_dir=tmp_path / "out")
    for row in _table(tmp_path / "out" / "results.csv"):
        for name in ("energy_pointing", "iou", "increase"):
            assert row[name] == "" or math.isfinite(float(row[name]))
    assert mean_ci([1.0, float("nan"), 3.0]).n == 2


def test_shapes_figures_script_runs_on_a_tiny_model(monkeypatch, model_file, data, tmp_path, capsys):
    import importlib.util

    from convlens.evaluation import EXPLAINERS

    for name, fn in STAND_INS.items():
        monkeypatch.setitem(EXPLAINERS, name, fn)
    path = Path(__file__).parent.parent / "benchmarks" / "shapes_figures.py"
    spec = importlib.util.spec_from_file_location("shapes_figures", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["--model", str(model_file), "--data", str(data), "--out", str(tmp_path / "eval"),
                 "--methods", "magnitude,saliency,nosuch", "--metrics", "pointing,drop", "--limit", "2",
                 "--sanity-images", "1"])
    out = capsys.readouterr().out
    assert "skipping methods this build does not have: nosuch" in out
    # the model-independent stand-in survives randomisation, the gradient one does not
    assert "| magnitude | 1.000 | 1.000 | 1.000 | 1.000 | FAILS" in out
    assert "| saliency |" in out and (tmp_path / "eval" / "results.csv").exists()


def test_in_memory_evaluation_matches_the_folder_run(model, data, tmp_path):
    from convlens.evaluation import evaluate_images, summary_table
    from convlens.metrics import METRICS as REGISTRY

    metrics = ["drop", "pointing_strict", "energy_pointing"]
    on_disk = evaluate(model, data, methods=STAND_INS, metrics=metrics, out_dir=tmp_path / "out", limit=2)
    keys = sorted({r["image"] for r in on_disk.rows})  # the --limit sample: one image of each folder
    images = [(key, Image.open(data / key), find_mask(data / key)) for key in keys]
    reported = []
    rows, summary = evaluate_images(model, images, methods=STAND_INS, metrics=metrics,
                                    progress=lambda done, total: reported.append((done, total)))
    assert reported == [(k, 4) for k in range(1, 5)]  # after each (image, method) pair
    expected = {(r["image"], r["method"]): r["values"] for r in on_disk.rows}
    assert {(r["image"], r["method"]): r["values"] for r in rows} == expected
    headers, table = summary_table(summary, {m: REGISTRY[m] for m in metrics})
    assert headers == ["method", "drop ↓", "pointing_strict ↑", "energy_pointing ↑"]
    assert [row[0] for row in table] == ["magnitude", "saliency"]
    assert table[0][1] == summary["magnitude"]["drop"].format() + " (2)"


# -- --limit: a seeded sample across classes ---------------------------------------------------------

def _classes(paths, root):
    from collections import Counter

    return Counter(p.parent.relative_to(root).as_posix() for p in paths)


def test_limit_samples_evenly_across_class_folders_with_a_seed(tmp_path):
    from convlens.evaluation.runner import sample_images

    sizes = {"circle": 10, "cross": 6, "ring": 8, "star": 12}  # sorted order would give 10 circles and 6 crosses
    images = [tmp_path / name / f"{i:05d}.png" for name, count in sizes.items() for i in range(count)]
    chosen = sample_images(images, tmp_path, 16)
    assert _classes(chosen, tmp_path) == {name: 4 for name in sizes}
    assert chosen == sorted(chosen) and len(set(chosen)) == 16
    assert sample_images(list(reversed(images)), tmp_path, 16) == chosen  # the order given does not matter
    assert sample_images(images, tmp_path, 16, seed=1) != chosen
    assert _classes(sample_images(images, tmp_path, 16, seed=1), tmp_path) == {name: 4 for name in sizes}
    # counts differ by at most one; a class that runs out leaves its turns to the others
    assert sorted(_classes(sample_images(images, tmp_path, 18), tmp_path).values()) == [4, 4, 5, 5]
    few = [tmp_path / "rare" / "0.png", tmp_path / "rare" / "1.png"] + images
    assert _classes(sample_images(few, tmp_path, 14), tmp_path)["rare"] == 2
    assert sorted(_classes(sample_images(few, tmp_path, 14), tmp_path).values()) == [2, 3, 3, 3, 3]
    # a flat folder is one class; no limit, or one past the count, is everything in sorted order
    flat = [tmp_path / f"{i}.png" for i in range(5)]
    assert sample_images(flat, tmp_path, 3, seed=2) == sample_images(flat, tmp_path, 3, seed=2)
    assert sample_images(flat[::-1], tmp_path, None) == flat == sample_images(flat, tmp_path, 9)


def test_cli_limit_takes_a_class_folder_each_says_so_and_logs_a_line_per_pair(run, model_file, data, tmp_path):
    out = tmp_path / "eval"
    code, stdout, stderr = run("evaluate", str(model_file), str(data), "--methods", "magnitude,saliency",
                               "--metrics", "drop", "--out", str(out), "--limit", "2")
    assert code == 0, stderr
    rows = _table(out / "results.csv")
    assert sorted(r["image"].split("/")[0] for r in rows) == ["images", "images", "loose", "loose"]
    said = "a sample of 2 of 4 images, stratified by class folder (2 classes: 1 each), seed 0"
    assert said in stdout and said in (out / "summary.md").read_text() and said in (out / "summary.html").read_text()
    assert json.loads((out / "run.json").read_text())["options"] == {"limit": 2, "seed": 0}
    # stderr is no terminal here: one plain line per (image, method) pair, no bar fragments
    assert "\r" not in stderr
    assert stderr.splitlines() == [f"[{k}/4] evaluate" for k in range(1, 5)]
