"""How the test apps' tasks measure themselves: counts kept in the broker's Redis.

``running:<key>`` is how many run now, ``peak:<key>`` the most that ever ran at once and
``done:<key>`` how many finished, so a test reads what really happened, not what the
configuration says.

An input given ``seconds=UNTIL_RELEASED`` runs until the test calls
:meth:`Recorder.release`: a test that must look at inputs while they are in flight
(how many run at once, what a drain or a kill does to them) holds them there for as
long as it looks, however slowly a loaded machine takes them in.
"""

from __future__ import annotations

import asyncio
import threading
import time

import redis
from celery import Celery

# INCR the running count and raise the recorded peak atomically.
_ENTER = """
local n = redis.call('INCR', KEYS[1])
local peak = tonumber(redis.call('GET', KEYS[2]) or '0')
if n > peak then redis.call('SET', KEYS[2], n) end
return n
"""

#: ``seconds`` of an input that runs until :meth:`Recorder.release` (JSON-serializable)
UNTIL_RELEASED = None
#: a held input ends by itself after this long: a test that failed before releasing it
#: must not leave its inputs running for ever
HOLD_LIMIT_SECONDS = 90.0
#: how often one watcher per key and process looks for the release
RELEASE_POLL_SECONDS = 0.05


class Recorder:
    def __init__(self, app: Celery, setting: str = "broker_url") -> None:
        self.app = app
        self.setting = setting
        self._clients: dict[str, redis.Redis] = {}
        self._lock = threading.Lock()
        # One watcher per key and process (and per event loop): a thousand held inputs
        # cost one Redis read per poll, not a thousand.
        self._released: dict[str, threading.Event] = {}
        self._released_on_loop: dict[tuple[int, str], asyncio.Future[None]] = {}

    def store(self) -> redis.Redis:
        """A client of the app's Redis (the URL may change after import, in tests).

        One per URL and process, made under the lock: a sync container's first inputs
        ask for it at once, each on its thread, and a second client made meanwhile
        would replace the first in the cache; the first one's garbage collection then
        closes its pool (redis-py closes a ``from_url`` client's pool with it) under the
        inputs already counting through it, and fails them.
        """
        url = self.app.conf[self.setting]
        with self._lock:
            client = self._clients.get(url)
            if client is None:
                client = self._clients[url] = redis.Redis.from_url(url)
        return client

    def enter(self, key: str) -> None:
        self.store().eval(_ENTER, 2, f"running:{key}", f"peak:{key}")

    def leave(self, key: str) -> None:
        self.store().decr(f"running:{key}")
        self.store().incr(f"done:{key}")

    def sleep(self, key: str, seconds: float | None) -> str:
        """Run for ``seconds`` (blocking), or until released (``UNTIL_RELEASED``), counted."""
        self.enter(key)
        try:
            if seconds is UNTIL_RELEASED:
                self._release_event(key).wait(HOLD_LIMIT_SECONDS)
            else:
                time.sleep(seconds)
        finally:
            self.leave(key)
        return key

    async def asleep(self, key: str, seconds: float | None) -> str:
        """:meth:`sleep` on the event loop: ``await``\\ s, blocks no thread."""
        self.enter(key)
        try:
            if seconds is UNTIL_RELEASED:
                # shield: a cancelled input (a time limit) leaves the shared watcher running
                await asyncio.shield(self._release_future(key))
            else:
                await asyncio.sleep(seconds)
        finally:
            self.leave(key)
        return key

    def release(self, key: str) -> None:
        """Let every held input of ``key`` finish, the running ones and those still to come."""
        self.store().set(f"released:{key}", 1)

    def _is_released(self, key: str) -> bool:
        return bool(self.store().exists(f"released:{key}"))

    def _release_event(self, key: str) -> threading.Event:
        with self._lock:
            event = self._released.get(key)
            if event is None:
                event = self._released[key] = threading.Event()
                threading.Thread(
                    target=self._watch, args=(key, event), name=f"release-{key}", daemon=True
                ).start()
        return event

    def _watch(self, key: str, event: threading.Event) -> None:
        deadline = time.monotonic() + HOLD_LIMIT_SECONDS
        while not self._is_released(key) and time.monotonic() < deadline:
            time.sleep(RELEASE_POLL_SECONDS)
        event.set()

    def _release_future(self, key: str) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        found = self._released_on_loop.get((id(loop), key))
        if found is None:
            found = self._released_on_loop[(id(loop), key)] = loop.create_task(
                self._watch_on_loop(key)
            )
        return found

    async def _watch_on_loop(self, key: str) -> None:
        deadline = time.monotonic() + HOLD_LIMIT_SECONDS
        while not self._is_released(key) and time.monotonic() < deadline:
            await asyncio.sleep(RELEASE_POLL_SECONDS)
