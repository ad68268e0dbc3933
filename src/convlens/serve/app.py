"""The explorer's HTTP routes (FastAPI): the page, JSON and PNG views, uploads, long jobs with progress over SSE.

Every URL the page uses is relative (``api/...``), and the page is one HTML file with its
CSS and JavaScript inlined, so it works at any path prefix (``--root-path``, a proxy).
A user's mistake (unknown layer or method, a class out of range, a path outside DATA, an
oversized or broken upload) is a 4xx answer ``{"error": "<one line>"}``, never a 500.

Routes (all ``GET`` unless said):

=================================  ===========================================================
``/``                              the page
``api/model``                      name, input size, classes, layers, methods (applies, reason)
``api/images``                     the images under DATA and the uploads
``POST api/upload?name=``          the raw bytes of an image (size-limited); answers its id
``api/image.png?image=``           the image itself (at most 512 px a side)
``api/predict?image=&top=``        the top classes with probabilities
``api/heatmap.png?image=&method=&layer=&target=&opacity=``  the overlay; what it shows in ``X-Convlens-Info``
``api/activations.png?image=&layer=``  every channel tiled; the layout in ``X-Convlens-Info``
``api/unit?layer=&unit=``          the atlas's label, IoU, selectivity, top images of a unit
``api/unit/map.png?image=&layer=&unit=``  the unit's map over the image
``api/unit/example.png?layer=&unit=&rank=&kind=``  a top dataset image (whole or crop)
``POST api/jobs/pattern?layer=&unit=``  start (or find cached) a filter pattern
``POST api/jobs/heatmap?...``      a slow method's heatmap (Score-CAM, Ablation-CAM) as a job
``POST api/jobs/trust?image=``     start (or find cached) the trust view
``api/jobs/{id}``                  a job's state; ``api/jobs/{id}/events`` the same as SSE
``DELETE api/jobs/{id}``           cancel
``api/jobs/{id}/result``           the PNG or JSON of a finished job
=================================  ===========================================================
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from importlib import resources

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConvlensError, first_line
from .jobs import DISSECT_SHAPES, JobRunner, dissect_job, heatmap_job, pattern_job, trust_job
from .views import Explorer, NotFound, TooLarge, png_bytes

log = logging.getLogger(__name__)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _png(data: bytes, info: dict | None = None) -> Response:
    headers = {"Cache-Control": "no-store"}
    if info is not None:
        headers["X-Convlens-Info"] = json.dumps(info, ensure_ascii=True)  # headers are ASCII
    return Response(data, media_type="image/png", headers=headers)


def page() -> str:
    """The page: index.html with app.css and app.js (trust.js inside it) inlined: one request, no path to get wrong."""
    static = resources.files("convlens.serve") / "static"

    def read(name: str) -> str:
        return (static / name).read_text(encoding="utf-8")

    script = read("app.js").replace("/*TRUST_JS*/", read("trust.js"))
    return read("index.html").replace("/*APP_CSS*/", read("app.css")).replace("/*APP_JS*/", script)


class PrefixTolerant:
    """ASGI wrapper: with a root path ``P`` (``--root-path``), answer ``P/x`` as ``/x`` too.

    A proxy that strips the prefix sends ``/x`` (uvicorn then reports ``P/x`` with root path ``P``);
    one that passes it on, or a browser pointed at the server itself, sends ``P/x``. Both reach the page.
    """

    def __init__(self, app, prefix: str):
        self.app, self.prefix = app, prefix.rstrip("/")

    async def __call__(self, scope, receive, send):
        if self.prefix and scope["type"] in ("http", "websocket"):
            root, path = scope.get("root_path", ""), scope["path"]
            rest = path[len(root) :] if root and path.startswith(root) else path
            if rest == self.prefix or rest.startswith(self.prefix + "/"):
                scope = dict(scope, path=root + (rest[len(self.prefix) :] or "/"))
        await self.app(scope, receive, send)


def create_app(explorer: Explorer, *, jobs: JobRunner | None = None) -> FastAPI:
    """The ASGI app over ``explorer``; ``jobs`` defaults to a runner caching in ``explorer.cache``."""
    runner = jobs or JobRunner(explorer.cache / "jobs")
    app = FastAPI(title="convlens explorer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.explorer, app.state.jobs = explorer, runner
    html = page()

    @app.exception_handler(ConvlensError)
    async def _user_error(request: Request, err: ConvlensError):
        status = 404 if isinstance(err, NotFound) else 413 if isinstance(err, TooLarge) else 400
        return _error(status, str(err))

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, err: RequestValidationError):
        problems = [
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
            for e in err.errors()
        ]
        return _error(400, "bad request: " + "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return _error(err.status_code, err.detail if err.status_code != 404 else f"no such page: {request.url.path}")

    @app.exception_handler(Exception)
    async def _bug(request: Request, err: Exception):  # a bug of ours: one line for the page, the trace in the log
        log.error("error answering %s", request.url.path, exc_info=err)
        return _error(500, f"internal error: {type(err).__name__}: {first_line(err)}")

    @app.middleware("http")
    async def _timing(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - start) * 1000:.2f}"
        return response

    @app.get("/", response_class=HTMLResponse)
    def index():
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/api/model")
    def model_info():
        return explorer.info()

    @app.get("/api/images")
    def images():
        return {"images": explorer.images()}

    @app.post("/api/upload")
    async def upload(request: Request, name: str = Query("upload", max_length=200)):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > explorer.max_upload:
            raise TooLarge(f"upload {name!r} is {int(declared):,} bytes, over the limit of {explorer.max_upload:,}")
        chunks, size = [], 0
        async for chunk in request.stream():  # stop reading at the limit: never hold an oversized body
            size += len(chunk)
            if size > explorer.max_upload:
                raise TooLarge(f"upload {name!r} is over the limit of {explorer.max_upload:,} bytes")
            chunks.append(chunk)
        return await asyncio.to_thread(explorer.upload, b"".join(chunks), name)

    @app.get("/api/image.png")
    def image(image: str):
        return _png(explorer.original(image))

    @app.get("/api/predict")
    def predict(image: str, top: int = Query(5, ge=1, le=100)):
        return {"image": image, "predictions": explorer.predictions(image, top)}

    @app.get("/api/heatmap.png")
    def heatmap(
        image: str, method: str = "gradcam", layer: str = "auto", target: str = "", opacity: float = Query(0.4)
    ):
        data, info = explorer.heatmap(image, method, layer, target, opacity)
        return _png(data, info)

    @app.get("/api/activations.png")
    def activation_grid(image: str, layer: str):
        data, layout = explorer.activation_grid(image, layer)
        return _png(data, layout)

    @app.get("/api/unit")
    def unit(layer: str, unit: int):
        return explorer.unit(layer, unit)

    @app.get("/api/unit/map.png")
    def unit_map(image: str, layer: str, unit: int):
        data, info = explorer.unit_map(image, layer, unit)
        return _png(data, info)

    @app.get("/api/unit/example.png")
    def unit_example(layer: str, unit: int, rank: int = Query(0, ge=0), kind: str = "whole"):
        if explorer.atlas is None:
            raise NotFound("no atlas was given (start with --atlas STORE_OR_DISSECTION_DIR)")
        explorer.check_unit(layer, unit, explorer._channels(explorer.check_layer(layer)))
        with explorer.lock:
            picture = explorer.atlas.example(layer, unit, rank, kind)
        return _png(png_bytes(picture))

    @app.post("/api/jobs/pattern")
    def start_pattern(layer: str, unit: int, steps: int = Query(128)):
        key, compute = pattern_job(explorer, layer, unit, steps)
        return runner.submit("pattern", key, compute, "png").snapshot()

    @app.post("/api/jobs/heatmap")
    def start_heatmap(
        image: str, method: str = "scorecam", layer: str = "auto", target: str = "", opacity: float = Query(0.4)
    ):
        key, compute = heatmap_job(explorer, image, method, layer, target, opacity)
        return runner.submit("heatmap", key, compute, "json").snapshot()

    @app.post("/api/jobs/trust")
    def start_trust(image: str):
        key, compute = trust_job(explorer, image)
        return runner.submit("trust", key, compute, "json").snapshot()

    @app.post("/api/jobs/dissect")
    def start_dissect(layers: str = Query("", max_length=2000), shapes: int = Query(DISSECT_SHAPES)):
        key, compute = dissect_job(explorer, layers, shapes)
        job = runner.submit("dissect", key, compute, "json")
        if getattr(job, "cached", False):  # done before: its folder is the atlas again
            explorer.use_atlas(json.loads(job.path.read_text())["folder"])
        return job.snapshot()

    @app.get("/api/jobs/{job_id}")
    def job(job_id: str):
        return runner.get(job_id).snapshot()

    @app.delete("/api/jobs/{job_id}")
    def cancel(job_id: str):
        return runner.cancel(job_id).snapshot()

    @app.get("/api/jobs/{job_id}/result")
    def result(job_id: str):
        found = runner.get(job_id).result()
        return _png(found) if isinstance(found, bytes) else JSONResponse(found)

    @app.get("/api/jobs/{job_id}/events")
    async def events(job_id: str, request: Request):
        job = runner.get(job_id)

        async def stream():
            sent = None
            while True:
                # Decide from one snapshot: reading job.finished after sending an older snapshot could end
                # the stream without its last event (the page then waited forever at "running 8/8").
                now = job.snapshot()
                if now != sent:
                    sent = now
                    yield f"data: {json.dumps(now)}\n\n"
                if now["state"] in ("done", "error", "cancelled") or await request.is_disconnected():
                    return
                await asyncio.sleep(0.05)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    return app
