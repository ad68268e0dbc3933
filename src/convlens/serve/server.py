"""Running the explorer: uvicorn in a thread, the object a notebook shows as an IFrame, the default data.

:func:`serve` is ``cl.serve``; ``convlens serve`` (:mod:`convlens.cli.serve`) calls it and waits.
"""

from __future__ import annotations

import html
import ipaddress
import os
import socket
import threading
import time
from pathlib import Path

from ..errors import ConvlensError
from .views import MAX_UPLOAD_BYTES, Explorer

#: The generated images of the default explorer: unseen by the bundled model (trained on seed 0), as the report's.
DEFAULT_SEED = 2026
DEFAULT_PER_CLASS = 3
#: The default dissection: the report's (``convlens.report.atlas_section``), 200 generated shapes images.
DISSECTION_IMAGES = 200
DISSECTION_SEED = 2028


def default_cache() -> Path:
    """Where cached filter patterns, trust views and the default data live: ``$XDG_CACHE_HOME/convlens/serve``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "convlens" / "serve"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_data(cache: Path) -> Path:
    """Generated shapes images with their masks, written once (whole or not at all) under ``cache``."""
    from ..data.shapes import write_shapes
    from ..fileio import staged_folder

    folder = cache / f"shapes-{DEFAULT_SEED}-{DEFAULT_PER_CLASS}"
    if not folder.is_dir():
        with staged_folder(folder) as stage:
            write_shapes(stage, DEFAULT_PER_CLASS, seed=DEFAULT_SEED, split=None)
    return folder


def default_dissection(model, cache: Path, fingerprint: str, progress=None) -> Path | None:
    """The report's dissection of the bundled model's two last ReLUs, computed once per weights and kept."""
    from ..atlas.dissect import STORE_NAME, dissect
    from ..data.shapes import SHAPE_CLASSES
    from ..fileio import staged_folder
    from ..report.atlas_section import BUNDLED_LAYERS

    names = model.named_layers()
    if list(model.labels or []) != list(SHAPE_CLASSES) or not all(n in names for n in BUNDLED_LAYERS):
        return None
    folder = cache / f"dissection-{fingerprint}"
    if not (folder / STORE_NAME).is_file():
        with staged_folder(folder) as stage:
            dissect(
                model,
                None,
                list(BUNDLED_LAYERS),
                shapes=DISSECTION_IMAGES,
                seed=DISSECTION_SEED,
                k=8,
                out=stage,
                figures=False,
                progress=progress,
            )
    return folder


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one), or a one-line error."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listening = socket.socket(family, kind)
    except OSError as err:
        raise ConvlensError(f"cannot serve on {host}:{port}: {err.strerror or err}") from None
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind(address)
    except OSError as err:
        listening.close()
        raise ConvlensError(f"cannot serve on {host}:{port}: {err.strerror or err}; pass another --port") from None
    return listening


class Server:
    """A running explorer: ``url``, ``stop()``; in a notebook it shows itself as the page in an IFrame.

    Uvicorn serves the app in a daemon thread of this process, so the model is loaded once and shared
    with the caller. ``with cl.serve(model) as server:`` stops it at the end of the block.
    """

    def __init__(
        self, explorer: Explorer, *, host: str = "127.0.0.1", port: int = 0, root_path: str = "", height: int = 900
    ):
        try:
            import uvicorn

            from .app import PrefixTolerant, create_app
        except ImportError as err:
            raise ConvlensError(
                f"the explorer needs FastAPI and uvicorn ({err.name} is missing): pip install 'convlens[serve]'"
            ) from None

        self.explorer = explorer
        self.host, self.root_path, self.height = host, root_path.rstrip("/"), height
        self.app = create_app(explorer)
        # log_config=None: uvicorn's own config runs logging.config.dictConfig, which closes every handler
        # of the process (the caller's, absl's that closes sys.stderr); its loggers propagate instead
        config = uvicorn.Config(
            PrefixTolerant(self.app, self.root_path),
            host=host,
            port=port,
            root_path=self.root_path,
            log_config=None,
            log_level="warning",
            lifespan="off",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        listening = _bind(host, port)  # here, so a taken port is one line and not uvicorn's exit in a thread
        self.port = listening.getsockname()[1]
        # which methods apply is found by trying each once: start now, so the first page load finds it done
        threading.Thread(target=self._warm_up, name="convlens-serve-warm-up", daemon=True).start()
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [listening]}, name="convlens-serve", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._cleanup()
                raise ConvlensError(f"the explorer did not start on {host}:{self.port}")
            time.sleep(0.02)

    def _warm_up(self) -> None:
        try:
            self.explorer.methods()
        except Exception:
            pass

    @property
    def url(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        shown = "127.0.0.1" if shown in ("0.0.0.0", "[::]") else shown
        return f"http://{shown}:{self.port}{self.root_path}/"

    def _repr_html_(self) -> str:
        return (
            f'<iframe src="{html.escape(self.url)}" width="100%" height="{self.height}" '
            f'style="border:1px solid #ccc" title="convlens explorer"></iframe>'
        )

    def __repr__(self) -> str:
        return f"<convlens explorer at {self.url}>"

    def wait(self) -> None:
        """Block until the server stops (Ctrl-C stops it)."""
        try:
            while self._thread.is_alive():
                self._thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Stop serving, end the running jobs and remove the temporary cache, if any."""
        self._server.should_exit = True
        self._thread.join(10)
        self._cleanup()

    def _cleanup(self) -> None:
        self.app.state.jobs.close()
        self.explorer.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(
    model=None,
    data=None,
    atlas=None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    root_path: str = "",
    cache=None,
    source: str | None = None,
    max_upload: int = MAX_UPLOAD_BYTES,
    height: int = 900,
) -> Server:
    """Start the explorer on ``model`` and return the running :class:`Server` (``port=0``: a free port).

    Args:
        model: a :class:`convlens.Model`, anything :func:`convlens.load_model` takes, or ``None`` for the
            bundled shapes model with generated shapes images and its dissection (computed once, cached).
        data: a folder of images to choose from (paths are confined to it).
        atlas: an atlas store or a dissection folder written for ``model``.
        host, port, root_path: where to listen; ``root_path`` is the prefix a proxy serves it under.
        cache: the folder for cached results (default: a temporary folder; the CLI uses
            :func:`default_cache`).

    Example::

        server = cl.serve(cl.load_model("resnet18", weights="none"), data="photos/")
        server            # in a notebook: the page, in an IFrame
        server.stop()
    """
    from ..atlas.store import model_fingerprint
    from ..models import load_model

    bundled = model is None
    if model is None or isinstance(model, str):
        source = source or model or "shapes"
        model = load_model(model or "shapes")
    if bundled and data is None and atlas is None:  # the default explorer: generated images and the dissection
        where = Path(cache) if cache is not None else default_cache()
        data = default_data(where)
        atlas = default_dissection(model, where, model_fingerprint(model.module))
    explorer = Explorer(model, data, atlas, cache=cache, source=source, max_upload=max_upload)
    try:
        return Server(explorer, host=host, port=port, root_path=root_path, height=height)
    except BaseException:
        explorer.close()
        raise
