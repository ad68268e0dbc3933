"""``engine="ray"``: work on Ray Data actors (``pip install 'convlens[ray]'``); what every workload on Ray shares.

Here: the cluster address, checked before any work; connecting (or starting Ray on this
machine); the actor pool, its GPUs and its retries; and the one set-up of a worker,
:class:`ModelWorker`, which loads the model once per actor. What a workload's actors compute
lives with the workload (:mod:`convlens.atlas.ray_engine`, :mod:`convlens.evaluation.ray`).

``ray_address`` (or the ``RAY_ADDRESS`` environment variable) connects to an existing cluster;
without one, Ray starts on this machine. An address where nothing listens, or where something
other than Ray answers (told apart by an HTTP/2 client preface: Ray's head is a gRPC server), is
a one-line error within ``CONNECT_TIMEOUT_S`` (Ray itself would retry for minutes), before Ray
starts or prints anything. An actor whose worker dies is restarted and its batch run again, up
to ``RETRIES`` times; past that the run stops on one line saying what was kept. Ray (and torch)
are imported only when a method here runs.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from ..errors import ConvlensError, first_line

CONNECT_TIMEOUT_S = 3.0
#: times a Ray actor is restarted, and a batch retried, after its worker dies (Ray Data's default: forever);
#: passed as actor options, which Ray Data 2.60 names no parameter for (it warns they go in 2.64)
RETRIES = 3


def import_ray():
    """The ``ray`` module with Ray Data, or one line saying how to install it."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise ConvlensError("the Ray engine needs Ray: pip install 'convlens[ray]' (ray[data]==2.60.0)") from None
    return ray


def _host_port(address: str) -> tuple[str, int]:
    host_port = address.split("://", 1)[-1].rstrip("/")
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ConvlensError(f"a Ray address looks like HOST:PORT or ray://HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


#: the HTTP/2 client preface and an empty SETTINGS frame (RFC 9113, sections 3.4 and 6.5)
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def probe_address(address: str) -> str | None:
    """Why ``address`` is not a Ray cluster, or ``None`` when it answers as one, within ``CONNECT_TIMEOUT_S``.

    Ray's head (the GCS, and the Ray Client server of ``ray://``) is a gRPC server, so it answers an
    HTTP/2 client preface with its own SETTINGS frame. Anything else (nothing listening, a web
    server, a silent port) is told apart here, before ``ray.init`` would retry it for minutes.
    """
    host, port = _host_port(address)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S) as connection:
            connection.sendall(_H2_PREFACE)
            header = b""
            while len(header) < 9:
                connection.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = connection.recv(9 - len(header))
                if not chunk:
                    break
                header += chunk
    except TimeoutError:
        return f"something accepts connections there but says nothing within {CONNECT_TIMEOUT_S:.0f} s"
    except OSError as err:
        return f"nothing answers there ({err.strerror or err})"
    if len(header) == 9 and header[3] == 0x04:  # a SETTINGS frame: an HTTP/2 (gRPC) server
        return None
    if header.startswith((b"HTTP/", b"<")):  # a status line, or the bare HTML page of an HTTP/0.9-style error
        return "a web server answers there, not Ray"
    return "something answers there, but not as Ray's gRPC server"


def check_address(address: str | None = None) -> str | None:
    """The cluster address to use (``address``, else ``RAY_ADDRESS``, else ``None``: Ray starts here), once it
    answers as Ray; otherwise a one-line error within ``CONNECT_TIMEOUT_S``. Starts nothing."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    problem = probe_address(address) if address not in (None, "auto", "local") else None
    if problem is not None:
        raise ConvlensError(
            f"cannot reach the Ray cluster at {address!r}: {problem}; check --ray-address / "
            "RAY_ADDRESS (the head node's HOST:PORT, 6379 by default, or ray://HOST:10001), "
            "or leave it out to run Ray on this machine"
        )
    return address


@dataclass
class RayEngine:
    """Ray Data actors: ``concurrency`` of them (default: one per CPU, or per GPU), ``num_gpus`` GPUs each
    (default: one when this machine sees CUDA, else none), on the cluster at ``ray_address``."""

    ray_address: str | None = None
    concurrency: int | None = None
    num_gpus: float | None = None
    name = "ray"
    distributed: Literal[True] = True

    def check(self) -> str | None:
        """The address to connect to, once it answers as Ray, and the actor count checked; starts nothing."""
        self._check_concurrency()
        return check_address(self.ray_address)

    def _check_concurrency(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ConvlensError(f"--concurrency must be at least 1, got {self.concurrency}")

    def connect(self) -> None:
        """Connect to the cluster (or start Ray here); a no-op when Ray is already initialised."""
        ray = import_ray()
        if ray.is_initialized():
            return
        address = self.check()
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as err:
            raise ConvlensError(f"cannot connect to the Ray cluster at {address!r}: {first_line(err)}") from None

    def gpus(self) -> float:
        """GPUs per actor."""
        import torch

        return (1.0 if torch.cuda.is_available() else 0.0) if self.num_gpus is None else float(self.num_gpus)

    def actors(self) -> int:
        """Actors in the pool: ``concurrency``, else as many as the cluster's GPUs (or CPUs) allow."""
        self._check_concurrency()  # also when Ray was started by the caller, so connect() checked nothing
        if self.concurrency is not None:
            return self.concurrency
        resources = import_ray().cluster_resources()
        gpus = self.gpus()
        if gpus > 0:
            return max(1, int(resources.get("GPU", 1) // gpus))
        return max(1, int(resources.get("CPU", 1)))

    def map_batches(
        self,
        rows: Sequence[dict],
        worker: type,
        worker_options: dict,
        *,
        model,
        batch_size: int,
        blocks: int,
        retried: str,
        kept: str,
    ) -> Iterator[dict]:
        """``worker(model, num_gpus, **worker_options)`` on each batch of ``batch_size`` rows, on the actor pool;
        the rows it returns, as they come. The model travels once, through the object store.

        A Ray error (a worker that died on every try, a task that raised) is one line saying what a
        retry redid (``retried``: "a part") and what the run ``kept`` for the next one to resume."""
        ray = import_ray()
        self.connect()
        gpus = self.gpus()
        dataset = ray.data.from_items(list(rows), override_num_blocks=blocks)
        # wrapped in a list so that Ray Data hands the actor the reference, not a copy per batch
        options = {"model": [ray.put(model)], "num_gpus": gpus, **worker_options}
        results = dataset.map_batches(
            worker,
            fn_constructor_kwargs=options,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=self.actors()),
            num_gpus=gpus,
            batch_format="numpy",
            max_restarts=RETRIES,
            max_task_retries=RETRIES,
        )
        try:
            yield from results.iter_rows()
        except ConvlensError:
            raise
        except Exception as err:
            raise ConvlensError(
                f"the Ray job stopped: {first_line(err)} (after up to {RETRIES} retries of "
                f"{retried}); {kept}: run the same command again to resume"
            ) from None


class ModelWorker:
    """The one set-up of a Ray Data actor: the model, loaded once per actor, on its GPU when it holds one."""

    def __init__(self, model, num_gpus: float):
        import torch

        if isinstance(model, list):  # an ObjectRef, wrapped so Ray Data does not try to resolve it for us
            model = import_ray().get(model[0])
        if num_gpus > 0 and torch.cuda.is_available():
            model.to("cuda")
        self.model = model
