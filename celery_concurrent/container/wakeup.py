"""Slot accounting for a container's pool, and waking the worker's event loop.

A container reserves a message only while it has a free slot, so the broker's queue
length is the true backlog. Celery's event loop asks the broker for more only when it
wakes up, which without traffic is once a second; a pool that starts or finishes an
input on another thread writes to this self-pipe so that the loop acts at once, and the
listeners (the RabbitMQ prefetch gate) run on the loop's own thread.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

from ..constants import ACCEPT_ON_LOOP_TIMEOUT


class SlotWakeup:
    """Counts the inputs running in a pool and wakes the worker's hub when it changes."""

    def __init__(self) -> None:
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        #: a byte is in the pipe that the hub has not read yet: a wake-up is on its way,
        #: and another write would only cost a system call (and a GIL hand-off) more
        self._wake_pending = False
        self._lock = threading.Lock()
        self.running = 0
        #: inputs whose function has returned and whose outcome is being stored: their
        #: slots take the next input meanwhile
        self.finishing = 0
        self._listeners: list[Callable[[int], None]] = []
        #: accept (and so ack) inputs on the loop's thread, after the listeners ran
        self.accept_on_loop = False
        self._accepts: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()

    def register(self, hub: Any) -> None:
        # Called again each time the consumer reconnects: keep the one pipe.
        if self._read_fd is None:
            self._read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._read_fd, False)
            os.set_blocking(self._write_fd, False)
        hub.add_reader(self._read_fd, self._drain)

    def on_wake(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(running)`` on the hub's thread after each change."""
        if listener not in self._listeners:  # a consumer step starts again on reconnect
            self._listeners.append(listener)

    def _drain(self, *_: Any) -> None:
        assert self._read_fd is not None
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read_fd, 4096):
                pass
        # After reading (before, a byte written meanwhile would be read with the flag
        # still set, and no later change would wake the hub): a change from here on
        # writes again, and one made before is seen by what the hub does after this.
        self._wake_pending = False
        while True:
            try:
                callback, args, kwargs, done = self._accepts.get_nowait()
            except queue.Empty:
                break
            with self._lock:
                self.running += 1
            # The listeners shrink the prefetch window before the ack frees its place.
            self._tell_listeners()
            try:
                if callback is not None:
                    callback(*args, **kwargs)
            finally:
                done.set()
        self._tell_listeners()

    def _tell_listeners(self) -> None:
        for listener in self._listeners:
            listener(self.running)

    def notify(self) -> None:
        if self._write_fd is None or self._wake_pending:
            return
        self._wake_pending = True
        with contextlib.suppress(BlockingIOError, OSError):  # already pending, or closing
            os.write(self._write_fd, b"\0")

    def close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._read_fd = self._write_fd = None

    def function_returned(self) -> None:
        """An input's function returned: fetch its slot's next input while the tracer
        stores the outcome (a result backend's round trip, the signals, the ack)."""
        with self._lock:
            self.finishing += 1
        self.notify()

    def outcome_stored(self) -> None:
        """The input that returned is done (call just before its completion callback,
        which takes it out of the reserved requests)."""
        with self._lock:
            self.finishing -= 1

    def _count(self, delta: int) -> None:
        with self._lock:
            self.running += delta
        # A freed slot must wake the loop to fetch more; a start matters only to listeners.
        if delta < 0 or self._listeners:
            self.notify()

    def wrap_accept(self, callback: Callable[..., Any] | None) -> Callable[..., Any]:
        """An accept callback that also counts the input as running."""

        def count_then_accept(*args: Any, **kwargs: Any) -> Any:
            if self.accept_on_loop and self._write_fd is not None:
                done = threading.Event()
                self._accepts.put((callback, args, kwargs, done))
                self.notify()
                if done.wait(ACCEPT_ON_LOOP_TIMEOUT):
                    return None
            self._count(+1)
            if callback is not None:
                return callback(*args, **kwargs)
            return None

        return count_then_accept

    def wrap(self, callback: Callable[..., Any] | None) -> Callable[..., Any] | None:
        """A completion callback that frees the slot and then wakes the loop."""
        if callback is None:
            return None

        def then_wake(*args: Any, **kwargs: Any) -> Any:
            try:
                return callback(*args, **kwargs)
            finally:
                self._count(-1)

        return then_wake
