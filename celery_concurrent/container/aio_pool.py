"""The asyncio pool: a container's inputs as asyncio tasks on one event-loop thread.

Each input's tracer (acks, result storage, signals, events) runs in an
:class:`~celery_concurrent.asyncbridge.InputGreenlet` driven by an asyncio task. The
coroutine of an ``async def`` task then awaits on this loop, so in-flight inputs cost a
greenlet and a task each, never a thread. ``time_limit`` and ``soft_time_limit`` are
enforced by cancelling what the coroutine waits on: the soft limit raises
:class:`~celery.exceptions.SoftTimeLimitExceeded` inside the coroutine, the hard limit
closes the coroutine and fails the input with
:class:`~celery.exceptions.TimeLimitExceeded`. A revoke with ``terminate=True`` closes
the coroutine after Celery has marked the input ``REVOKED``.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable
from typing import Any

from celery.concurrency.base import BasePool, apply_target
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.utils.log import get_logger
from greenlet import getcurrent

from ..asyncbridge import Abandon, InputGreenlet, finish_bookkeeping
from ..constants import BOOKKEEPING_GRACE_SECONDS
from .time_limits import InputAbandoned
from .wakeup import SlotWakeup

logger = get_logger(__name__)


class _Limits:
    """The time limits of one input, as deadlines on the loop's clock."""

    def __init__(self, loop: asyncio.AbstractEventLoop, soft: float | None, hard: float | None):
        now = loop.time()
        self.soft = now + soft if soft else None
        self.hard = now + hard if hard else None
        self.soft_limit = soft
        self.hard_limit = hard
        #: terminated (``revoke(terminate=True)``): Celery stored the outcome already
        self.terminated = False

    def next_deadline(self) -> float | None:
        soft, hard = self.soft, self.hard
        if soft is None or hard is None:
            return hard if soft is None else soft
        return min(soft, hard)

    def expire(self, now: float) -> BaseException:
        """What to send into the input once its next deadline has passed."""
        if self.hard is not None and now >= self.hard:
            return Abandon(TimeLimitExceeded(self.hard_limit))
        self.soft = None
        return SoftTimeLimitExceeded(self.soft_limit)


