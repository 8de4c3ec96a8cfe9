"""Run ``async def`` task bodies under Celery's synchronous tracer.

Celery 5.7's tracer calls ``task.run`` and stores what it returns, so an ``async def``
task would store a coroutine. :func:`sync_runner` wraps the coroutine function in a
plain function that drives the coroutine to completion:

* inside a container, the tracer itself runs in an :class:`InputGreenlet` whose parent
  is an asyncio task on the container's event-loop thread. Each step of the coroutine
  runs in that greenlet, so Celery's greenlet-local request context (``self.request``)
  stays right; each future the coroutine waits on is handed to the parent task, which
  awaits it on the loop. No thread is spent per in-flight input.
* anywhere else (``task.apply()``, ``task_always_eager``, a plain prefork or threads
  worker) the coroutine runs to completion on a private event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import inspect
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from greenlet import getcurrent, greenlet

from .constants import BOOKKEEPING_THREADS


class InputGreenlet(greenlet):
    """The greenlet one container input's tracer runs in."""


class Abandon(BaseException):
    """Sent into an input greenlet to close its coroutine and raise ``error``."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` from inside an :class:`InputGreenlet`, awaiting on the parent's loop.

    What the parent switches back is ``None`` (resume), an exception to throw into the
    coroutine, or an :class:`Abandon`.
    """
    here = getcurrent()
    resume: BaseException | None = None
    while True:
        try:
            if resume is None:
                waiting_on = coro.send(None)
            elif isinstance(resume, Abandon):
                coro.close()
                raise resume.error
            else:
                waiting_on = coro.throw(resume)
        except StopIteration as stop:
            return stop.value
        resume = here.parent.switch(waiting_on)


def run_coroutine(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive ``coro`` to completion from synchronous code and return its result."""
    if isinstance(getcurrent(), InputGreenlet):
        return drive(coro)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from code already running on an event loop (an eager call from a
    # coroutine): that loop must not block, so the input gets a loop of its own.
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="celery-concurrent-eager")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def sync_runner(fn: Callable[..., Coroutine[Any, Any, Any]]) -> Callable[..., Any]:
    """Wrap a coroutine function so that calling it runs the coroutine to completion."""
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(f"{fn!r} is not an async function")

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        return run_coroutine(fn(*args, **kwargs))

    run.__celery_concurrent_async__ = fn  # type: ignore[attr-defined]
    return run


def original_async(fn: Any) -> Callable[..., Any] | None:
    """The coroutine function behind a :func:`sync_runner` wrapper, if ``fn`` is one."""
    return getattr(fn, "__celery_concurrent_async__", None)


class Bookkeeping:
    """Threads for the inputs' blocking bookkeeping (their results' round trips).

    An input hands a call over and awaits the asyncio future :meth:`run` returns. Lighter
    than ``loop.run_in_executor``, whose ``concurrent.futures.Future`` (a condition
    variable) and future chaining cost each input more than its ``Request`` did: the
    outcomes of the calls that finish while the loop is busy go back to it in one
    ``call_soon_threadsafe``.
    """

    def __init__(self, threads: int, name: str) -> None:
        self.size = threads
        self.name = name
        self._calls: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        #: outcomes not yet handed to their loop, and whether it has been called for them
        self._outcomes: dict[asyncio.AbstractEventLoop, collections.deque[tuple[Any, ...]]] = {}
        self._called: set[asyncio.AbstractEventLoop] = set()
        #: calls handed over and not yet returned
        self._busy = 0

    def run(self, loop: asyncio.AbstractEventLoop, call: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``call`` on a bookkeeping thread; its outcome settles the returned future."""
        future = loop.create_future()
        if len(self._threads) < self.size:
            self._add_thread()
        with self._lock:
            self._busy += 1
        self._calls.put((loop, future, call))
        return future

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the calls in flight; True once none is.

        The threads are daemons (an idle one must not hold the process up at exit), so
        a process that stops waits here for the results it is still storing.
        """
        deadline = time.monotonic() + timeout
        while self._busy and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._busy

    def _add_thread(self) -> None:
        with self._lock:
            if len(self._threads) >= self.size:
                return
            thread = threading.Thread(
                target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            loop, future, call = self._calls.get()
            outcome: tuple[Any, Any, BaseException | None]
            try:
                outcome = (future, call(), None)
            except BaseException as error:  # noqa: BLE001 - raised in the input instead
                outcome = (future, None, error)
            with self._lock:
                self._busy -= 1
                self._outcomes.setdefault(loop, collections.deque()).append(outcome)
                if loop in self._called:
                    continue
                self._called.add(loop)
            try:
                loop.call_soon_threadsafe(self._settle, loop)
            except RuntimeError:  # the loop is closed: nobody waits for the outcome
                with self._lock:
                    self._called.discard(loop)
                    self._outcomes.pop(loop, None)

    def _settle(self, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            self._called.discard(loop)
            outcomes = self._outcomes.pop(loop, ())
        for future, value, error in outcomes:
            if future.cancelled():
                continue
            if error is None:
                future.set_result(value)
            else:
                future.set_exception(error)


#: the threads an input's blocking bookkeeping (its result's round trip) runs on
_BOOKKEEPING = Bookkeeping(BOOKKEEPING_THREADS, "celery-concurrent-bookkeeping")


def finish_bookkeeping(timeout: float) -> bool:
    """Let the results being stored off the loop finish (a stopping container)."""
    return _BOOKKEEPING.wait_idle(timeout)


def off_the_loop(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` (a result backend's ``mark_as_done``), run on a bookkeeping thread when
    an input's tracer calls it, while the loop runs the other inputs.

    The tracer of a container input runs on the event loop's thread, so each stored
    result (a round trip or two to the backend) would stop every other input for that
    long. From an :class:`InputGreenlet`, the call goes to a thread and the input waits
    for it as for any future; the tracer then goes on in order (signals, then the ack
    of an ``acks_late`` input). Anywhere else it is called as is.
    """

    @functools.wraps(method)
    def store(*args: Any, **kwargs: Any) -> Any:
        if not isinstance(getcurrent(), InputGreenlet):
            return method(*args, **kwargs)
        loop = asyncio.get_running_loop()
        return drive(_await(_BOOKKEEPING.run(loop, lambda: method(*args, **kwargs))))

    store.__celery_concurrent_offloaded__ = True  # type: ignore[attr-defined]
    return store


async def _await(future: asyncio.Future[Any]) -> Any:
    return await future


def offload_result_store(backend: Any) -> None:
    """Store ``backend``'s successful results off the loop in this process (an asyncio
    container). Failures, rarer, are stored where they happen: a time limit's or a
    terminate's outcome is stored while its input's greenlet is being closed."""
    cls = type(backend)
    if not getattr(cls.mark_as_done, "__celery_concurrent_offloaded__", False):
        cls.mark_as_done = off_the_loop(cls.mark_as_done)
