"""Routing: each @concurrent function's inputs land on its own queue, on a real Redis."""

from __future__ import annotations

import pytest
from celery import Celery

from celery_concurrent import concurrent, install


@pytest.fixture
def make_app(broker_url):
    def make(**conf) -> Celery:
        app = Celery("routed", broker=broker_url, set_as_current=True)
        app.conf.update(conf)
        return app

    return make


def declare_and_count(app, queue_name: str) -> int:
    with app.connection_for_write() as conn:
        return conn.default_channel.client.llen(queue_name)


def test_every_send_path_lands_on_the_function_queue(make_app, rds):
    app = make_app()

    @app.task
    @concurrent(allow_concurrent_inputs=5)
    def fetch(url):
        return url

    fetch.delay("a")
    fetch.apply_async(("b",))
    app.send_task(fetch.name, ("c",))
    assert rds.llen(f"concurrent.{fetch.name}") == 3
    assert rds.llen("celery") == 0


def test_send_task_by_name_routes_before_the_task_is_ever_touched(make_app, rds):
    app = make_app()

    @app.task(name="lazy.fetch")
    @concurrent(max_inputs=2)
    def fetch(url):
        return url

    app.send_task("lazy.fetch", ("x",))
    assert rds.llen("concurrent.lazy.fetch") == 1


def test_decorator_above_app_task_routes_too(make_app, rds):
    app = make_app()

    @concurrent(max_inputs=3, queue="above-q")
    @app.task
    def above(x):
        return x

    above.delay(1)
    app.send_task(above.name, (2,))
    assert rds.llen("above-q") == 2


def test_task_options_route_once_installed(make_app, rds):
    app = make_app()
    install(app)

    @app.task(allow_concurrent_inputs=10, concurrency_limit=3)
    def optioned(x):
        return x

    optioned.delay(1)
    app.send_task(optioned.name, (2,))
    assert rds.llen(f"concurrent.{optioned.name}") == 2


def test_plain_tasks_keep_the_default_queue(make_app, rds):
    app = make_app()

    @app.task
    @concurrent(max_inputs=2)
    def decorated():
        return 1

    @app.task
    def plain():
        return 2

    plain.delay()
    app.send_task(plain.name)
    assert rds.llen("celery") == 2
    assert rds.llen(f"concurrent.{decorated.name}") == 0


def test_routes_the_user_already_set_are_left_alone(make_app, rds):
    app = make_app(task_routes={"mine.*": {"queue": "user-q"}})

    @app.task(name="mine.decorated")
    @concurrent(max_inputs=2)
    def decorated():
        return 1

    @app.task(name="mine.plain")
    def plain():
        return 2

    @app.task(name="other.decorated")
    @concurrent(max_inputs=2)
    def other():
        return 3

    decorated.delay()
    plain.delay()
    other.delay()
    assert rds.llen("user-q") == 2
    assert rds.llen("concurrent.other.decorated") == 1


def test_an_explicit_queue_at_send_time_wins(make_app, rds):
    app = make_app()

    @app.task
    @concurrent(max_inputs=2)
    def fetch():
        return 1

    fetch.apply_async(queue="explicit-q")
    assert rds.llen("explicit-q") == 1


def test_install_is_idempotent(make_app):
    app = make_app()
    install(app)
    install(app)

    @app.task
    @concurrent(max_inputs=2)
    def fetch():
        return 1

    install(app)
    routers = [r for r in app.conf.task_routes if type(r).__name__ == "ConcurrentRouter"]
    assert len(routers) == 1
    options = [o for o in app.user_options["worker"] if "--concurrent-function" in o.opts]
    assert len(options) == 1
