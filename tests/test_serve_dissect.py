"""The explorer's dissection job: Network Dissection of the data it serves, in the background, then the unit pages' atlas."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from convlens.serve.app import create_app  # noqa: E402
from convlens.serve.atlas_view import AtlasView  # noqa: E402
from convlens.serve.views import Explorer  # noqa: E402

from test_serve import _events, _tiny_model, world  # noqa: E402,F401  (world: the module fixture)


def _client(world, cache):
    explorer = Explorer(_tiny_model(), world["data"], None, cache=cache)
    return explorer, TestClient(create_app(explorer))


def test_a_dissection_job_labels_the_units_as_dissect_does_and_is_kept(world, tmp_path):
    explorer, client = _client(world, tmp_path / "cache")
    with client:
        assert client.get("/api/unit", params={"layer": "conv2", "unit": 1}).json()["atlas"] is None
        started = client.post("/api/jobs/dissect", params={"layers": "conv2"}).json()
        events = _events(client, started["id"])
        assert events[-1]["state"] == "done", events[-1]
        assert events[-1]["total"] > 0 and [e["done"] for e in events] == sorted(e["done"] for e in events)
        reference = AtlasView(world["atlas"], explorer.model)  # cl.dissect of the same data and layer
        for unit in range(4):
            found = client.get("/api/unit", params={"layer": "conv2", "unit": unit}).json()["atlas"]
            expected = reference.unit("conv2", unit)
            assert (found["label"], found["iou"], found["selectivity"]) == \
                (expected["label"], expected["iou"], expected["selectivity"])
        client.app.state.jobs.close()
    explorer.close()
    again, client = _client(world, tmp_path / "cache")  # a new server on the same weights and cache
    with client:
        repeat = client.post("/api/jobs/dissect", params={"layers": "conv2"}).json()
        assert repeat["cached"] and repeat["state"] == "done"
        assert client.get("/api/unit", params={"layer": "conv2", "unit": 0}).json()["atlas"]["dissected"]
        client.app.state.jobs.close()
    again.close()


@pytest.mark.parametrize("params, words", [({"layers": "nope"}, "unknown layer 'nope'"),
                                           ({"shapes": 3}, "shapes must be between 8 and 5000")])
def test_a_bad_dissection_request_is_one_line(world, tmp_path, params, words):
    explorer, client = _client(world, tmp_path / "cache")
    with client:
        answer = client.post("/api/jobs/dissect", params=params)
        assert 400 <= answer.status_code < 500 and words in answer.text and "\\n" not in answer.json()["error"]
        client.app.state.jobs.close()
    explorer.close()
