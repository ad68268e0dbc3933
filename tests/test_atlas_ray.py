"""The Ray engine on a local 2-CPU Ray cluster gives the local engine's results: scan, dissect, evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest

import convlens as cl
from convlens.atlas.dissect import dissect

ray = pytest.importorskip("ray")

LAYERS = ["features.relu3", "features.relu4"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def shapes_model():
    return cl.load_model("shapes")


def test_ray_scan_and_dissect_equal_the_local_engine(ray_cluster, shapes_model, tmp_path):
    options = dict(shapes=40, seed=9, layers=LAYERS, k=4, batch_size=8, part_size=16)
    local = dissect(shapes_model, figures=False, **options)
    remote = dissect(shapes_model, engine="ray", concurrency=2, out=tmp_path / "ray", figures=False, **options)
    for layer in LAYERS:
        a, b = local.atlas.stats[layer], remote.atlas.stats[layer]
        for name in ("top_image", "top_y", "top_x", "top_value", "positive", "sketch", "class_images", "max"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
        assert (a.images, a.count) == (b.images, b.count) == (40, 40 * a.height * a.width)
        for name in ("mean", "std", "class_sum", "selectivity"):
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, err_msg=name)
        np.testing.assert_array_equal(local.iou[layer], remote.iou[layer])
        assert local.labels(layer) == remote.labels(layer)
    # the Ray run wrote the same store format, and it reads back to the same numbers
    stored = cl.atlas.open_atlas(tmp_path / "ray" / "atlas.sqlite")
    np.testing.assert_array_equal(stored.stats["features.relu4"].top_image,
                                  local.atlas.stats["features.relu4"].top_image)


def test_ray_evaluate_equals_the_local_engine(ray_cluster, shapes_model, tmp_path):
    from convlens.atlas.ray_engine import evaluate_ray
    from convlens.data import write_shapes
    from convlens.evaluation import evaluate

    data = write_shapes(tmp_path / "data", 1, seed=5, size=64, split=None, classes=["circle", "square", "star"])
    options = dict(methods=["gradcam"], metrics=["pointing", "iou", "deletion"])
    local = evaluate(shapes_model, data, out_dir=tmp_path / "local", **options)
    remote = evaluate_ray(shapes_model, data, out_dir=tmp_path / "ray", concurrency=2, **options)

    def rows(result):
        return sorted((r["image"], r["method"], r["values"]) for r in result.rows)

    assert len(rows(local)) == 3
    for (image_a, method_a, values_a), (image_b, method_b, values_b) in zip(rows(local), rows(remote)):
        assert (image_a, method_a) == (image_b, method_b)
        assert values_a == pytest.approx(values_b, abs=1e-6)
    assert (tmp_path / "ray" / "results.csv").read_text() == (tmp_path / "local" / "results.csv").read_text()
    journal = [json.loads(line) for line in (tmp_path / "ray" / "journal.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in journal) == ["circle/00000.png", "square/00000.png", "star/00000.png"]


def test_cli_evaluate_engine_ray_writes_evaluates_outputs(ray_cluster, tmp_path, capsys):
    from convlens.cli import main
    from convlens.data import write_shapes

    data = write_shapes(tmp_path / "data", 1, seed=6, size=64, split=None, classes=["circle", "ring"])
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", "shapes", str(data), "--methods", "gradcam", "--metrics", "pointing", "--engine", "ray",
              "--concurrency", "1", "--out", str(tmp_path / "out")])
    assert exited.value.code in (0, None), capsys.readouterr().err
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert rows[0] == "image,method,target,pointing" and len(rows) == 3
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", "shapes", str(data), "--engine", "spark", "--out", str(tmp_path / "other")])
    assert exited.value.code == 2 and "unknown engine 'spark'" in capsys.readouterr().err
