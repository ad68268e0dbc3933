"""The Ray engine on a local 2-CPU Ray cluster gives the local engine's results: scan, dissect, evaluate."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import convlens as cl
from convlens.atlas.dissect import dissect

ray = pytest.importorskip("ray")

LAYERS = ["features.relu3", "features.relu4"]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local 2-CPU cluster; its workers see the kill hook's file (the path is set before they start)."""
    from convlens.atlas.ray_engine import TEST_KILL_WORKER

    hook = tmp_path_factory.mktemp("hook") / "kill-part"
    os.environ[TEST_KILL_WORKER] = str(hook)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield hook
    ray.shutdown()
    del os.environ[TEST_KILL_WORKER]


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
    from convlens.data import write_shapes
    from convlens.evaluation import evaluate
    from convlens.evaluation.ray import evaluate_ray

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
              "--concurrency", "1", "--targets", "star", "--out", str(tmp_path / "out")])
    assert exited.value.code in (0, None), capsys.readouterr().err
    rows = (tmp_path / "out" / "results.csv").read_text().splitlines()
    assert rows[0] == "image,method,target,pointing" and len(rows) == 3
    star = cl.load_model("shapes").labels.index("star")  # --targets reaches the actors: neither image shows one
    assert [row.split(",")[2] for row in rows[1:]] == [str(star)] * 2
    with pytest.raises(SystemExit) as exited:
        main(["evaluate", "shapes", str(data), "--engine", "spark", "--out", str(tmp_path / "other")])
    assert exited.value.code == 2 and "unknown engine 'spark'" in capsys.readouterr().err


def _scan_options():
    return dict(shapes=16, seed=2, layers=["features.relu3"], k=3, batch_size=4, part_size=4)


def _same_stats(a, b) -> None:
    for name in ("top_image", "top_y", "top_x", "top_value", "positive", "sketch", "class_images", "max"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert (a.images, a.count) == (b.images, b.count)
    for name in ("mean", "std", "class_sum"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-9, err_msg=name)


def test_a_ray_worker_killed_mid_scan_stops_it_on_one_line_or_is_retried_and_the_store_resumes_to_the_local_scan(
        ray_cluster, shapes_model, tmp_path, monkeypatch):
    import sqlite3

    import convlens.engines.ray as ray_engine

    monkeypatch.setattr(ray_engine, "RETRIES", 1)  # each retry starts an actor (seconds): one is enough to show it
    store = tmp_path / "atlas.sqlite"
    # a part whose worker dies on every try: the scan stops on one line, the store keeps whole parts
    ray_cluster.write_text("3 always")
    try:
        with pytest.raises(cl.ConvlensError, match=r"the Ray job stopped: .*retries of a part.*run the same command"
                                                   r" again to resume") as raised:
            cl.scan(shapes_model, engine="ray", concurrency=1, out=store, **_scan_options())
    finally:
        ray_cluster.unlink()
    assert "\n" not in str(raised.value)
    db = sqlite3.connect(f"{store.as_uri()}?mode=ro", uri=True)
    assert db.execute("PRAGMA quick_check").fetchone() == ("ok",)
    committed = sorted(row[0] for row in db.execute("SELECT part FROM parts"))
    assert 3 not in committed and db.execute("SELECT images FROM layers").fetchone() == (4 * len(committed),)
    db.close()
    # the rerun resumes; a worker killed once on the way (part 3 again) is retried
    ray_cluster.write_text("3")
    seen = []
    resumed = cl.scan(shapes_model, engine="ray", concurrency=1, out=store, progress=lambda d, t: seen.append(t),
                      **_scan_options())
    assert not ray_cluster.exists()  # the worker did die
    assert set(seen) == {16 - 4 * len(committed)}
    local = cl.scan(shapes_model, **_scan_options()).stats["features.relu3"]
    _same_stats(resumed.stats["features.relu3"], local)
    _same_stats(cl.atlas.open_atlas(store).stats["features.relu3"], local)


RAY_ADDRESS_PROBE = r"""
import sys, time
from convlens.cli import main
import convlens.atlas.ray_engine  # torch and the engine imported: the clock measures the command's own work
for address in sys.argv[2:]:
    start = time.monotonic()
    try:
        main(["scan", "shapes", "--shapes", "4", "--layers", "features.relu3", "--engine", "ray",
              "--ray-address", address, "--out", sys.argv[1]])
    except SystemExit as exited:
        print(address, exited.code, round(time.monotonic() - start, 2), file=sys.stdout, flush=True)
"""


def test_a_ray_address_where_nothing_or_something_else_listens_is_one_line_within_5_s_and_ray_stays_quiet(tmp_path):
    class Web(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    web = ThreadingHTTPServer(("127.0.0.1", 0), Web)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    silent = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog) and never says a word
    closed = socket.create_server(("127.0.0.1", 0))
    nobody = closed.getsockname()[1]
    closed.close()
    addresses = [f"127.0.0.1:{nobody}", f"127.0.0.1:{web.server_address[1]}", f"127.0.0.1:{silent.getsockname()[1]}"]
    try:
        done = subprocess.run([sys.executable, "-c", RAY_ADDRESS_PROBE, str(tmp_path / "x.sqlite"), *addresses],
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    finally:
        web.shutdown()
        silent.close()
    results = [line.split() for line in done.stdout.splitlines()]
    assert [(address, code) for address, code, _ in results] == [(address, "2") for address in addresses], done
    assert all(float(seconds) < 5 for _, _, seconds in results), results
    errors = done.stderr.strip().splitlines()  # one line per address and nothing from Ray
    assert len(errors) == 3 and all(line.startswith("convlens: error: cannot reach the Ray cluster at ")
                                    for line in errors), done.stderr
    assert "nothing answers there" in errors[0] and "a web server answers there, not Ray" in errors[1]
    assert "says nothing within 3 s" in errors[2]
    assert not (tmp_path / "x.sqlite").exists()


def test_the_probe_knows_a_real_ray_head(ray_cluster):
    from convlens.engines.ray import probe_address

    assert probe_address(ray.get_runtime_context().gcs_address) is None
