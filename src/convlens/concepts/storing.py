"""TCAV rows into an atlas store (``convlens tcav --store``): the store of a scan or dissection of the same model."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConvlensError


def check_store(path: str | os.PathLike, model) -> None:
    """``path`` is an atlas written for ``model`` (weights fingerprint); else a one-line error, nothing written."""
    from ..atlas.store import AtlasStore, model_fingerprint

    with AtlasStore.open(path) as store:
        stored = store.meta().get("model_fingerprint")
    if stored != model_fingerprint(model.module):
        raise ConvlensError(
            f"{path} was written for another model (weights fingerprint {stored!r}); "
            "pass the store of a scan or dissection of this model"
        )


def store_tcav(result, path: str | os.PathLike, model) -> None:
    """Write ``result``'s rows into the ``tcav`` table of the atlas ``path``.

    In one transaction, under the store's writer lock.
    """
    from ..atlas.store import AtlasStore
    from ..atlas.storefile import connect, writer_lock

    path = Path(path)
    with writer_lock(path):
        check_store(path, model)
        store = AtlasStore._checked(path, connect(path, write=True))
        with store:
            store.commit_tcav(result.table(), result.runs)
