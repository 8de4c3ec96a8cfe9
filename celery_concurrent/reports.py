"""The load report a container sends its supervisor: a small JSON datagram.

Containers report their own in-flight count (reserved inputs: running or about to run)
and when they were last busy, so the supervisor never polls ``inspect``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LoadReport:
    ident: str
    pid: int
    in_flight: int
    #: ``time.monotonic()`` when the container last had an input in flight (or started)
    busy_at: float
    #: the container has connected to the broker and consumes its queue
    ready: bool = True
    #: inputs this container has finished so far
    processed: int = 0
    #: ``time.monotonic()`` of the first input it started, or 0
    first_input_at: float = 0.0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> LoadReport:
        return cls(**json.loads(data))
