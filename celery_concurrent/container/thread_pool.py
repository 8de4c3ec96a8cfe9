"""The threads pool of sync containers: N threads, time limits, terminate, prompt refill.

Celery's own threads pool has no time limits and cannot terminate an input. This one
enforces them in the input's own thread (``time_limits.py``), leaving its siblings alone:

- ``soft_time_limit`` raises :class:`~celery.exceptions.SoftTimeLimitExceeded` in the
  function, as prefork does.
- ``time_limit`` fails the input with :class:`~celery.exceptions.TimeLimitExceeded` at
  once, through Celery's own ``Request.on_timeout`` (result stored, ``acks_late`` acked,
  ``task_failure`` sent), then unwinds its thread with
  :class:`~celery_concurrent.container.time_limits.InputAbandoned`. A revoke with
  ``terminate=True`` does the same after Celery has marked the input ``REVOKED``.
- The slot stays taken until the thread ends. A thread still running
  ``OVERRUN_GRACE_SECONDS`` later (in a blocking C call) cannot be stopped: the
  container stops taking inputs, lets the others finish, and exits with
  ``RECYCLE_EXIT_CODE``; its supervisor replaces it.

The threads are daemon threads, so that such a thread never keeps the process alive.
"""

from __future__ import annotations

import functools
import queue
import threading
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.concurrency.base import BasePool, apply_target
from celery.exceptions import SoftTimeLimitExceeded
from celery.utils.log import get_logger
from celery.worker import state as worker_state

from ..constants import OVERRUN_GRACE_SECONDS
from ..contract import RECYCLE_EXIT_CODE
from .time_limits import Deadline, Deadlines, InputAbandoned, raise_in_thread
from .wakeup import SlotWakeup

logger = get_logger(__name__)

#: the input this pool thread runs (``_Input.run``)
_current = threading.local()


def free_when_returned(run: Callable[..., Any]) -> Callable[..., Any]:
    """A task's ``run`` that frees its input's slot as soon as it returns, before Celery's
    tracer stores the outcome (a result backend's round trip, signals, the ack), so that
    the next input is fetched meanwhile. Outside a pool thread it only calls ``run``."""

    @functools.wraps(run)
    def run_then_free(*args: Any, **kwargs: Any) -> Any:
        try:
            return run(*args, **kwargs)
        finally:
            job = getattr(_current, "job", None)
            if job is not None:
                job.function_returned()

    return run_then_free


