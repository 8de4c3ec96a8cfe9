"""Bad input: malformed messages, bad operator commands, and the security defaults.

A bad message on a function's queue is refused or failed with a clear log line, and the
container goes on serving; a bad operator command is refused with a clear error and
changes nothing. Real brokers and real processes, on Redis and on RabbitMQ.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import psutil
import pytest
from celery import group
from kombu import Connection, Producer

from celery_concurrent import FunctionSpec
from celery_concurrent.redact import mask_urls, safe_url
from celery_concurrent.supervisor.launcher import ContainerLaunch, exec_command, exec_env

from .apps.measure import UNTIL_RELEASED
from .support import RedisServer, descendants, row, running, wait_for

APP = "tests.apps.faults"
ECHO = f"{APP}.echo"
STURDY = f"{APP}.sturdy"


def publish(faults, body: Any, *, task: str = ECHO, **options: Any) -> str:
    """Put one task message (Celery's protocol 2) straight onto the echo queue."""
    task_id = uuid.uuid4().hex
    headers = {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "retries": 0}
    queue = faults.queue("echo")
    with Connection(faults.broker) as conn:
        Producer(conn.channel()).publish(
            body, routing_key=queue, exchange=queue, headers=headers, **options
        )
    return task_id


BAD_MESSAGES = {
    "unknown task": (
        dict(body=[["k", 1], {}, {}], task=f"{APP}.no_such_task", serializer="json"),
        f"Received unregistered task of type '{APP}.no_such_task'",
    ),
    "undecodable body": (
        dict(body=b'[["k", 1], {}, {', content_type="application/json", content_encoding="utf-8"),
        "Can't decode message body",
    ),
    "wrong argument count": (
        dict(body=[["k", 1, 2, 3], {}, {}], serializer="json"),
        "TypeError",
    ),
    "pickle when only JSON is accepted": (
        dict(body=[["k", 1], {}, {}], serializer="pickle"),
        "Refusing to deserialize untrusted content of type pickle",
    ),
}


def test_bad_messages_are_refused_and_the_container_keeps_serving(faults):
    container = faults.start("--concurrent-function", ECHO)
    for i, (what, (message, logged)) in enumerate(BAD_MESSAGES.items()):
        options = dict(message)
        task_id = publish(faults, options.pop("body"), **options)
        # The next good input runs, on the same container.
        assert faults.app.echo.delay("good", i).get(timeout=30) == i, what
        wait_for(lambda text=logged: text in faults.workers.log_of(container), 30, what=what)
        assert container.poll() is None, what
        if what == "wrong argument count":
            failed = faults.app.echo.AsyncResult(task_id)
            with pytest.raises(TypeError):
                failed.get(timeout=30, propagate=True)
    # Nothing is left to come back: no bad message is redelivered for ever.
    assert faults.queue_length("echo") == 0
    if faults.kind == "redis":
        assert not faults.app.recorder.store().hlen("unacked")
    assert faults.completed("good") == len(BAD_MESSAGES)


BOUNDS = ("min_containers", "max_containers", "buffer_containers", "target_inputs")


def bounds_of(faults) -> tuple[Any, ...]:
    current = row(faults.app, ECHO)
    return (*(current[key] for key in BOUNDS), current["scaledown_window"])


BAD_UPDATES = [
    (("--max-containers", "0"), "max_containers=0: must be positive"),
    (("--keep-warm", "9"), "keep_warm=9: must not exceed max_containers=1"),
    (("--target-inputs", "10"), "target_inputs=10: must not exceed max_inputs=4"),
    (("--scaledown-window", "nan"), "scaledown_window=nan: must be a positive, finite number"),
    (("--max-containers", "abc"), "'abc' is not a valid integer"),
    ((), "give at least one bound to change"),
]

BAD_CONTROL_MESSAGES = [
    ({"function": ECHO, "bounds": {"max_containers": "3"}}, "max_containers='3'"),
    ({"function": ECHO, "bounds": [["max_containers", 0]]}, "expected a mapping"),
    ({"function": ["x"], "bounds": {"max_containers": 2}}, "expected a task name"),
    ({"function": ECHO, "bounds": {"pool": "gevent"}}, "cannot be changed at runtime"),
]


def test_bad_operator_input_is_refused_clearly_and_changes_nothing(faults):
    faults.node("echo")
    before = bounds_of(faults)
    # The CLI checks everything before it sends anything.
    for args, says in BAD_UPDATES:
        done = faults.cli("concurrent", "update", ECHO, *args)
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)
    done = faults.cli("concurrent", "update", f"{APP}.nope", "--max-containers", "2")
    assert done.returncode == 2
    assert f"'{APP}.nope' is not a @concurrent function of this app; known functions:" in (
        done.stderr
    )
    # The node checks again what reaches it by remote control, from any client.
    for arguments, says in BAD_CONTROL_MESSAGES:
        replies = faults.app.app.control.broadcast(
            "concurrent_update",
            arguments=arguments,
            destination=[faults.nodename],
            reply=True,
            limit=1,
            timeout=5,
        )
        answer = replies[0][faults.nodename]
        assert says in answer.get("error", ""), (arguments, answer)
    assert bounds_of(faults) == before
    assert faults.app.echo.delay("after", 1).get(timeout=30) == 1


