"""Running the explorer: cl.serve in a thread (notebook IFrame, stop), `convlens serve`, inline Explanations."""

from __future__ import annotations

import base64
import io
import re
import socket

import numpy as np
import pytest
import torch
from PIL import Image

import convlens as cl
from convlens.errors import ConvlensError

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from conftest import TinyNet  # noqa: E402


@pytest.fixture
def model():
    torch.manual_seed(0)
    return cl.load_model(TinyNet(), input_size=16)


@pytest.fixture
def data(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, colour in (("red.png", (200, 30, 30)), ("blue.png", (30, 30, 200))):
        Image.new("RGB", (24, 20), colour).save(folder / name)
    return folder


def test_cl_serve_runs_in_a_thread_shows_itself_as_an_iframe_and_stops(model, data, tmp_path):
    server = cl.serve(model, data=data, cache=tmp_path / "cache")
    try:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", server.url)
        page = httpx.get(server.url, timeout=30)
        assert page.status_code == 200 and "<title>convlens explorer</title>" in page.text
        assert [i["id"] for i in httpx.get(server.url + "api/images", timeout=30).json()["images"]] == ["blue.png",
                                                                                                     "red.png"]
        shown = server._repr_html_()
        assert shown.startswith("<iframe") and f'src="{server.url}"' in shown
    finally:
        server.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url, timeout=5)


def test_starting_a_server_leaves_the_callers_logging_alone(model, tmp_path):
    """uvicorn's default log config ran dictConfig, which closes every handler of the process: in a
    notebook it wiped the user's logging set-up, and absl's handler (loaded by Keras) closed sys.stderr
    itself, which took the test suite down ("lost sys.stderr")."""
    import logging

    class Closing(logging.StreamHandler):  # closes its stream, as absl's handler does
        def close(self):
            super().close()
            self.stream.close()

    stream = io.StringIO()
    handler = Closing(stream)
    mine = logging.getLogger("users.own")
    mine.addHandler(handler)
    try:
        server = cl.serve(model, cache=tmp_path / "cache")
        server.stop()
        mine.warning("still here")
        assert handler in mine.handlers and not stream.closed and stream.getvalue() == "still here\n"
    finally:
        mine.removeHandler(handler)


def test_a_taken_port_is_one_line(model):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConvlensError, match="cannot serve on 127.0.0.1:.*pass another --port"):
            cl.serve(model, port=taken.getsockname()[1])


def test_the_cli_prints_the_url_warns_off_loopback_and_serves_the_model(cli, data, tmp_path, monkeypatch):
    from convlens.serve.server import Server

    answers = {}

    def visit_and_stop(self):  # instead of waiting for Ctrl-C
        answers["model"] = httpx.get(self.url + "api/model", timeout=30).json()
        self.stop()

    monkeypatch.setattr(Server, "wait", visit_and_stop)
    import webbrowser

    opened = []
    monkeypatch.setattr(webbrowser, "open", opened.append)
    code, out, err = cli("serve", "shapes", "--data", data, "--port", "0", "--host", "0.0.0.0",
                         "--cache", tmp_path / "cache", "--root-path", "/lens/", "--open")
    assert code == 0, err
    assert re.search(r"convlens explorer on http://127\.0\.0\.1:\d+/lens/ \(Ctrl-C stops it\)", out)
    assert opened == [re.search(r"http://\S+", out).group()]  # --open: the page, prefix included
    assert err.count("convlens: warning: serving on 0.0.0.0") == 1
    assert answers["model"]["name"] == cl.load_model("shapes").name and answers["model"]["data"]
    code, out, err = cli("serve", "shapes", "--data", tmp_path / "missing", "--port", "0")
    assert code == 2 and err.startswith("convlens: error: --data") and err.count("\n") == 1


def test_the_default_explorer_is_the_bundled_model_on_generated_shapes(tmp_path, monkeypatch):
    from convlens.serve import server as running

    seen = {}
    monkeypatch.setattr(running, "default_dissection", lambda model, cache, fingerprint: seen.setdefault(
        "labels", model.labels) and None)
    monkeypatch.setattr(running, "Server", lambda explorer, **kw: explorer)
    explorer = running.serve(cache=tmp_path)
    listed = explorer.images()
    assert len(listed) == 8 * running.DEFAULT_PER_CLASS and all(image["mask"] for image in listed)
    assert explorer.source == "shapes" and seen["labels"] == explorer.model.labels
    assert running.serve(cache=tmp_path).images() == listed  # written once, then read again


def test_an_explanation_shows_itself_inline_in_a_notebook(model):
    pictures = [Image.new("RGB", (32, 16), (200, 30, 30)), Image.new("RGB", (16, 16), (30, 200, 30))]
    result = cl.explain(model, pictures, method="gradcam")
    strip = np.asarray(Image.open(io.BytesIO(result._repr_png_())).convert("RGB"))
    height = result.SHOWN_HEIGHT
    first, second = (overlay.resize((overlay.width * height // overlay.height, height)) for overlay in result.overlay())
    assert strip.shape == (height, first.width + 4 + second.width, 3)
    assert (strip[:, :first.width] == np.asarray(first)).all()
    assert (strip[:, first.width + 4:] == np.asarray(second)).all()
    shown = result._repr_html_()
    assert base64.b64encode(result._repr_png_()).decode() in shown
    assert f"gradcam at relu2: {result.target_names[0]}, {result.target_names[1]}" in shown
    from_tensor = cl.explain(model, torch.rand(1, 3, 16, 16), method="gradcam")
    assert from_tensor._repr_png_() is None and from_tensor._repr_html_() is None  # nothing to draw on


def test_the_page_uses_relative_urls_only_and_each_names_a_route(model):
    from convlens.serve.app import create_app, page
    from convlens.serve.views import Explorer

    html = page()
    assert not re.search(r"/\*(APP_JS|APP_CSS|TRUST_JS)\*/", html) and "showTrust" in html  # all inlined
    assert not re.search(r"""(src|href)=["']/|https?://|fetch\(["'`]/|url\(["'`]/""", html)
    used = set(re.findall(r"""["'`](api/[a-z/.]+)""", html))
    explorer = Explorer(model)
    routes = {route.path.lstrip("/").split("{")[0] for route in create_app(explorer).routes}
    assert used and all(any(path == r or (r.endswith("/") and path.startswith(r)) for r in routes) for path in used)
    explorer.close()


def test_the_core_and_the_serve_package_import_no_fastapi_until_a_server_starts():
    import subprocess
    import sys

    code = ("import sys\nimport convlens as cl\nimport convlens.heatmaps, convlens.serve\ncl.serve\n"
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stderr
