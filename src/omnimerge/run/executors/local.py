"""The local executor: the streaming loop on this machine (one reader and one writer thread)."""

from __future__ import annotations

from typing import Callable

from ...plan import Job
from ..stream import Sink, stream


class LocalExecutor:
    def run(self, sink: Sink, *, device: str, on_tensor: Callable[[Job], None] | None = None) -> None:
        stream(sink, device=device, on_tensor=on_tensor)
