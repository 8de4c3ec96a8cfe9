"""How the test apps' tasks measure themselves: counts kept in the broker's Redis.

``running:<key>`` is how many run now, ``peak:<key>`` the most that ever ran at once and
``done:<key>`` how many finished, so a test reads what really happened, not what the
configuration says.
"""

from __future__ import annotations

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


class Recorder:
    def __init__(self, app: Celery, setting: str = "broker_url") -> None:
        self.app = app
        self.setting = setting
        self._clients: dict[str, redis.Redis] = {}

    def store(self) -> redis.Redis:
        """A client of the app's Redis (the URL may change after import, in tests)."""
        url = self.app.conf[self.setting]
        if url not in self._clients:
            self._clients[url] = redis.Redis.from_url(url)
        return self._clients[url]

    def enter(self, key: str) -> None:
        self.store().eval(_ENTER, 2, f"running:{key}", f"peak:{key}")

    def leave(self, key: str) -> None:
        self.store().decr(f"running:{key}")
        self.store().incr(f"done:{key}")

    def sleep(self, key: str, seconds: float) -> str:
        """Run for ``seconds`` (blocking), counted."""
        self.enter(key)
        try:
            time.sleep(seconds)
        finally:
            self.leave(key)
        return key
