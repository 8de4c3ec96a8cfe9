"""The container's side of the revoke handshake (see ``supervisor/revokes.py``).

Before a container takes its first input it merges the revokes its node knows, so a
task revoked while no container of its function ran is still skipped, by id or by
stamped header, and keeps its REVOKED state.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger
from celery.worker import state

from ..constants import REVOKES_RECEIVE_TIMEOUT
from ..contract import REVOKES_ENV

logger = get_logger(__name__)


class RevokeSync(bootsteps.StartStopStep):
    """Consumer bootstep: merge the node's revokes once this container's control queue
    is bound (every later revoke reaches it directly), before the event loop runs."""

    label = "celery-concurrent revoke sync"
    requires = ("celery.worker.consumer.control:Control",)

    def __init__(self, consumer: Any, concurrent_function: str | None = None, **kwargs: Any):
        self.address = os.environ.get(REVOKES_ENV)
        self.enabled = bool(concurrent_function and self.address)
        super().__init__(consumer, **kwargs)

    def start(self, consumer: Any) -> None:
        assert self.address is not None
        try:
            snapshot = receive_snapshot(self.address)
        except (OSError, ValueError) as exc:
            # The node is gone or stopping: the container drains and exits by itself.
            logger.warning("celery-concurrent: no revokes from the node (%s)", exc)
            return
        merge_snapshot(snapshot)


def receive_snapshot(address: str, timeout: float = REVOKES_RECEIVE_TIMEOUT) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    snapshot = json.loads(b"".join(chunks))
    if not isinstance(snapshot, dict):
        raise ValueError(f"a revoke snapshot must be an object, got {type(snapshot).__name__}")
    return snapshot


def merge_snapshot(snapshot: dict[str, Any]) -> None:
    state.merge_revoked(snapshot.get("ids") or [])
    for header, values in (snapshot.get("stamps") or {}).items():
        known = state.revoked_stamps.get(header)
        if known is None:
            state.revoked_stamps[header] = values
            continue
        known = known if isinstance(known, list) else [known]
        extra = values if isinstance(values, list) else [values]
        state.revoked_stamps[header] = known + [v for v in extra if v not in known]
