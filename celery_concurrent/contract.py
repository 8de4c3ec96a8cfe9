"""The contract between a supervisor and its containers: names, environment, reports.

A supervisor starts each container with :data:`REPORT_ENV`, :data:`SUPERVISOR_PID_ENV`,
:data:`IDENT_ENV` and :data:`REVOKES_ENV` in its environment, and names it with
:func:`container_nodename`. The container answers with :class:`LoadReport` datagrams.

Containers report their own in-flight count (reserved inputs: running or about to run)
and when they were last busy, so the supervisor never polls ``inspect``. On Redis they
also report the delivery tags they hold, so that a container's supervisor can put them
back in the queue the moment it dies, instead of after the ``visibility_timeout``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from .redact import mask_urls

if TYPE_CHECKING:
    from .spec import FunctionSpec

#: the supervisor's Unix datagram socket, where the container sends its load reports
REPORT_ENV = "CELERY_CONCURRENT_REPORT_SOCKET"
#: the node's main process: a container whose supervisor died drains and exits
SUPERVISOR_PID_ENV = "CELERY_CONCURRENT_SUPERVISOR_PID"
#: the container's ident within its node (``1``, ``gpu-2``), in its node name and reports
IDENT_ENV = "CELERY_CONCURRENT_IDENT"
#: the supervisor's Unix stream socket that hands a starting container the node's revokes
REVOKES_ENV = "CELERY_CONCURRENT_REVOKES_SOCKET"
#: the exit status of a container that recycled itself: an input's thread overran its
#: ``time_limit`` (or a terminate) and could not be stopped; its supervisor replaces it,
#: and counts a recycle, not a crash (``EX_TEMPFAIL``)
RECYCLE_EXIT_CODE = 75


def container_nodename(spec: FunctionSpec, ident: str | int, host: str | None = None) -> str:
    """The node name of a container: it names the function, so Flower shows which."""
    return f"{spec.name}-{ident}@{host or socket.gethostname()}"


@dataclass(frozen=True)
class LoadReport:
    """What a container says of its load, whenever it changes (and at least once a second)."""

    ident: str
    pid: int
    in_flight: int
    #: ``time.monotonic()`` when the container last had an input in flight (or started)
    busy_at: float
    #: the container has connected to the broker and consumes its queue
    ready: bool = True
    #: delivery tags of the messages it holds unacknowledged (Redis only): what its
    #: supervisor puts back in the queue at once if it dies
    held: tuple[str, ...] = ()
    #: why it cannot start (sent once, just before it exits)
    error: str = ""
    #: a ``@batched`` function's batches since the container started, per bucket of
    #: ``constants.BATCH_SIZE_BUCKETS`` (not cumulative), and the items they held
    batch_sizes: tuple[int, ...] = ()
    batched_items: int = 0

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> LoadReport:
        fields = json.loads(data)
        fields["held"] = tuple(fields.get("held") or ())
        fields["batch_sizes"] = tuple(fields.get("batch_sizes") or ())
        return cls(**fields)


def report_startup_failure(error: BaseException) -> None:
    """Tell the supervisor why this container cannot start, so its status can say so."""
    address = os.environ.get(REPORT_ENV)
    if not address:
        return
    if isinstance(error, SystemExit) and isinstance(error.code, str):
        text = error.code
    else:
        text = f"{type(error).__name__}: {error}"
    report = LoadReport(
        ident=os.environ.get(IDENT_ENV) or str(os.getpid()),
        pid=os.getpid(),
        in_flight=0,
        busy_at=time.monotonic(),
        ready=False,
        error=mask_urls(text)[:500],
    )
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(report.encode(), address)
