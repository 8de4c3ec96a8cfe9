"""Hand a starting container every revoke its node knows.

A container skips Celery's mingle (it would cost every cold start a second of waiting
for replies), so nothing else tells it about a ``revoke`` sent before its own control
queue existed. The node's worker received every one of them. The supervisor serves a
snapshot of the node's revoked ids and stamped headers on a Unix socket, and each
container reads it once its control queue is bound and before it takes its first input
(:class:`celery_concurrent.container.revokes.RevokeSync`): every later revoke reaches
the container directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from typing import Any

from celery.utils.log import get_logger
from celery.worker import state

from ..constants import REVOKES_SEND_TIMEOUT

logger = get_logger(__name__)


def revoked_snapshot() -> dict[str, Any]:
    """This process's revoked task ids and stamped headers, as JSON-ready data."""
    for _ in range(5):
        try:
            # The node's consumer adds revokes from its own thread meanwhile.
            return {"ids": list(state.revoked), "stamps": dict(state.revoked_stamps)}
        except RuntimeError:
            continue
    return {"ids": list(state.revoked.copy()), "stamps": dict(state.revoked_stamps)}


class RevokeServer:
    """Serves :func:`revoked_snapshot` to every container that connects, on its own thread."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(address)
        self._sock.listen(64)
        self._thread = threading.Thread(target=self._serve, name="celery-concurrent-revokes")
        self._thread.daemon = True
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    conn.settimeout(REVOKES_SEND_TIMEOUT)
                    conn.sendall(json.dumps(revoked_snapshot(), default=str).encode())
                except OSError as exc:
                    logger.debug("celery-concurrent: a container left before its revokes: %s", exc)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.address)