class ApplyResult:
    """What ``apply_async`` returns: the input's outcome once its tracer is done.

    Celery keeps only a weak reference to it (for ``terminate``); a lock stands in for a
    ``concurrent.futures.Future``, whose condition variable cost every input more than
    its own ``Request`` did.
    """

    __slots__ = ("__weakref__", "_done", "_value", "_error")

    def __init__(self) -> None:
        self._done = threading.Lock()
        self._done.acquire()
        self._value: Any = None
        self._error: BaseException | None = None

    def set_result(self, value: Any) -> None:
        self._value = value
        self._done.release()

    def set_exception(self, error: BaseException) -> None:
        self._error = error
        self._done.release()

    def wait(self, timeout: float | None = None) -> bool:
        if not self._done.acquire(timeout=-1 if timeout is None else timeout):
            return False
        self._done.release()
        return True

    def get(self, timeout: float | None = None) -> Any:
        if not self.wait(timeout):
            raise TimeoutError(f"the input did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._value

    def terminate(self, signal: Any = None) -> None:
        """Nothing: Celery calls the pool's ``terminate_job`` first, which does it."""


class AsyncioPool(BasePool):
    """Run up to ``limit`` inputs at once as asyncio tasks on one event-loop thread."""

    body_can_be_buffer = True
    signal_safe = False
    task_join_will_block = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._inputs: set[asyncio.Task[None]] = set()
        # Counted from the moment Celery hands an input over, so that a warm
        # shutdown also waits for inputs not yet started on the loop.
        self._accepted = 0
        self._accepted_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self.slots = SlotWakeup()
        #: each running input's task and limits, by the "pid" Celery knows it by
        self._by_pid: dict[int, tuple[asyncio.Task[None], _Limits]] = {}
        #: inputs handed over and not yet started on the loop, in order
        self._arrivals: collections.deque[tuple[ApplyResult, tuple[Any, ...], _Limits]] = (
            collections.deque()
        )
        #: the loop has been asked to start the arrivals (one wake-up for a take's worth)
        self._arrivals_called = False

    def register_with_event_loop(self, loop: Any) -> None:
        self.slots.register(loop)

    def on_start(self) -> None:
        self._thread = threading.Thread(
            target=self._run_loop, name="celery-concurrent-loop", daemon=True
        )
        self._thread.start()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def on_apply(
        self,
        target: Callable[..., Any],
        args: Any = None,
        kwargs: Any = None,
        callback: Callable[..., Any] | None = None,
        accept_callback: Callable[..., Any] | None = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        **_: Any,
    ) -> ApplyResult:
        done = ApplyResult()
        limits = _Limits(self.loop, soft_timeout, timeout)
        with self._accepted_lock:
            self._accepted += 1
            self._idle.clear()
        call = (
            target,
            args,
            kwargs,
            self.slots.wrap(_unless_terminated(callback, limits)),
            self.slots.wrap_accept(accept_callback),
            id(done),  # the input's "pid": terminate_job finds it by this
        )
        self._arrivals.append((done, call, limits))
        if not self._arrivals_called:
            self._arrivals_called = True
            self.loop.call_soon_threadsafe(self._start_arrivals)
        return done

    def _start_arrivals(self) -> None:
        # Cleared before reading: an input handed over from here on calls again.
        self._arrivals_called = False
        arrivals = self._arrivals
        while arrivals:
            self._start_input(*arrivals.popleft())

    def _start_input(self, done: ApplyResult, call: tuple[Any, ...], limits: _Limits) -> None:
        task = self.loop.create_task(self._run_input(done, call, limits))
        self._inputs.add(task)
        self._by_pid[id(done)] = (task, limits)
        task.add_done_callback(lambda t: self._input_finished(t, id(done)))

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """Close the coroutine of the input ``pid`` at its current ``await``."""
        self.loop.call_soon_threadsafe(self._terminate, pid)

    def _terminate(self, pid: int) -> None:
        found = self._by_pid.get(pid)
        if found is not None and not found[1].terminated:
            found[1].terminated = True
            found[0].cancel()

    def _input_finished(self, task: asyncio.Task[None], pid: int) -> None:
        self._inputs.discard(task)
        self._by_pid.pop(pid, None)
        with self._accepted_lock:
            self._accepted -= 1
            if not self._accepted:
                self._idle.set()

    async def _run_input(self, done: ApplyResult, call: tuple[Any, ...], limits: _Limits) -> None:
        gr = InputGreenlet(apply_target, parent=getcurrent())
        try:
            waiting_on = gr.switch(*call)
            while not gr.dead:
                try:
                    resume = await self._wait(waiting_on, limits)
                except asyncio.CancelledError:
                    if not limits.terminated:
                        raise
                    resume = None
                if limits.terminated:
                    resume = Abandon(InputAbandoned())
                waiting_on = gr.switch(resume)
        except BaseException as exc:  # the tracer contains task errors; this is a pool bug
            logger.exception("celery-concurrent: an input's tracer failed")
            done.set_exception(exc)
        else:
            done.set_result(waiting_on)

    async def _wait(self, waiting_on: Any, limits: _Limits) -> BaseException | None:
        """Wait for what the coroutine yielded; return what to send back into it."""
        if waiting_on is None:  # a bare ``yield``: give the loop one turn
            await asyncio.sleep(0)
            return None
        if not asyncio.isfuture(waiting_on):
            return RuntimeError(f"an asyncio coroutine yielded {waiting_on!r}, not a future")
        deadline = limits.next_deadline()
        if deadline is None:
            # Awaited as is: asyncio.wait would cost each await a set, a waiter and a
            # callback per future, more than the rest of the input's bookkeeping. The
            # future was yielded to us, not to a task: take over its blocking flag as
            # a task would, or awaiting it again fails ("await wasn't used with future").
            waiting_on._asyncio_future_blocking = False
            try:
                await waiting_on
            except asyncio.CancelledError as cancelled:
                if not waiting_on.cancelled():  # this task was cancelled, not the future
                    waiting_on.cancel()
                    return cancelled
            except BaseException as error:  # noqa: BLE001 - the future's own outcome
                if not waiting_on.done():  # not awaitable here (a future of another loop)
                    return error
            return None  # the coroutine reads the outcome from the future itself
        try:
            await asyncio.wait((waiting_on,), timeout=max(0.0, deadline - self.loop.time()))
        except asyncio.CancelledError as cancelled:
            waiting_on.cancel()
            return cancelled
        if waiting_on.done():
            return None
        waiting_on.cancel()
        return limits.expire(self.loop.time())

    def on_stop(self) -> None:
        """Warm shutdown: let every input in flight finish, then stop the loop."""
        self._idle.wait()
        self._stop_loop()
        self.slots.close()

    def on_terminate(self) -> None:
        """Cold shutdown: cancel the inputs in flight."""
        for task in list(self._inputs):
            self.loop.call_soon_threadsafe(task.cancel)
        self._stop_loop()
        # A result already on its way to the backend is stored, not cut off at exit.
        if not finish_bookkeeping(BOOKKEEPING_GRACE_SECONDS):
            logger.warning("celery-concurrent: stopped while results were still being stored")

    def _stop_loop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=10)
        self._thread = None

    @property
    def in_flight(self) -> int:
        return self._accepted

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        info.update({"max-concurrency": self.limit, "in-flight": self.in_flight})
        return info


def _unless_terminated(
    callback: Callable[..., Any] | None, limits: _Limits
) -> Callable[..., Any] | None:
    """The request's completion callback, dropped for a terminated input (Celery has
    announced it revoked)."""
    if callback is None:
        return None

    def unless_terminated(*args: Any, **kwargs: Any) -> Any:
        if not limits.terminated:
            return callback(*args, **kwargs)
        return None

    return unless_terminated
