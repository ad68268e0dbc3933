"""``engine="local"``: the work runs in this process (a scan's images read by DataLoader workers)."""

from __future__ import annotations

from typing import Literal


class LocalEngine:
    """This process. Nothing to check or connect; the Ray options mean nothing here and are ignored."""

    name = "local"
    distributed: Literal[False] = False

    def __init__(self, ray_address: str | None = None, concurrency: int | None = None, num_gpus: float | None = None):
        pass

    def check(self) -> None:
        """Nothing can be unreachable here."""

    def connect(self) -> None:
        """Nothing to connect to."""

    def __repr__(self) -> str:
        return "LocalEngine()"