class _Input:
    """One input on the pool: its thread while it runs, its limits, its outcome.

    It is also what ``apply_async`` returns (Celery's ``Request`` keeps a weak reference
    and calls :meth:`terminate` on it); the pool holds it until its thread is done.
    """

    def __init__(
        self,
        pool: ThreadPool,
        call: tuple[Any, ...],
        timeout_callback: Callable[[bool, float], Any] | None,
        soft: float | None,
        hard: float | None,
    ) -> None:
        self.pool = pool
        self.target, self.args, self.kwargs, self.callback, self.accept_callback = call
        #: the callback the pool thread calls once: the request's, then the slot is free
        self._done: Callable[..., Any] | None = pool.slots.wrap(self._deliver)
        self.timeout_callback = timeout_callback
        self.soft = soft
        self.hard = hard
        self._lock = threading.Lock()
        #: the thread that runs the function, while an exception may be raised into it
        self._ident: int | None = None
        self._raised = False
        #: the function returned and its slot counts as free (``SlotWakeup.finishing``)
        self._returned = False
        #: the outcome was settled without the thread (hard limit, terminate): the
        #: thread's own outcome is dropped
        self.settled = False
        self._deadlines: list[Deadline] = []
        self.ended = threading.Event()

    # -- what Celery calls ---------------------------------------------------------------

    def get(self, timeout: float | None = None) -> None:
        self.ended.wait(timeout)

    def wait(self, timeout: float | None = None) -> None:
        self.ended.wait(timeout)

    def terminate(self, signal: Any = None) -> None:
        """Stop the input (``revoke(terminate=True)``); Celery stores the outcome."""
        with self._lock:
            if self.settled or self.ended.is_set():
                return
            self.settled = True
            self._raise(InputAbandoned)
        self.pool.overran(self, "was terminated")

    # -- on the pool's thread ------------------------------------------------------------

    def run(self) -> None:
        ident = threading.get_ident()
        self.pool.running[ident] = self
        _current.job = self
        try:
            apply_target(
                self._call, self.args, self.kwargs, self._finished, self.accept_callback, pid=ident
            )
        except BaseException:  # noqa: BLE001 - the tracer contains task errors
            logger.exception("celery-concurrent: an input's tracer failed")
            self._finished((True, ExceptionInfo(), 0.0))
        finally:
            _current.job = None
            self.pool.running.pop(ident, None)
            self.ended.set()
            self.pool.input_ended(self)

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        self._open()
        try:
            return self.target(*args, **kwargs)
        finally:
            # An exception raised into the thread just as the function returned must not
            # escape into the tracer's bookkeeping, nor reach the thread's next input.
            while True:
                try:
                    self._close()
                    break
                except BaseException:  # noqa: BLE001, S112 - it arrived late; nothing to do
                    continue
            self.function_returned()

    def function_returned(self) -> None:
        """The slot is free for the next input while the tracer stores this outcome."""
        if not self._returned and not self.settled:
            self._returned = True
            self.pool.slots.function_returned()

    def _open(self) -> None:
        with self._lock:
            if self.settled:  # terminated before it started
                raise InputAbandoned
            self._ident = threading.get_ident()
            deadlines = self.pool.deadlines
            if self.soft:
                self._deadlines.append(deadlines.call_later(self.soft, self._soft_limit))
            if self.hard:
                self._deadlines.append(deadlines.call_later(self.hard, self._hard_limit))

    def _close(self) -> None:
        with self._lock:
            for deadline in self._deadlines:
                deadline.cancel()
            if self._raised and self._ident is not None:
                raise_in_thread(self._ident, None)  # what has not been raised yet
            self._ident = None

    def _raise(self, exc_type: type[BaseException]) -> bool:
        """Raise ``exc_type`` in the function's thread; call with ``_lock`` held."""
        if self._ident is None:
            return False
        self._raised = True
        return raise_in_thread(self._ident, exc_type)

    def _finished(self, result: Any) -> None:
        done, self._done = self._done, None
        if self._returned:
            # Before the callback takes the request out of the reserved ones, so that
            # the container never counts a free slot twice.
            self._returned = False
            self.pool.slots.outcome_stored()
        if done is not None:
            done(result)

    def _deliver(self, result: Any) -> None:
        if not self.settled and self.callback is not None:
            self.callback(result)

    # -- on the timer thread -------------------------------------------------------------

    def _soft_limit(self) -> None:
        with self._lock:
            if self.settled or not self._raise(SoftTimeLimitExceeded):
                return
        if self.timeout_callback is not None:
            self.timeout_callback(True, self.soft or 0.0)

    def _hard_limit(self) -> None:
        with self._lock:
            if self.settled or self._ident is None:
                return
            self.settled = True
        try:
            if self.timeout_callback is not None:
                self.timeout_callback(False, self.hard or 0.0)
        finally:
            with self._lock:
                self._raise(InputAbandoned)
            self.pool.overran(self, f"overran its time_limit ({self.hard or 0.0:g}s)")


