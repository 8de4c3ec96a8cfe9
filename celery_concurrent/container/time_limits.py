"""Time limits and termination for inputs that run on threads.

A thread cannot be killed: Python raises an exception into another thread
(``PyThreadState_SetAsyncExc``), and only between two bytecodes. A thread inside a
blocking C call (a long ``time.sleep``, a socket read without a timeout) gets the
exception when that call returns. The threads pool (``thread_pool.py``) raises
:class:`~celery.exceptions.SoftTimeLimitExceeded` at the soft limit, and
:class:`InputAbandoned` once an input's outcome is settled without it (its hard limit,
a revoke with ``terminate=True``); the deadlines of every input share one timer thread.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import threading
import time
from collections.abc import Callable

from celery.utils.log import get_logger

logger = get_logger(__name__)

_set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc


class InputAbandoned(BaseException):
    """Raised into the thread of an input whose outcome was settled without it.

    A ``BaseException``, so that ``except Exception`` in the function does not swallow
    it and Celery's tracer stores nothing: the result (``TimeLimitExceeded``, or
    ``REVOKED``) is stored already. ``finally`` blocks and ``with`` exits still run.
    """


def raise_in_thread(ident: int, exc_type: type[BaseException] | None) -> bool:
    """Raise ``exc_type`` in the thread ``ident`` at its next bytecode; ``None`` clears
    what is pending. Whether the thread was found."""
    exc = ctypes.py_object(exc_type) if exc_type is not None else None
    found = int(_set_async_exc(ctypes.c_ulong(ident), exc))
    if found > 1:  # never happens with a thread's own ident; undo, as the C API asks
        _set_async_exc(ctypes.c_ulong(ident), None)
        return False
    return found == 1


class Deadline:
    """A call that :class:`Deadlines` makes at ``when``, unless cancelled first."""

    __slots__ = ("when", "seq", "call", "owner")

    def __init__(self, when: float, seq: int, call: Callable[[], None], owner: Deadlines) -> None:
        self.when = when
        self.seq = seq
        self.call: Callable[[], None] | None = call
        self.owner = owner

    def __lt__(self, other: Deadline) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)

    def cancel(self) -> None:
        self.owner.cancel(self)


class Deadlines:
    """One timer thread for every deadline of a pool, started with the first one."""

    def __init__(self) -> None:
        self._heap: list[Deadline] = []
        self._changed = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._cancelled = 0

    def call_later(self, delay: float, call: Callable[[], None]) -> Deadline:
        deadline = Deadline(time.monotonic() + delay, next(self._seq), call, self)
        with self._changed:
            heapq.heappush(self._heap, deadline)
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="celery-concurrent-limits", daemon=True
                )
                self._thread.start()
            self._changed.notify()
        return deadline

    def cancel(self, deadline: Deadline) -> None:
        with self._changed:
            if deadline.call is None:
                return
            deadline.call = None
            self._cancelled += 1
            # Most inputs end long before their limits: drop what they leave behind once
            # it is most of the heap, instead of keeping it until each limit passes.
            if self._cancelled > 64 and 2 * self._cancelled > len(self._heap):
                self._heap = [d for d in self._heap if d.call is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._closed:
                    now = time.monotonic()
                    if self._heap and self._heap[0].when <= now:
                        due = heapq.heappop(self._heap)
                        if due.call is None:
                            self._cancelled -= 1
                            continue
                        call, due.call = due.call, None  # a late cancel is a no-op
                        break
                    self._changed.wait(self._heap[0].when - now if self._heap else None)
                else:
                    return
            try:
                call()
            except Exception:  # noqa: BLE001 - one input's limit must not stop the rest
                logger.exception("celery-concurrent: a time limit's handler failed")
