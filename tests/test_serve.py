"""The explorer's API (convlens serve), through FastAPI's ASGI test client: every endpoint, bad requests included.

Each picture the API returns is compared with the one the Python API makes on its own
(cl.explain + overlay, activation_grid, dataset_examples, filter_patterns); every bad
request is a 4xx with a one-line message and the server goes on answering.
"""

from __future__ import annotations

import io
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import convlens as cl
from convlens.errors import ConvlensError
from convlens.heatmaps import METHODS

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import TinyNet  # noqa: E402
from convlens.serve.app import create_app  # noqa: E402
from convlens.serve.views import Explorer  # noqa: E402


def _tiny_model():
    torch.manual_seed(0)
    model = cl.load_model(TinyNet(), input_size=16)
    model.labels = ["disc", "bar", "blob"]
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A TinyNet, 8 shapes images with masks in class folders, a symlink out of them, and its dissection."""
    from convlens.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("serve")
    data = write_shapes(root / "data", 1, seed=3, size=32, split=None)
    outside = root / "secret.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(outside)
    model = _tiny_model()
    cl.dissect(model, root / "data", ["conv2"], out=root / "dissection", figures=False, k=4)
    os.symlink(outside, data / "circle" / "link.png")  # after the dissection, which reads every image
    return {"root": root, "data": data, "model": model, "atlas": root / "dissection"}


@pytest.fixture(scope="module")
def explorer(world):
    found = Explorer(world["model"], world["data"], world["atlas"], cache=world["root"] / "cache", source="tiny.pt")
    yield found
    found.close()


@pytest.fixture(scope="module")
def client(explorer):
    app = create_app(explorer)
    with TestClient(app) as test_client:
        yield test_client
    app.state.jobs.close()


def _png(response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def _info(response) -> dict:
    return json.loads(response.headers["x-convlens-info"])


def test_model_info_lists_every_method_with_whether_it_applies_and_why(client, world):
    info = client.get("/api/model").json()
    assert [m["name"] for m in info["methods"]] == list(METHODS)
    assert all(m["applies"] and m["reason"] is None for m in info["methods"])  # TinyNet is CAM-ready, has ReLUs
    assert info["layers"] == ["conv1", "bn", "relu1", "conv2", "relu2"] and info["auto_layer"] == "relu2"
    assert info["classes"] == ["disc", "bar", "blob"] and info["input_size"] == [16, 16]
    assert info["atlas"]["layers"] == ["conv2"] and info["atlas"]["dissected"]


def test_a_method_that_does_not_apply_is_listed_with_the_error_explain_gives():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    model = cl.load_model(net, input_size=8)
    found = {m["name"]: m for m in Explorer(model).methods()}
    gray = Image.new("RGB", (8, 8), (128, 128, 128))
    for name in ("cam", "guided_backprop"):  # no GAP + linear head; no ReLU
        with pytest.raises(ConvlensError) as err:
            cl.explain(model, [gray], method=name)
        assert found[name] == {**found[name], "applies": False, "reason": str(err.value)}
    assert found["gradcam"]["applies"] and found["saliency"]["applies"]


def test_the_image_list_is_the_data_folder_without_masks_or_links_out(client, world):
    listed = client.get("/api/images").json()["images"]
    ids = [image["id"] for image in listed]
    assert len(ids) == 8 and all(image["mask"] for image in listed)
    assert "circle/link.png" not in ids and not any(i.endswith(".mask.png") for i in ids)
    original = _png(client.get("/api/image.png", params={"image": ids[0]}))
    assert (original == np.asarray(Image.open(world["data"] / ids[0]).convert("RGB"))).all()


def test_predictions_are_the_models_top_classes(client, world):
    image = "square/00000.png"
    expected = world["model"].predict([world["data"] / image], top_k=3)[0]
    got = client.get("/api/predict", params={"image": image, "top": 3}).json()["predictions"]
    assert [p["index"] for p in got] == [p.index for p in expected]
    assert [p["probability"] for p in got] == pytest.approx([p.probability for p in expected])


@pytest.mark.parametrize("method,layer,target,opacity", [("gradcam", "conv1", "2", 0.3), ("saliency", "auto", "", 0.4),
                                                         ("layercam", "auto", "bar", 0.7)])
def test_the_heatmap_is_the_python_apis_overlay_for_that_request(client, world, method, layer, target, opacity):
    from convlens.heatmaps import style_for
    from convlens.render.overlay import overlay_heatmap

    image = "circle/00000.png"
    response = client.get("/api/heatmap.png", params={"image": image, "method": method, "layer": layer,
                                                      "target": target, "opacity": opacity})
    picture = cl.load_image(world["data"] / image)
    wanted = {"": None, "2": 2}.get(target, target)
    result = cl.explain(world["model"], [picture], method=method, layer=layer, target=wanted)
    expected = overlay_heatmap(picture, result.maps[0], transform=world["model"].transform, alpha=opacity,
                               style=style_for(method))
    assert (_png(response) == np.asarray(expected)).all()
    info = _info(response)
    assert info["target"] == result.targets[0] and info["target_name"] == result.target_names[0]
    assert info["layer"] == result.layer and info["method"] == method
    assert info["command"].startswith(f"convlens explain tiny.pt {world['data'] / image} --methods {method}")


@pytest.mark.parametrize("path,params,status,says", [
    ("/api/heatmap.png", {"image": "circle/00000.png", "layer": "layer9"}, 400, "unknown layer 'layer9'"),
    ("/api/heatmap.png", {"image": "circle/00000.png", "method": "gradcum"}, 400, "unknown method 'gradcum'"),
    ("/api/heatmap.png", {"image": "circle/00000.png", "target": "7"}, 400, "out of range"),
    ("/api/heatmap.png", {"image": "circle/00000.png", "target": "zebra"}, 400, "zebra"),
    ("/api/heatmap.png", {"image": "circle/00000.png", "opacity": "1.5"}, 400, "between 0 and 1"),
    ("/api/heatmap.png", {"image": "../secret.png"}, 400, "'..' is not allowed"),
    ("/api/heatmap.png", {"image": "/etc/passwd"}, 400, "relative to the data folder"),
    ("/api/image.png", {"image": "circle/link.png"}, 400, "outside the data folder"),
    ("/api/image.png", {"image": "circle/nothing.png"}, 404, "image not found"),
    ("/api/image.png", {"image": "upload:0123456789abcdef"}, 404, "no upload"),
    ("/api/predict", {"image": "circle/00000.png", "top": "0"}, 400, "top"),
    ("/api/activations.png", {"image": "circle/00000.png", "layer": "fc"}, 400, "unknown layer 'fc'"),
    ("/api/unit", {"layer": "conv2", "unit": "99"}, 400, "unit 99 is out of range"),
    ("/api/unit", {"layer": "conv2", "unit": "x"}, 400, "unit"),
    ("/api/unit/map.png", {"image": "circle/00000.png", "layer": "conv2", "unit": "-1"}, 400, "out of range"),
    ("/api/unit/example.png", {"layer": "conv2", "unit": "0", "rank": "9"}, 404, "rank 9"),
    ("/api/unit/example.png", {"layer": "conv1", "unit": "0"}, 400, "not in the atlas"),
    ("/api/jobs/nothing-1", {}, 404, "no job"),
    ("/api/nowhere", {}, 404, "no such page"),
])
def test_a_bad_request_is_a_4xx_with_one_line_and_the_server_goes_on(client, path, params, status, says):
    response = client.get(path, params=params)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert says in message and "\n" not in message and "Traceback" not in message
    assert client.get("/api/model").status_code == 200


ODD = ["", "all", "-1", "1e9", "nan", "../x", "/", ".", "a" * 3000, "\x00", "circle"]
ROUTES = {"/api/heatmap.png": ["image", "method", "layer", "target", "opacity"], "/api/predict": ["image", "top"],
          "/api/activations.png": ["image", "layer"], "/api/unit": ["layer", "unit"],
          "/api/unit/map.png": ["image", "layer", "unit"], "/api/unit/example.png": ["layer", "unit", "rank", "kind"]}
GOOD = {"image": "circle/00000.png", "method": "gradcam", "layer": "conv2", "target": "", "opacity": "0.4", "top": "3",
        "unit": "1", "rank": "0", "kind": "whole"}


@pytest.mark.parametrize("path", list(ROUTES))
def test_no_odd_value_of_any_parameter_is_a_500(client, path):
    """NUL bytes, names too long for the file system, target=all, NaN...: all 4xx (each was a 500 once)."""
    for name in ROUTES[path]:
        for value in ODD:
            response = client.get(path, params={**{n: GOOD[n] for n in ROUTES[path]}, name: value})
            assert response.status_code < 500, (name, value[:20], response.text)


def test_uploads_are_size_limited_decoded_safely_and_then_usable(client, explorer, monkeypatch):
    buffer = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 200, 10)).save(buffer, format="PNG")
    good = buffer.getvalue()
    monkeypatch.setattr(explorer, "max_upload", len(good) - 1)
    too_big = client.post("/api/upload", content=good, params={"name": "big.png"})
    assert too_big.status_code == 413 and "over the limit" in too_big.json()["error"]
    monkeypatch.setattr(explorer, "max_upload", 1 << 20)
    junk = client.post("/api/upload", content=b"#!/bin/sh\nrm -rf /\n", params={"name": "model.pt"})
    assert junk.status_code == 400 and "cannot read image model.pt" in junk.json()["error"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # a 600-pixel image is now a decompression bomb
    bomb = client.post("/api/upload", content=good, params={"name": "bomb.png"})
    assert bomb.status_code == 400 and "too large" in bomb.json()["error"]
    monkeypatch.undo()
    sent = client.post("/api/upload", content=good, params={"name": "green.png"}).json()
    assert sent["id"].startswith("upload:") and (sent["width"], sent["height"]) == (30, 20)
    assert sent["id"] in [image["id"] for image in client.get("/api/images").json()["images"]]
    assert _png(client.get("/api/heatmap.png", params={"image": sent["id"]})).shape == (20, 30, 3)
    assert "UPLOADED.png" in _info(client.get("/api/heatmap.png", params={"image": sent["id"]}))["command"]


def test_the_activation_grid_layout_finds_every_channel(client, world):
    from convlens.render.grid import activation_grid

    image = "star/00000.png"
    response = client.get("/api/activations.png", params={"image": image, "layer": "conv2"})
    grid, layout = _png(response), _info(response)
    maps = cl.activations(world["model"], world["data"] / image, ["conv2"])["conv2"][0]
    assert layout["channels"] == 8 and grid.shape[:2] == (layout["height"], layout["width"])
    width, height, margin = layout["tile_width"], layout["tile_height"], layout["margin"]
    for channel in range(8):
        alone = np.asarray(activation_grid(maps[channel:channel + 1], None, min_tile=24, margin=margin))
        left = margin + (channel % layout["columns"]) * (width + margin)
        top = margin + (channel // layout["columns"]) * (height + margin)
        assert (grid[top:top + height, left:left + width] == alone[margin:margin + height, margin:margin + width]).all()


def test_the_unit_page_data_is_the_atlas_rows(client, world):
    from convlens.atlas.store import AtlasStore

    image = "star/00000.png"
    maps = cl.activations(world["model"], world["data"] / image, ["conv2"])["conv2"][0]
    for unit in range(8):
        info = _info(client.get("/api/unit/map.png", params={"image": image, "layer": "conv2", "unit": unit}))
        assert info["max"] == pytest.approx(float(maps[unit].max()))
        found = client.get("/api/unit", params={"layer": "conv2", "unit": unit}).json()["atlas"]
        with AtlasStore.open(world["atlas"] / "atlas.sqlite") as store:
            (_, _, _, label, iou), = [row for row in store.dissection("conv2") if row[1] == unit]
            selectivity, = store.db.execute("SELECT selectivity FROM units WHERE layer='conv2' AND unit=?",
                                            (unit,)).fetchone()
            tops = store.db.execute("SELECT i.key, t.value FROM tops t JOIN images i ON t.image = i.image WHERE "
                                    "t.layer='conv2' AND t.unit=? ORDER BY t.rank", (unit,)).fetchall()
        assert (found["label"], found["iou"]) == (label, pytest.approx(iou))
        assert found["selectivity"] == pytest.approx(selectivity)
        assert [(t["key"], t["value"]) for t in found["top"]] == [(k, pytest.approx(v)) for k, v in tops]
    assert client.get("/api/unit", params={"layer": "conv1", "unit": 0}).json()["atlas"] is None  # not scanned


def test_a_units_example_images_are_the_atlas_examples(client, world):
    from convlens.atlas.examples import dataset_examples

    examples = dataset_examples(world["atlas"] / "atlas.sqlite", "conv2", [3], model=world["model"], pattern_steps=0)[0]
    for kind, pictures in (("whole", examples.whole), ("crop", examples.crops)):
        shown = _png(client.get("/api/unit/example.png", params={"layer": "conv2", "unit": 3, "rank": 1, "kind": kind}))
        assert (shown == np.asarray(pictures[1])).all()


def _events(client, job_id: str) -> list[dict]:
    with client.stream("GET", f"/api/jobs/{job_id}/events") as stream:
        return [json.loads(line[6:]) for line in stream.iter_lines() if line.startswith("data: ")]


def test_a_filter_pattern_is_a_job_with_progress_and_a_cache_keyed_by_the_weights(client, world, explorer):
    from convlens.render.grid import to_pil

    started = client.post("/api/jobs/pattern", params={"layer": "conv2", "unit": 5, "steps": 12}).json()
    events = _events(client, started["id"])
    assert events[-1]["state"] == "done" and events[-1]["done"] == events[-1]["total"] == 12
    done = [e["done"] for e in events]
    assert done == sorted(done)
    shown = _png(client.get(f"/api/jobs/{started['id']}/result"))
    expected = cl.filter_patterns(world["model"], "conv2", filters=[5], size=16, steps=12, seed=0)
    assert (shown == np.asarray(to_pil(expected.images[0]))).all()
    again = client.post("/api/jobs/pattern", params={"layer": "conv2", "unit": 5, "steps": 12}).json()
    assert again["state"] == "done" and again["cached"]
    other = Explorer(_tiny_model(), cache=explorer.cache)  # a new server on the same weights: from the disk
    app = create_app(other)
    with TestClient(app) as fresh:
        assert fresh.post("/api/jobs/pattern", params={"layer": "conv2", "unit": 5, "steps": 12}).json()["cached"]
    app.state.jobs.close()


def test_a_slow_method_runs_as_a_job_and_draws_what_the_heatmap_view_draws(client):
    import base64

    params = {"image": "ring/00000.png", "method": "scorecam", "target": "1", "opacity": 0.5}
    started = client.post("/api/jobs/heatmap", params=params).json()
    events = _events(client, started["id"])
    assert events[-1]["state"] == "done" and events[-1]["total"] > 0  # Score-CAM reports its masked batches
    found = client.get(f"/api/jobs/{started['id']}/result").json()
    direct = client.get("/api/heatmap.png", params=params)
    assert found["png"] == "data:image/png;base64," + base64.b64encode(direct.content).decode()
    assert found["info"] == _info(direct) and found["info"]["target"] == 1
    bad = client.post("/api/jobs/heatmap", params={**params, "layer": "nowhere"})
    assert bad.status_code == 400 and "unknown layer 'nowhere'" in bad.json()["error"]


def test_the_event_stream_always_ends_with_the_final_state(client, tmp_path):
    """A job that finishes between two looks still gets its last event (the page waited at "running 8/8")."""
    from convlens.serve.jobs import Job

    class Racing(Job):
        looks = 0

        def snapshot(self):
            Racing.looks += 1
            if Racing.looks == 1:  # it finishes just after its "running" snapshot is taken
                self.state = "done"
                return {**super().snapshot(), "state": "running"}
            return super().snapshot()

    job = Racing("race-1", "pattern", tmp_path / "none.png", state="running")
    client.app.state.jobs.jobs[job.id] = job
    assert [event["state"] for event in _events(client, job.id)] == ["running", "done"]


def test_a_cancelled_job_stops_and_caches_nothing(client, explorer):
    started = client.post("/api/jobs/pattern", params={"layer": "conv1", "unit": 0, "steps": 2048}).json()
    for _ in range(200):  # until the optimisation is under way
        if client.get(f"/api/jobs/{started['id']}").json()["done"] > 0:
            break
        time.sleep(0.01)
    assert client.delete(f"/api/jobs/{started['id']}").status_code == 200
    final = _events(client, started["id"])[-1]
    assert final["state"] == "cancelled" and final["done"] < 2048
    assert not client.app.state.jobs.get(started["id"]).path.exists()
    assert client.get(f"/api/jobs/{started['id']}/result").status_code == 404
    restarted = client.post("/api/jobs/pattern", params={"layer": "conv1", "unit": 0, "steps": 2048}).json()
    assert not restarted["cached"]  # nothing of the cancelled run was kept
    client.delete(f"/api/jobs/{restarted['id']}")
    _events(client, restarted["id"])


def test_the_trust_view_is_the_reports_table_and_verdict(client, world):
    from convlens.evaluation import best_methods
    from convlens.evaluation.runner import evaluate_images
    from convlens.metrics import METRICS
    from convlens.report.evaluation_section import DEFAULT_METHODS, DEFAULT_METRICS, verdict

    image = "triangle/00000.png"
    started = client.post("/api/jobs/trust", params={"image": image}).json()
    assert _events(client, started["id"])[-1]["state"] == "done"
    found = client.get(f"/api/jobs/{started['id']}/result").json()
    assert found["masked"] and [h["name"] for h in found["headers"]] == list(DEFAULT_METRICS)
    from convlens.data.shapes import read_mask

    picture = cl.load_image(world["data"] / image)
    _, summary = evaluate_images(world["model"], [(image, picture, read_mask(world["data"] / image))],
                                 methods=list(DEFAULT_METHODS), metrics=list(DEFAULT_METRICS))
    metrics = {name: METRICS[name] for name in DEFAULT_METRICS}
    best = best_methods(summary, metrics)
    assert [row["method"] for row in found["rows"]] == list(DEFAULT_METHODS)
    for row in found["rows"]:
        values = [cell["value"] for cell in row["cells"]]
        assert values == pytest.approx([summary[row["method"]][name].mean for name in DEFAULT_METRICS], nan_ok=True)
        assert [cell["best"] for cell in row["cells"]] == [row["method"] in best[name] for name in DEFAULT_METRICS]
    sanity = {row["method"]: row["sanity"]["value"] for row in found["rows"]}
    from convlens.metrics.stats import mean_ci

    assert found["verdict"] == verdict(summary, metrics, {m: mean_ci([v]) for m, v in sanity.items()})


def test_an_atlas_of_another_model_is_refused_on_one_line(world):
    torch.manual_seed(1)
    with pytest.raises(ConvlensError, match="not the one that wrote the atlas"):
        Explorer(cl.load_model(TinyNet(), input_size=16), world["data"], world["atlas"])
