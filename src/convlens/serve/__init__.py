"""``convlens serve``: the interactive explorer in the browser (``pip install 'convlens[serve]'``).

Pick an image, a layer, a method and a class; click a channel for its unit page (its map,
its filter pattern, its top dataset examples and dissection label from an atlas); the
trust view scores the methods on the image. One model per server, loaded once.

Modules: views (computing the pictures), atlas_view (reading an atlas), jobs (background
jobs, progress, cancel, the disk cache), trust (the metrics table and verdict), app (the
FastAPI routes), server (uvicorn in a thread, :func:`serve`). Only app and server import
FastAPI/uvicorn, when they are used; ``import convlens`` never does.

Example::

    import convlens as cl
    server = cl.serve(cl.load_model("shapes"), data="shapes/")
    print(server.url)
    server.stop()
"""

from .server import Server, serve

__all__ = ["Server", "serve"]