def test_a_node_asked_to_serve_an_unknown_function_stops_with_a_clear_error(faults_on):
    faults = faults_on("redis")
    node = faults.start("--concurrent-functions", f"{APP}.nope", wait_ready=False)
    assert node.wait(30) != 0
    assert f"'{APP}.nope' is not a @concurrent function of this app" in faults.workers.log_of(node)


# --- security defaults ---------------------------------------------------------------------

SECRET = "hunter2-cc-secret"


def test_broker_passwords_never_show_in_logs_status_or_errors(faults_on):
    server = RedisServer(password=SECRET)
    try:
        server.start()
        faults = faults_on("redis", broker=server.url)
        node = faults.node("sturdy")
        group(faults.app.sturdy.s("secret", UNTIL_RELEASED) for _ in range(10)).apply_async()
        store = faults.app.recorder.store()
        wait_for(lambda: running(store, "secret") == 10, 60, what="10 running")
        for proc in [psutil.Process(node.pid), *descendants(node.pid)]:
            assert SECRET not in " ".join(proc.cmdline())
        # What logs connection errors and crashes: a dead container, a broker restart.
        os.kill(row(faults.app, STURDY)["pids"][0], signal.SIGKILL)
        server.restart()
        faults.app.recorder.release("secret")
        wait_for(lambda: faults.completed("secret") == 10, 60, what="10 completed")
        status = faults.cli("concurrent", "status", "--json")
        assert status.returncode == 0 and STURDY in status.stdout
        wrong = server.url.replace(SECRET, f"wrong-{SECRET}")
        denied = faults.cli("concurrent", "status", env={"CC_FAULTS_BROKER": wrong})
        assert denied.returncode != 0 and "cannot use the broker at redis://:**@" in denied.stderr
        faults.workers.stop_all()
        log = faults.workers.log_of(node)
        assert "put 5 unacknowledged input(s)" in log and "the broker is unreachable" in log
        for text in (log, status.stdout, status.stderr, denied.stdout, denied.stderr):
            assert SECRET not in text
    finally:
        server.stop()


def test_an_execd_container_gets_its_broker_url_by_environment_not_command_line():
    spec = FunctionSpec.from_options("proj.green", {"pool": "gevent"})
    launch = ContainerLaunch(
        app_ref="proj:app",
        spec=spec,
        ident="1",
        hostname="host",
        report_address="/tmp/x",
        supervisor_pid=1,
        conf={"broker_url": f"redis://:{SECRET}@h:6379/0", "result_backend": "redis://h/1"},
    )
    assert SECRET not in " ".join(exec_command(launch)) + repr(launch)
    assert exec_env(launch)["CELERY_BROKER_URL"] == f"redis://:{SECRET}@h:6379/0"


def test_urls_in_error_texts_lose_their_passwords():
    text = f"cannot reach amqp://guest:{SECRET}@rabbit:5672// nor redis://:{SECRET}@r:6379/0"
    assert mask_urls(text) == "cannot reach amqp://guest:**@rabbit:5672// nor redis://:**@r:6379/0"
    assert safe_url(f"redis://user:{SECRET}@r:6379/0") == "redis://user:**@r:6379/0"
    assert mask_urls("redis://r:6379/0 is fine") == "redis://r:6379/0 is fine"


KOMBU_CANNOT_READ = [
    b"not json",
    b"[1, 2]",  # JSON, not an envelope
    b'{"body": "e30="}',  # no properties
    b'{"properties": {}}',  # no delivery tag
    # booked by the take (a tag and a delivery_info), taken in by kombu, and then Celery's
    # own report of it fails (it has no body)
    b'{"properties": {"delivery_tag": "bad-tag", "delivery_info":'
    b' {"exchange": "", "routing_key": "x"}}}',
]


def test_a_take_that_holds_messages_kombu_cannot_read_delivers_the_rest(faults_on):
    faults = faults_on("redis")
    queue = faults.queue("echo")
    rds = faults.app.recorder.store()
    # One take gets them all: good inputs before, between and after the bad messages.
    results = [faults.app.echo.delay("good", 0)]
    for raw in KOMBU_CANNOT_READ:
        rds.lpush(queue, raw)
        results.append(faults.app.echo.delay("good", len(results)))
    container = faults.start("--concurrent-function", ECHO)
    # Long before kombu's visibility timeout would restore a message left booked.
    assert [r.get(timeout=30) for r in results] == list(range(len(results)))
    # An idle container's fetch (a BRPOP) gets each alone, and goes on serving.
    for i, raw in enumerate(KOMBU_CANNOT_READ):
        rds.lpush(queue, raw)
        assert faults.app.echo.delay("good", 100 + i).get(timeout=30) == 100 + i
    assert container.poll() is None

    def reported() -> int:
        log = faults.workers.log_of(container)
        return log.count("could not read a message") + log.count("rejected a message")

    wait_for(lambda: reported() >= 2 * len(KOMBU_CANNOT_READ), 30, what="each one logged")
    # Served all along by one consumer: none of them looked like a lost connection.
    assert faults.workers.log_of(container).count("Connected to") == 1
    assert faults.queue_length("echo") == 0
    assert not rds.hlen("unacked"), rds.hkeys("unacked")
