"""Where a dataset's work runs: ``local`` (this process) or ``ray`` (Ray Data actors, here or on a cluster).

The one seam between ``scan``, ``dissect`` and ``evaluate`` and the machines they run on.
:func:`resolve_engine` turns the ``engine`` option and its Ray options into an engine object; it
is the one place an engine's name is checked. Every engine offers

* ``check()``: what can be refused before the model and the data are loaded (for Ray, the
  cluster address: a one-line error within seconds);
* ``connect()``: what must hold before anything is written (for Ray: joined, or started here);
* ``distributed``: whether the work goes to the engine's workers (each workload keeps its Ray
  form beside its local one: :mod:`convlens.atlas.ray_engine`, :mod:`convlens.evaluation.ray`).

Ray is imported only by the Ray engine's methods, never by importing this package.

Example::

    engine = resolve_engine("ray", concurrency=2)
    engine.check()      # the address answers as Ray, before any work
"""

from __future__ import annotations

from ..errors import ConvlensError
from .local import LocalEngine
from .ray import RayEngine

Engine = LocalEngine | RayEngine

#: Engines by name, as ``--engine`` takes them.
ENGINES: dict[str, type[Engine]] = {"local": LocalEngine, "ray": RayEngine}


def resolve_engine(
    name: str | Engine = "local",
    ray_address: str | None = None,
    concurrency: int | None = None,
    num_gpus: float | None = None,
) -> Engine:
    """The engine called ``name`` with the Ray options (which the local engine ignores); an engine object as is.

    An unknown name is one line naming the choices."""
    if isinstance(name, (LocalEngine, RayEngine)):
        return name
    if name not in ENGINES:
        raise ConvlensError(f"unknown engine {name!r}; choose {' or '.join(ENGINES)}")
    return ENGINES[name](ray_address=ray_address, concurrency=concurrency, num_gpus=num_gpus)


__all__ = ["ENGINES", "Engine", "LocalEngine", "RayEngine", "resolve_engine"]
