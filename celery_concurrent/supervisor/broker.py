"""A broker channel the supervisor owns: connected on first use, dropped on error."""

from __future__ import annotations

import contextlib
from typing import Any

from celery import Celery


class OwnChannel:
    """One broker connection and channel of its own, separate from the node's consumer."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self._conn: Any = None
        self._channel: Any = None

    def _ensure_channel(self) -> Any:
        if self._channel is None:
            self._conn = self.app.connection_for_read()
            # One quick attempt: the next turn tries again.
            self._conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
            self._channel = self._conn.channel()
        return self._channel

    def close(self) -> None:
        self._channel = None
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):  # tearing down a broken connection
                conn.release()
