"""An asyncio container stores its inputs' results off the event loop.

Pure logic, no processes: a real event loop drives an input's greenlet the way the
asyncio pool does (each future the greenlet hands over is awaited on the loop).
"""

from __future__ import annotations

import asyncio
import threading
import time

from greenlet import getcurrent

from celery_concurrent.asyncbridge import Bookkeeping, InputGreenlet, off_the_loop


async def as_an_input(fn):
    """What ``AsyncioPool._run_input`` does with an input's greenlet, without limits."""
    gr = InputGreenlet(fn, parent=getcurrent())
    waiting_on = gr.switch()
    while not gr.dead:
        await asyncio.wait((waiting_on,))
        waiting_on = gr.switch(None)
    return waiting_on


def test_a_store_from_an_input_runs_on_a_thread_while_the_loop_goes_on():
    seen: dict[str, object] = {}

    def mark_as_done(task_id: str, result: int) -> str:
        seen["thread"] = threading.current_thread().name
        time.sleep(0.3)  # a slow backend's round trip
        return f"{task_id}={result}"

    store = off_the_loop(mark_as_done)
    ticks: list[float] = []

    async def main() -> str:
        async def tick() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(tick())
        began = time.monotonic()
        stored = await as_an_input(lambda: store("t1", 7))
        seen["took"] = time.monotonic() - began
        ticker.cancel()
        return stored

    assert asyncio.run(main()) == "t1=7"
    assert str(seen["thread"]).startswith("celery-concurrent-bookkeeping")
    # The loop kept running other work while the store waited: it ticked throughout.
    assert len(ticks) >= 5, ticks


def test_a_store_raises_in_the_input_as_it_would_inline():
    def mark_as_done() -> None:
        raise ConnectionError("backend down")

    store = off_the_loop(mark_as_done)

    async def main() -> str:
        try:
            await as_an_input(store)
        except ConnectionError as exc:
            return str(exc)
        return "no error"

    assert asyncio.run(main()) == "backend down"


def test_outside_an_input_the_store_is_called_as_is():
    calls: list[str] = []
    store = off_the_loop(lambda: calls.append(threading.current_thread().name) or "ok")
    assert store() == "ok"
    assert calls == [threading.current_thread().name]


def test_every_call_settles_its_own_future_however_the_outcomes_are_batched():
    bookkeeping = Bookkeeping(4, "test-bookkeeping")

    def call(i: int):
        def run() -> int:
            if i % 7 == 0:
                raise ValueError(i)
            time.sleep(0.001 * (i % 3))
            return i * i

        return run

    async def main() -> list[object]:
        loop = asyncio.get_running_loop()
        futures = [bookkeeping.run(loop, call(i)) for i in range(300)]
        return await asyncio.gather(*futures, return_exceptions=True)

    outcomes = asyncio.run(main())
    for i, outcome in enumerate(outcomes):
        if i % 7 == 0:
            assert isinstance(outcome, ValueError) and outcome.args == (i,)
        else:
            assert outcome == i * i
    assert len(bookkeeping._threads) == 4


def test_a_cancelled_wait_and_a_closed_loop_leave_the_threads_serving():
    bookkeeping = Bookkeeping(1, "test-bookkeeping")
    release = threading.Event()

    async def cancel_one() -> None:
        loop = asyncio.get_running_loop()
        future = bookkeeping.run(loop, lambda: release.wait(10))
        future.cancel()
        release.set()
        # The outcome of the cancelled wait arrives and is dropped; the next call works.
        assert await bookkeeping.run(loop, lambda: "next") == "next"

    asyncio.run(cancel_one())

    closed = asyncio.new_event_loop()
    gate = threading.Event()
    bookkeeping.run(closed, lambda: gate.wait(10))
    closed.close()
    gate.set()  # its outcome has no loop to go back to

    async def after() -> str:
        return await bookkeeping.run(asyncio.get_running_loop(), lambda: "still serving")

    assert asyncio.run(after()) == "still serving"


def test_a_stopping_process_can_wait_for_the_calls_in_flight():
    bookkeeping = Bookkeeping(2, "test-bookkeeping")
    stored: list[str] = []
    gate = threading.Event()

    def slow_store() -> None:
        gate.wait(10)
        time.sleep(0.05)
        stored.append("stored")

    loop = asyncio.new_event_loop()
    try:
        bookkeeping.run(loop, slow_store)
        assert bookkeeping.wait_idle(0.05) is False  # still storing
        gate.set()
        assert bookkeeping.wait_idle(10) is True
        assert stored == ["stored"]
        assert bookkeeping.wait_idle(0) is True  # nothing in flight
    finally:
        loop.close()