class ThreadPool(BasePool):
    """Run up to ``limit`` inputs at once on threads, with their time limits."""

    body_can_be_buffer = True
    signal_safe = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = SlotWakeup()
        self.deadlines = Deadlines()
        #: the input each pool thread runs, by thread ident (the "pid" Celery knows)
        self.running: dict[int, _Input] = {}
        self._queue: queue.SimpleQueue[_Input | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._lock = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._inputs: set[_Input] = set()
        #: settled inputs whose threads still run: their slots are not free
        self._overrunning: set[_Input] = set()
        #: threads that could not be stopped: no longer counted as the pool's
        self._stuck = 0
        self._stuck_inputs: set[_Input] = set()
        self.recycling = False

    def register_with_event_loop(self, loop: Any) -> None:
        self.slots.register(loop)

    def on_apply(
        self,
        target: Any,
        args: Any = None,
        kwargs: Any = None,
        callback: Any = None,
        accept_callback: Any = None,
        timeout_callback: Any = None,
        timeout: float | None = None,
        soft_timeout: float | None = None,
        **_: Any,
    ) -> _Input:
        job = _Input(
            self,
            (target, args, kwargs, callback, self.slots.wrap_accept(accept_callback)),
            timeout_callback,
            soft_timeout,
            timeout,
        )
        with self._lock:
            self._inputs.add(job)
        self._queue.put(job)
        if not self._idle.acquire(blocking=False):
            self._add_thread()
        return job

    def _add_thread(self) -> None:
        with self._lock:
            # An input whose function returned still stores its outcome on its thread:
            # the next input gets a thread of its own meanwhile.
            if len(self._threads) - self._stuck >= self.limit + self.slots.finishing:
                return
            thread = threading.Thread(
                target=self._work,
                name=f"celery-concurrent-input-{len(self._threads) + 1}",
                daemon=True,
            )
            self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.run()
            self._idle.release()

    def input_ended(self, job: _Input) -> None:
        with self._lock:
            self._inputs.discard(job)
            self._overrunning.discard(job)
            self._lock.notify_all()

    def overran(self, job: _Input, why: str) -> None:
        """``job`` is settled but its thread still runs: recycle if it does not end soon."""
        with self._lock:
            if job.ended.is_set():
                return
            self._overrunning.add(job)
        self.deadlines.call_later(OVERRUN_GRACE_SECONDS, lambda: self._check_overrun(job, why))

    def _check_overrun(self, job: _Input, why: str) -> None:
        with self._lock:
            if job.ended.is_set():
                return
            self._stuck += 1
            first = not self.recycling
            self.recycling = True
            self._stuck_inputs.add(job)
            self._lock.notify_all()
        logger.warning(
            "celery-concurrent: an input %s and its thread is still running %gs later "
            "(a blocking call); recycling the container: it takes no more inputs, lets "
            "the others finish and exits",
            why,
            OVERRUN_GRACE_SECONDS,
        )
        if first and worker_state.should_stop is None:
            # Celery's warm shutdown, as from a SIGTERM, but with the recycle's status.
            worker_state.should_stop = RECYCLE_EXIT_CODE
        self.slots.notify()
        self._add_thread()  # inputs already handed over still get a thread

    @property
    def num_processes(self) -> int:
        return max(0, self.limit - len(self._overrunning))

    def terminate_job(self, pid: int, signal: Any = None) -> None:
        """Stop the input that runs on thread ``pid`` (every signal means terminate)."""
        job = self.running.get(pid)
        if job is not None:
            job.terminate(signal)

    def on_stop(self) -> None:
        """Warm shutdown: let every input finish, except threads that cannot be stopped."""
        with self._lock:
            while any(not job.settled for job in self._inputs) or (
                self._overrunning - self._stuck_inputs
            ):
                self._lock.wait(0.1)
            threads = list(self._threads)
        self._stop_threads(threads)

    def on_terminate(self) -> None:
        """Cold shutdown: running inputs are left to die with the process."""
        self._stop_threads([])

    def _stop_threads(self, join: list[threading.Thread]) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for thread in join:
            if thread.ident not in self.running:
                thread.join(1.0)
        self.deadlines.close()
        self.slots.close()

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        info.update({"max-concurrency": self.limit, "threads": len(self._threads)})
        return info
