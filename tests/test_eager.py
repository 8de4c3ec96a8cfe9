"""An async @concurrent task called eagerly runs to completion, never returning a coroutine."""

from __future__ import annotations

import asyncio

import pytest
from celery import Celery

from celery_concurrent import concurrent


@pytest.fixture
def app():
    app = Celery("eager", broker="memory://", backend="cache+memory://", set_as_current=True)
    return app


def test_apply_runs_an_async_task_to_completion(app):
    @app.task(bind=True)
    @concurrent(max_inputs=10)
    async def ask(self, x):
        await asyncio.sleep(0)
        return x, self.request.id

    result = ask.apply(args=(7,), task_id="tid-1")
    assert result.get() == (7, "tid-1")


def test_task_always_eager_runs_an_async_task_to_completion(app):
    app.conf.task_always_eager = True

    @concurrent(max_inputs=10)
    @app.task
    async def ask(x):
        await asyncio.sleep(0)
        return x * 2

    assert ask.delay(4).get() == 8


def test_calling_the_task_directly_returns_the_result(app):
    @app.task
    @concurrent(max_inputs=10)
    async def ask(x):
        return x + 1

    assert ask(1) == 2


def test_eager_call_from_inside_a_running_loop_does_not_block_it(app):
    @app.task
    @concurrent(max_inputs=10)
    async def ask(x):
        await asyncio.sleep(0.01)
        return x + 1

    async def caller():
        return ask.apply(args=(1,)).get()

    assert asyncio.run(caller()) == 2


def test_async_exception_is_a_failure_when_eager(app):
    @app.task
    @concurrent(max_inputs=10)
    async def boom():
        raise ValueError("nope")

    result = boom.apply()
    assert result.failed()
    assert isinstance(result.result, ValueError)
    assert "nope" in result.traceback


def test_async_task_through_task_options_runs_once_the_app_is_finalized(app):
    # Without a decorator there is nothing to see the task being made; the plugin
    # adopts such tasks when Celery finalizes the app (workers always do).
    from celery_concurrent import install

    install(app)

    @app.task(allow_concurrent_inputs=4, shared=False)
    async def triple(x):
        return x * 3

    app.finalize()
    assert triple.apply(args=(2,)).get() == 6
