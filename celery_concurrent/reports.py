"""The load report a container sends its supervisor: a small JSON datagram.

Containers report their own in-flight count (reserved inputs: running or about to run)
and when they were last busy, so the supervisor never polls ``inspect``. On Redis they
also report the delivery tags they hold, so that a container's supervisor can put them
back in the queue the moment it dies, instead of after the ``visibility_timeout``.
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
    #: delivery tags of the messages it holds unacknowledged (Redis only): what its
    #: supervisor puts back in the queue at once if it dies
    held: tuple[str, ...] = ()
    #: why it cannot start (sent once, just before it exits)
    error: str = ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> LoadReport:
        fields = json.loads(data)
        fields["held"] = tuple(fields.get("held") or ())
        return cls(**fields)
