"""Wake the worker's event loop when a container slot frees.

A container reserves a message only while it has a free slot (``worker_disable_prefetch``),
so the broker's queue length is the true backlog. Celery's event loop asks the broker
for more only when it wakes up, which without traffic is once a second; a pool that
finishes an input on another thread writes to this pipe so that the loop asks at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any


class SlotWakeup:
    """A self-pipe registered with the worker's hub."""

    def __init__(self) -> None:
        self._read_fd: int | None = None
        self._write_fd: int | None = None

    def register(self, hub: Any) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        hub.add_reader(self._read_fd, self._drain)

    def _drain(self, *_: Any) -> None:
        assert self._read_fd is not None
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def notify(self) -> None:
        if self._write_fd is None:
            return
        try:
            os.write(self._write_fd, b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending, or closing down

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read_fd = self._write_fd = None

    def wrap(self, callback: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """A callback that runs ``callback`` (which frees the slot) and then wakes the loop."""
        if callback is None:
            return None

        def then_wake(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            finally:
                self.notify()

        return then_wake
