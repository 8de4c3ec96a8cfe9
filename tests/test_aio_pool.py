"""The asyncio pool on its own: inputs as asyncio tasks, what they await, their outcome.

Pure logic, no broker: each input is a coroutine run the way a container runs an
``async def`` task (``run_coroutine`` inside the input's greenlet), and its outcome is
what the pool hands to the completion callback.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from celery_concurrent.asyncbridge import run_coroutine
from celery_concurrent.container.aio_pool import ApplyResult, AsyncioPool


@pytest.fixture
def pool():
    pool = AsyncioPool(limit=1000)
    pool.on_start()
    yield pool
    pool.on_terminate()


def submit(pool: AsyncioPool, coro_fn: Callable[[], Coroutine[Any, Any, Any]]):
    """Hand one input to the pool; return its ApplyResult and its outcome, once done."""
    outcome: dict[str, Any] = {}
    ended = threading.Event()

    def callback(value: Any) -> None:
        outcome["value"] = value
        ended.set()

    result = pool.on_apply(lambda: run_coroutine(coro_fn()), (), {}, callback=callback)
    return result, outcome, ended


def run_one(pool: AsyncioPool, coro_fn) -> Any:
    _, outcome, ended = submit(pool, coro_fn)
    assert ended.wait(10), "the input did not finish"
    return outcome["value"]


def test_an_input_returns_through_its_callback_and_its_apply_result(pool):
    async def work():
        await asyncio.sleep(0.01)
        return 42

    result, outcome, ended = submit(pool, work)
    assert isinstance(result, ApplyResult)
    assert ended.wait(10)
    assert outcome["value"] == 42
    assert result.wait(5) is True
    result.get(5)  # apply_target's own return: the callback had the value


def test_an_apply_result_times_out_while_its_input_runs(pool):
    gate = threading.Event()

    async def blocked():
        await asyncio.get_running_loop().run_in_executor(None, gate.wait, 10)
        return "late"

    result, outcome, ended = submit(pool, blocked)
    assert result.wait(0.05) is False
    with pytest.raises(TimeoutError):
        result.get(0.05)
    gate.set()
    assert ended.wait(10) and outcome["value"] == "late"


def test_what_an_awaited_future_raises_is_raised_in_the_coroutine(pool):
    async def fails():
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, future.set_exception, KeyError("k"))
        try:
            await future
        except KeyError as exc:
            return f"caught {exc!r}"
        return "not raised"

    assert run_one(pool, fails) == "caught KeyError('k')"


def test_a_future_cancelled_by_someone_else_raises_cancelled_in_the_coroutine(pool):
    async def cancelled():
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_later(0.01, future.cancel)
        try:
            await future
        except asyncio.CancelledError:
            return "cancelled, and went on"
        return "not cancelled"

    assert run_one(pool, cancelled) == "cancelled, and went on"


def test_a_future_of_another_loop_is_an_error_in_the_coroutine(pool):
    other = asyncio.new_event_loop()

    async def foreign():
        try:
            await other.create_future()
        except RuntimeError as exc:
            return "refused" if "loop" in str(exc) else str(exc)
        return "awaited"

    try:
        assert run_one(pool, foreign) == "refused"
    finally:
        other.close()


def test_a_terminated_input_is_closed_at_its_await_and_reports_nothing(pool):
    closed = threading.Event()

    async def forever():
        try:
            await asyncio.sleep(60)
        finally:
            closed.set()

    result, outcome, _ = submit(pool, forever)
    pid = id(result)
    for _ in range(200):
        if pid in pool._by_pid:
            break
        threading.Event().wait(0.01)
    pool.terminate_job(pid)
    assert closed.wait(10), "the coroutine was not closed"
    assert result.wait(10)
    assert "value" not in outcome  # Celery has stored REVOKED: no callback


def test_many_inputs_start_in_the_order_they_were_handed_over(pool):
    started: list[int] = []
    done = threading.Semaphore(0)

    def one(i: int):
        async def work():
            started.append(i)
            await asyncio.sleep(0)
            done.release()
            return i

        return work

    for i in range(500):
        pool.on_apply(lambda i=i: run_coroutine(one(i)()), (), {})
    for _ in range(500):
        assert done.acquire(timeout=10)
    assert started == list(range(500))
