"""Where a supervisor hears from its containers: their load reports, and its own wake-ups.

Containers send :class:`~celery_concurrent.contract.LoadReport` datagrams to a Unix
socket in a directory of the node's own; a pipe beside it lets any thread (a control
command, a signal handler) cut the supervisor's wait short.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import socket
import tempfile
from collections.abc import Iterator

from celery.utils.log import get_logger

from ..constants import MAX_REPORT_BYTES
from ..contract import LoadReport

logger = get_logger(__name__)


class ReportInbox:
    """The node's report socket and wake-up pipe, in a private temporary directory."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or tempfile.mkdtemp(prefix="celery-concurrent-")
        self.address = os.path.join(self.directory, "reports.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(self.address)
        self._sock.setblocking(False)
        self._buffer = bytearray(MAX_REPORT_BYTES)
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False

    def path(self, name: str) -> str:
        """A path beside the report socket (the revoke server's socket, say)."""
        return os.path.join(self.directory, name)

    def wake(self) -> None:
        """Cut the current :meth:`wait` short; safe from any thread and in a signal handler."""
        if self._closed:
            return  # its descriptor may be another file's by now
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def wait(self, timeout: float) -> tuple[bool, bool]:
        """Wait up to ``timeout`` seconds; return (woken, reports waiting)."""
        try:
            readable, _, _ = select.select([self._sock.fileno(), self._wake_r], [], [], timeout)
        except (OSError, ValueError) as exc:
            raise EOFError("the inbox is closed") from exc
        woken = self._wake_r in readable
        if woken:
            os.read(self._wake_r, 4096)
        return woken, self._sock.fileno() in readable

    def receive(self) -> Iterator[LoadReport]:
        """Every report waiting now, oldest first; malformed ones are logged and skipped."""
        while True:
            try:
                size = self._sock.recv_into(self._buffer)
            except (BlockingIOError, OSError):
                return
            try:
                yield LoadReport.decode(bytes(self._buffer[:size]))
            except (ValueError, TypeError):
                logger.warning("celery-concurrent: ignoring a malformed load report")

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        shutil.rmtree(self.directory, ignore_errors=True)
