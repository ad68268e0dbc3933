"""``convlens serve``: the interactive explorer in the browser (FastAPI and uvicorn, imported when it runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConvlensWarning
from . import app
from .common import ModelOptions, grouped


@app.command()
@grouped
def serve(
    model: Annotated[
        str | None,
        typer.Argument(
            help="The model to explore, as MODEL in the other commands (default: shapes, the bundled demo model, with "
            "generated shapes images and its dissection).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="A folder of images to pick from (default for the bundled model: generated shapes)."
        ),
    ] = None,
    atlas: Annotated[
        Path | None,
        typer.Option(
            "--atlas",
            help="An atlas store (convlens scan) or a dissection folder (convlens dissect) of this model: "
            "top dataset examples, concept labels and selectivity on the unit pages.",
        ),
    ] = None,
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: a free one).")] = 8000,
    host: Annotated[
        str, typer.Option("--host", help="Address to bind; anything but a loopback address lets other machines in.")
    ] = "127.0.0.1",
    root_path: Annotated[
        str, typer.Option("--root-path", help="The path prefix a proxy serves the explorer under, e.g. /convlens.")
    ] = "",
    open_browser: Annotated[bool, typer.Option("--open", help="Open the page in a browser.")] = False,
    cache: Annotated[
        Path | None,
        typer.Option(
            "--cache",
            help="Folder for cached filter patterns, trust views and the default data "
            "(default: ~/.cache/convlens/serve).",
        ),
    ] = None,
    max_upload: Annotated[
        int, typer.Option("--max-upload", min=1, max=4096, help="Largest upload accepted, in MB.")
    ] = 20,
    opts: ModelOptions = ModelOptions(),
) -> None:
    """Explore a model in the browser: images, predictions, heatmaps, activations, unit pages, trust view.

    Serves one page on --host:--port (127.0.0.1:8000) and prints its URL; Ctrl-C stops it.
    Every URL of the page is relative, so it works behind a proxy (--root-path).

    Example: convlens serve resnet50 --weights none --data photos/ --port 8000
    """
    import warnings

    from ..serve.server import Server, default_cache, default_data, default_dissection, is_loopback
    from ..serve.views import Explorer

    if not is_loopback(host):
        warnings.warn(
            f"serving on {host}: anyone who can reach this machine can use the explorer and upload "
            "images; bind 127.0.0.1 unless you mean it",
            ConvlensWarning,
            stacklevel=1,
        )
    folder = cache or default_cache()
    loaded = opts.open(model or "shapes")
    atlas_path = atlas
    if model is None and data is None and atlas is None:
        from ..atlas.store import model_fingerprint

        typer.echo("preparing the default explorer: generated shapes images and their dissection (once)")
        data = default_data(folder)
        atlas_path = default_dissection(loaded, folder, model_fingerprint(loaded.module))
    explorer = Explorer(
        loaded,
        data,
        atlas_path,
        cache=folder / "results",
        source=model or "shapes",
        max_upload=max_upload * 1024 * 1024,
    )
    server = Server(explorer, host=host, port=port, root_path=root_path)
    typer.echo(f"convlens explorer on {server.url} (Ctrl-C stops it)")
    if open_browser:
        import webbrowser

        webbrowser.open(server.url)
    server.wait()
