"""The app the cluster tests run on several nodes: functions whose inputs measure the bounds.

Each input of ``limited`` marks its container busy in ``active`` (container pid -> inputs
running) and raises ``peak`` to the number of containers running inputs at that moment,
in one Lua call: the bound is measured by the inputs themselves, over every node. Every
input counts its runs (``runs:<task id>``) and adds its id to ``completed`` when it
finishes, so a test sees an input lost and one run twice.
"""

from __future__ import annotations

import os
import threading
import time

import redis
from celery import Celery, Task

from celery_concurrent import concurrent

app = Celery("cluster", broker=os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/15"))
app.conf.update(
    result_backend=app.conf.broker_url,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=600,
)
if os.environ.get("CC_COORDINATION_URL"):
    app.conf.concurrent_coordination_url = os.environ["CC_COORDINATION_URL"]
if os.environ.get("CC_VISIBILITY_TIMEOUT"):
    app.conf.broker_transport_options = {
        "visibility_timeout": float(os.environ["CC_VISIBILITY_TIMEOUT"]),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }

_clients: dict[str, redis.Redis] = {}
_lock = threading.Lock()

#: raise ``peak`` to the containers running inputs now; KEYS: active, peak; ARGV: pid, +-1
_MARK = """
redis.call('HINCRBY', KEYS[1], ARGV[1], tonumber(ARGV[2]))
local busy = 0
for _, n in ipairs(redis.call('HVALS', KEYS[1])) do
  if tonumber(n) > 0 then busy = busy + 1 end
end
if busy > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], busy) end
return busy
"""


def store() -> redis.Redis:
    """Where the inputs record what they measure: the broker, unless a test that cuts a
    node off from the broker gives a direct address (``CC_STORE_URL``)."""
    url = os.environ.get("CC_STORE_URL") or app.conf.broker_url
    # Under a lock: a second client made by another input's thread would replace the
    # first, whose garbage collection closes the pool under the inputs using it.
    with _lock:
        if url not in _clients:
            _clients[url] = redis.Redis.from_url(url)
        return _clients[url]


def _mark(delta: int) -> None:
    store().eval(_MARK, 2, "active", "peak", os.getpid(), delta)


def _run(task: Task, seconds: float) -> str:
    store().pipeline().incr(f"runs:{task.request.id}").sadd("pids", os.getpid()).execute()
    _mark(+1)
    try:
        time.sleep(seconds)
    finally:
        _mark(-1)
    store().sadd("completed", task.request.id)
    return task.request.id


@app.task(bind=True, acks_late=True)
@concurrent(max_inputs=2, max_containers=3, scaledown_window=30)
def limited(self: Task, seconds: float) -> str:
    return _run(self, seconds)


@app.task(bind=True, acks_late=True)
@concurrent(max_inputs=20, max_containers=3, min_containers=1, scaledown_window=2)
def warm(self: Task, seconds: float = 0.0) -> str:
    return _run(self, seconds)
