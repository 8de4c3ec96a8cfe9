"""Celery compatibility: the usual project layout, ``shared_task``, revokes, declared queues,
and Celery's own canvas and task options over ``@concurrent`` functions.

Real Redis, real nodes started with the stock ``celery -A ... worker``, real containers.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from celery import chain, chord, group, shared_task
from celery.exceptions import TaskRevokedError

from celery_concurrent import DecoratorOrderError, concurrent

from .support import ROOT, row, wait_for

PROJECT = ROOT / "examples" / "proj"
COMPAT = "tests.apps.compat"


@pytest.fixture
def compat_app(broker_url: str):
    """The compatibility test app, pointed at the private Redis."""
    from .apps import compat

    compat.app.conf.broker_url = broker_url
    compat.app.conf.result_backend = broker_url
    compat.app.set_current()
    return compat


@pytest.fixture
def project(broker_url: str):
    """The example project in the usual layout (``proj/celery.py``, ``proj/tasks.py``)."""
    sys.path.insert(0, str(PROJECT))
    try:
        import proj
        import proj.tasks

        proj.app.conf.broker_url = broker_url
        proj.app.conf.result_backend = broker_url
        proj.app.set_current()
        yield proj
    finally:
        sys.path.remove(str(PROJECT))


def project_env(extra: str = "") -> dict[str, str]:
    return {"PYTHONPATH": f"{PROJECT}:{ROOT}{extra}"}


def start_compat_node(workers, *functions: str):
    names = ",".join(f"{COMPAT}.{f}" for f in functions)
    return workers.start(COMPAT, "-c", "2", "--concurrent-functions", names)


# -- the usual layout and shared_task ------------------------------------------------


def test_usual_project_layout_runs_shared_tasks_in_containers(project, workers):
    node = workers.start("proj", env=project_env())
    add, lookup, ping = project.tasks.add, project.tasks.lookup, project.tasks.ping
    assert add.delay(2, 3).get(timeout=30) == 5
    assert lookup.delay("k").get(timeout=30).startswith("k@proj.tasks.lookup-")
    assert ping.delay().get(timeout=30) == "pong"
    log = workers.log_of(node)
    assert "crashed" not in log, log[-3000:]
    assert row(project, "proj.tasks.add")["crashes"] == 0
    # The keep_warm container of add is the only add container, and it served the input.
    assert row(project, "proj.tasks.add")["containers"] == 1


def test_a_container_gets_the_app_the_node_was_started_with(project, workers):
    # ``-A proj.celery:app`` names the same app another way; the containers use it.
    node = workers.start("proj.celery:app", env=project_env())
    assert project.tasks.add.delay(20, 22).get(timeout=30) == 42
    assert "crashed" not in workers.log_of(node)


def test_django_style_project_runs_autodiscovered_shared_tasks_in_containers(broker_url, workers):
    sys.path.insert(0, str(PROJECT))
    try:
        import djproj
        from djproj.orders.tasks import quote  # as a view would

        djproj.celery_app.conf.broker_url = broker_url
        djproj.celery_app.conf.result_backend = broker_url
        djproj.celery_app.set_current()
        node = workers.start("djproj", env=project_env())
        result = quote.delay(3)
        assert result.get(timeout=30) == 7.99
        stored = djproj.celery_app.AsyncResult(result.id)
        assert stored.worker.startswith("djproj.orders.tasks.quote-"), stored.worker
        assert "crashed" not in workers.log_of(node)
    finally:
        sys.path.remove(str(PROJECT))


def test_concurrent_below_shared_task_makes_a_concurrent_task(compat_app):
    from celery_concurrent import spec_of

    spec = spec_of(compat_app.app.tasks[f"{COMPAT}.total"])
    assert spec is not None and spec.max_inputs == 8
    assert compat_app.total.s([1]).freeze().id  # a real task signature
    assert compat_app.app.amqp.router.route({}, f"{COMPAT}.total")["queue"].name == spec.queue


def test_concurrent_above_shared_task_raises_naming_the_order_that_works():
    with pytest.raises(DecoratorOrderError, match="below @shared_task"):

        @concurrent(allow_concurrent_inputs=4)
        @shared_task
        def wrong_order(x: int) -> int:
            return x


# -- revokes reach containers that start later ---------------------------------------


def node_knows_revoked(app, task_id: str) -> bool:
    replies = app.control.inspect(timeout=0.5).revoked() or {}
    return any(task_id in ids for node, ids in replies.items() if node.startswith("celery@"))


def wait_for_no_container(app_module, name: str) -> None:
    wait_for(lambda: row(app_module, name)["containers"] == 0, 30, what=f"no {name} container")


@pytest.mark.parametrize("function", ["add", "aio_add"])
def test_a_revoke_sent_before_any_container_ran_is_kept_by_the_container(
    compat_app, workers, rds, function
):
    start_compat_node(workers, function)
    name = f"{COMPAT}.{function}"
    task = getattr(compat_app, function)
    wait_for_no_container(compat_app, name)

    by_id = task.s(2, 3)
    revoked = by_id.freeze()
    revoked.revoke()
    wait_for(lambda: node_knows_revoked(compat_app.app, revoked.id), 15, what="node revoke")
    by_id.apply_async()
    # The queue is FIFO: once a later input ran, the revoked one was taken and skipped.
    assert task.delay(1, 1).get(timeout=30) == 2
    with pytest.raises(TaskRevokedError):
        revoked.get(timeout=10)
    assert revoked.state == "REVOKED"
    assert rds.get(f"runs:{function}:{revoked.id}") is None

    # By stamped headers too, with the function scaled back to zero first.
    wait_for_no_container(compat_app, name)
    replies = compat_app.app.control.revoke_by_stamped_headers(
        {"batch": "b-7"}, reply=True, timeout=5
    )
    assert any(node.startswith("celery@") for reply in replies for node in reply), replies
    stamped = task.s(4, 5)
    stamped.stamp(batch="b-7")
    result = stamped.freeze()
    stamped.apply_async()
    assert task.delay(2, 2).get(timeout=30) == 4
    wait_for(lambda: result.state == "REVOKED", 10, what="stamped input revoked")
    assert rds.get(f"runs:{function}:{result.id}") is None


# -- task_create_missing_queues=False, canvas and task options -----------------------


def test_canvas_of_concurrent_functions_on_different_containers(compat_app, workers, rds):
    start_compat_node(workers, "add", "aio_add", "total")
    app = compat_app
    assert app.app.conf.task_create_missing_queues is False
    assert (
        chain(app.add.s(1, 2), app.aio_add.s(10), app.add.s(100)).apply_async().get(timeout=30)
        == 113
    )
    assert group(app.aio_add.s(i, i) for i in range(10)).apply_async().get(timeout=30) == [
        2 * i for i in range(10)
    ]
    header = [app.add.s(i, 1) for i in range(5)] + [app.aio_add.s(i, 2) for i in range(5)]
    assert chord(header)(app.total.s()).get(timeout=30) == sum(range(5)) * 2 + 15
    # Each function ran in its own containers, named for it.
    probe = group(app.add.s(0, 0), app.aio_add.s(0, 0)).apply_async()
    assert probe.get(timeout=30) == [0, 0]
    workers_seen = [app.app.AsyncResult(r.id).worker for r in probe.results]
    assert workers_seen[0].startswith(f"{COMPAT}.add-"), workers_seen
    assert workers_seen[1].startswith(f"{COMPAT}.aio_add-"), workers_seen


def test_celery_task_options_work_through_containers(compat_app, workers, rds):
    start_compat_node(workers, "add", "flaky", "boom", "remember", "fire_and_forget")
    app = compat_app

    # link and link_error
    app.add.apply_async((2, 2), link=app.remember.s("ok")).get(timeout=30)
    failing = app.boom.apply_async(("bad",), link_error=app.remember.si("errback"))
    with pytest.raises(ValueError, match="bad"):
        failing.get(timeout=30)
    remembered = wait_for(lambda: rds.lrange("remembered", 0, -1), 30, what="callbacks")
    wait_for(lambda: len(rds.lrange("remembered", 0, -1)) == 2, 30, what="both callbacks")
    texts = [r.decode() for r in rds.lrange("remembered", 0, -1)]
    assert any("4, 'ok'" in t for t in texts), remembered
    assert any("'errback'" in t for t in texts), texts

    # countdown and eta: not run before their time
    sent = time.time()
    later = app.add.apply_async((3, 3), countdown=1.5)
    at = app.add.apply_async((4, 4), eta=datetime.now(timezone.utc) + timedelta(seconds=1.5))
    assert later.get(timeout=30) == 6 and at.get(timeout=30) == 8
    assert app.app.AsyncResult(later.id).date_done.timestamp() >= sent + 1.4
    assert app.app.AsyncResult(at.id).date_done.timestamp() >= sent + 1.4

    # expires: an input past its expiry is not run, and its state says so
    expired = app.add.apply_async((5, 5), expires=datetime.now(timezone.utc) - timedelta(seconds=1))
    with pytest.raises(TaskRevokedError):
        expired.get(timeout=30)
    assert rds.get(f"runs:add:{expired.id}") is None

    # retry with a countdown: the retries run in the function's containers
    assert app.flaky.delay("f1", 2).get(timeout=30) == 2
    assert int(rds.get("runs:flaky:f1")) == 3

    # ignore_result: it runs, and no result is stored
    ignored = app.fire_and_forget.delay("ig")
    wait_for(lambda: rds.get("runs:fire_and_forget:ig"), 30, what="ignored task ran")
    assert app.app.backend.get(app.app.backend.get_key_for_task(ignored.id)) is None

    # result_extended: the stored result names the task, its arguments and its container
    extended = app.add.delay(7, 8)
    assert extended.get(timeout=30) == 15
    stored = app.app.AsyncResult(extended.id)
    assert stored.name == f"{COMPAT}.add"
    assert list(stored.args) == [7, 8]
    assert stored.worker.startswith(f"{COMPAT}.add-")


# -- which app a container loads -------------------------------------------------------


def test_app_reference_prefers_the_setting_then_the_command_line(compat_app, monkeypatch):
    from celery_concurrent.supervisor.app_ref import APP_ENV, app_reference

    monkeypatch.delenv(APP_ENV, raising=False)
    assert app_reference(compat_app.app, [COMPAT]) == f"{COMPAT}:app"
    monkeypatch.setenv(APP_ENV, COMPAT)
    assert app_reference(compat_app.app, []) == COMPAT
    monkeypatch.setitem(compat_app.app.conf, "concurrent_app", f"{COMPAT}:app")
    assert app_reference(compat_app.app, []) == f"{COMPAT}:app"


def test_app_reference_that_loads_another_app_is_refused_naming_it(compat_app, monkeypatch):
    from celery_concurrent import ConfigurationError
    from celery_concurrent.supervisor.app_ref import APP_ENV, app_reference

    monkeypatch.setenv(APP_ENV, "tests.apps.basic:app")
    with pytest.raises(ConfigurationError, match="-A='tests.apps.basic:app'.*not the node's app"):
        app_reference(compat_app.app, [])


def test_an_app_no_module_holds_is_refused_naming_the_setting(monkeypatch):
    from celery import Celery

    from celery_concurrent import ConfigurationError
    from celery_concurrent.supervisor.app_ref import APP_ENV, app_reference

    monkeypatch.delenv(APP_ENV, raising=False)
    orphan = Celery("orphan", set_as_current=True)  # only Celery's own state holds it
    with pytest.raises(ConfigurationError, match="concurrent_app"):
        app_reference(orphan, [])
