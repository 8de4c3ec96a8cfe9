"""Containers and the supervisor on RabbitMQ (skipped without one, failing under CI)."""

from __future__ import annotations

import time

from celery import group

from .support import wait_for


def test_container_holds_no_message_beyond_its_slots_on_rabbitmq(rabbitmq):
    rabbitmq.start("--concurrent-function", rabbitmq.app.slow.name)
    result = group(rabbitmq.app.slow.s("r", 2.0) for _ in range(30)).apply_async()
    time.sleep(1.0)
    # Five run, none waits in the container: the other 25 are the broker's backlog.
    assert rabbitmq.queue_length(rabbitmq.queues[0]) == 25
    assert result.get(timeout=60) == ["r"] * 30
    assert int(rabbitmq.app.recorder.store().get("peak:r")) == 5


def test_async_container_on_rabbitmq(rabbitmq):
    rabbitmq.start("--concurrent-function", rabbitmq.app.aslow.name)
    result = group(rabbitmq.app.aslow.s("ra") for _ in range(400)).apply_async()
    assert result.get(timeout=60) == ["ra"] * 400
    assert int(rabbitmq.app.recorder.store().get("peak:ra")) == 200


def test_supervisor_scales_on_the_rabbitmq_backlog(rabbitmq):
    rabbitmq.start("-c", "1", "--concurrent-functions", rabbitmq.app.slow.name)
    store = rabbitmq.app.recorder.store()
    result = group(rabbitmq.app.slow.s("rs", 1.0) for _ in range(45)).apply_async()
    # max_inputs=5, max_containers=3: 15 at once once it has scaled up.
    wait_for(lambda: int(store.get("peak:rs") or 0) == 15, 10, what="three containers busy")
    assert result.get(timeout=60) == ["rs"] * 45
    assert int(store.get("peak:rs")) == 15
