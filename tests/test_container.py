"""A container: a real ``celery worker`` process that runs one function's inputs at once.

Every test here runs real worker subprocesses against a private Redis server.
"""

from __future__ import annotations

import time

import pytest
from celery import group
from celery.exceptions import TaskRevokedError, TimeLimitExceeded

from .support import thread_count

SLEEPY = "tests.apps.basic.sleepy"
ASYNC_SLEEPY = "tests.apps.basic.async_sleepy"
BEHAVIOUR = "tests.apps.basic.async_behaviour"


def container(workers, name, *args):
    return workers.start("tests.apps.basic", "--concurrent-function", name, *args)


def test_sync_container_runs_n_inputs_at_once_on_threads(basic_app, workers, rds):
    container(workers, SLEEPY)
    started = time.monotonic()
    result = group(basic_app.sleepy.s("k", 1.0) for _ in range(200)).apply_async()
    assert result.get(timeout=60) == ["k"] * 200
    elapsed = time.monotonic() - started
    # 200 inputs of one second, 50 at a time: four waves.
    assert elapsed < 8, elapsed
    assert int(rds.get("peak:k")) == 50


def test_container_holds_no_message_beyond_its_slots(basic_app, workers, rds):
    container(workers, SLEEPY)
    queue = basic_app.sleepy.name and "concurrent.tests.apps.basic.sleepy"
    group(basic_app.sleepy.s("hold", 2.0) for _ in range(120)).apply_async()
    deadline = time.monotonic() + 10
    while int(rds.get("running:hold") or 0) < 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    # 50 running, none waiting in the container: the rest is the broker's backlog.
    assert rds.llen(queue) == 70
    assert rds.hlen("unacked") <= 50


def test_async_container_runs_thousands_of_inputs_on_one_loop_thread(basic_app, workers, rds):
    proc = container(workers, ASYNC_SLEEPY)
    started = time.monotonic()
    result = group(basic_app.async_sleepy.s("a", 1.0) for _ in range(4000)).apply_async()
    most_threads = 0
    while not result.ready():
        most_threads = max(most_threads, thread_count(proc.pid))
        if time.monotonic() - started > 60:
            pytest.fail("4000 async inputs did not finish within 60 s")
        time.sleep(0.05)
    elapsed = time.monotonic() - started
    assert result.get(timeout=5) == ["a"] * 4000
    assert elapsed < 15, elapsed
    assert most_threads < 30, most_threads
    assert 1000 <= int(rds.get("peak:a")) <= 2000


def test_gevent_container_runs_inputs_on_greenlets(basic_app, workers, rds):
    workers.start(
        "tests.apps.basic", "-P", "gevent", "--concurrent-function", "tests.apps.basic.green_sleepy"
    )
    result = group(basic_app.green_sleepy.s("g", 0.5) for _ in range(40)).apply_async()
    assert result.get(timeout=30) == ["g"] * 40
    assert int(rds.get("peak:g")) == 10


def test_gevent_container_without_gevent_flag_fails_clearly(workers):
    proc = workers.start(
        "tests.apps.basic",
        "--concurrent-function",
        "tests.apps.basic.green_sleepy",
        wait_ready=False,
    )
    proc.wait(30)
    assert proc.returncode != 0
    assert "-P gevent" in workers.log_of(proc)


def test_unknown_function_name_is_a_clear_error(workers):
    proc = workers.start(
        "tests.apps.basic", "--concurrent-function", "tests.apps.basic.nope", wait_ready=False
    )
    proc.wait(30)
    assert proc.returncode != 0
    assert "'tests.apps.basic.nope' is not a @concurrent function" in workers.log_of(proc)


class TestAsyncInputsKeepCeleryBehaviour:
    @pytest.fixture
    def behaviour(self, basic_app, workers):
        container(workers, BEHAVIOUR)
        return basic_app.async_behaviour

    def test_bound_request_is_the_inputs_own(self, behaviour):
        # Ten at once on one loop: each coroutine still sees its own request.
        results = [behaviour.delay("request", 0.05 * (i % 3)) for i in range(10)]
        for sent in results:
            seen = sent.get(timeout=20)
            assert seen["id"] == sent.id
            assert seen["args"][0] == "request"
            assert seen["hostname"].startswith(BEHAVIOUR)

    def test_result_and_state_are_stored(self, behaviour):
        sent = behaviour.delay("echo")
        assert sent.get(timeout=20) == "echo"
        assert sent.state == "SUCCESS"

    def test_exception_is_a_failure_with_its_traceback(self, behaviour):
        sent = behaviour.delay("fail")
        with pytest.raises(KeyError):
            sent.get(timeout=20)
        assert sent.state == "FAILURE"
        assert "async boom" in sent.traceback
        assert "async_behaviour" in sent.traceback

    def test_retry_works_from_a_coroutine(self, behaviour):
        assert behaviour.delay("retry").get(timeout=20) == 2

    def test_task_signals_fire(self, behaviour, rds):
        ok = behaviour.delay("echo")
        ok.get(timeout=20)
        bad = behaviour.delay("fail")
        with pytest.raises(KeyError):
            bad.get(timeout=20)
        time.sleep(0.2)
        assert rds.lrange(f"signals:{ok.id}", 0, -1) == [
            b"task_prerun",
            b"task_success",
            b"task_postrun",
        ]
        assert rds.lrange(f"signals:{bad.id}", 0, -1) == [
            b"task_prerun",
            b"task_failure",
            b"task_postrun",
        ]

    def test_revoked_input_does_not_run(self, behaviour, basic_app):
        sent = behaviour.apply_async(("echo",), countdown=1)
        basic_app.app.control.revoke(sent.id)
        with pytest.raises(TaskRevokedError):
            sent.get(timeout=10)
        assert sent.state == "REVOKED"


def test_hard_time_limit_cancels_the_coroutine(basic_app, workers):
    container(workers, "tests.apps.basic.async_hard_limited")
    sent = basic_app.async_hard_limited.delay(5)
    started = time.monotonic()
    with pytest.raises(TimeLimitExceeded):
        sent.get(timeout=20)
    assert time.monotonic() - started < 3
    assert basic_app.async_hard_limited.delay(0.01).get(timeout=20) == "finished"


def test_soft_time_limit_is_raised_inside_the_coroutine(basic_app, workers):
    container(workers, "tests.apps.basic.async_soft_limited")
    assert basic_app.async_soft_limited.delay(5).get(timeout=20) == "soft limit caught"
    assert basic_app.async_soft_limited.delay(0.01).get(timeout=20) == "finished"


def test_plain_worker_runs_concurrent_async_tasks_to_completion(basic_app, workers):
    workers.start(
        "tests.apps.basic",
        "-P",
        "threads",
        "-c",
        "2",
        "-Q",
        "celery,concurrent.tests.apps.basic.async_behaviour",
    )
    assert basic_app.async_behaviour.delay("echo").get(timeout=20) == "echo"
