"""Where a cluster's nodes meet: the Redis that holds the container leases.

No coordinator process and no new server: the state lives in the user's Redis, found
in this order:

1. the ``concurrent_coordination_url`` setting;
2. the broker, when it is Redis;
3. the result backend, when it is Redis.

With none of them (RabbitMQ and an RPC or database result backend) the bounds hold per
node, and the node says so once at start. The broker's held messages (kombu's
``unacked`` keys) are always renewed in the broker itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery import Celery

from .brokers import is_redis
from .constants import COORDINATION_SOCKET_TIMEOUT, DEFAULT_SCOPE, SCOPES
from .errors import ConfigurationError
from .leases import DEFAULT_PREFIX, DEFAULT_TTL_S
from .redact import mask_urls

if TYPE_CHECKING:
    import redis

#: the setting that names the coordination Redis
URL_SETTING = "concurrent_coordination_url"
#: the setting that chooses the scope (``--concurrent-scope`` overrides it)
SCOPE_SETTING = "concurrent_scope"
#: the setting that changes a lease's TTL (seconds; see ``leases`` for the trade-off)
TTL_SETTING = "concurrent_lease_ttl"
#: URL schemes redis-py opens by itself
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class CoordinationStore:
    """The Redis that holds the leases, and where its URL came from."""

    #: the setting it came from: ``concurrent_coordination_url``, ``broker_url`` or
    #: ``result_backend``
    source: str
    url: str
    #: the first part of every key (the broker's ``global_keyprefix`` comes first)
    prefix: str = DEFAULT_PREFIX

    def client(self) -> redis.Redis:
        """A plain client (no key prefixing) whose calls fail within a second.

        No retries: redis-py's default retries a refused connection with back-off for
        seconds, and a supervisor's turn must not stall while Redis is away (the next
        turn asks again).
        """
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis.from_url(
            self.url,
            socket_timeout=COORDINATION_SOCKET_TIMEOUT,
            socket_connect_timeout=COORDINATION_SOCKET_TIMEOUT,
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
        )


def coordination_store(app: Celery) -> CoordinationStore | None:
    """The app's coordination Redis, or ``None`` when it has none."""
    conf = app.conf
    url = conf.get(URL_SETTING)
    if url:
        if not _opens(url):
            raise ConfigurationError(
                URL_SETTING, mask_urls(url), "must be a redis://, rediss:// or unix:// URL"
            )
        return CoordinationStore(URL_SETTING, url)
    broker = conf.broker_url or ""
    if is_redis(app) and _opens(broker):
        options = conf.broker_transport_options or {}
        prefix = (options.get("global_keyprefix") or "") + DEFAULT_PREFIX
        return CoordinationStore("broker_url", broker, prefix)
    backend = conf.result_backend
    if isinstance(backend, str) and _opens(backend):
        return CoordinationStore("result_backend", backend)
    return None


def configured_scope(app: Celery, given: str | None) -> str:
    """The scope asked for on the command line, else in the settings, else the default."""
    scope = given or app.conf.get(SCOPE_SETTING) or DEFAULT_SCOPE
    if scope not in SCOPES:
        raise ConfigurationError(
            "--concurrent-scope" if given else SCOPE_SETTING, scope, f"must be one of {SCOPES}"
        )
    return str(scope)


def lease_ttl(app: Celery) -> float:
    """Seconds a lease lives unless renewed: the ``concurrent_lease_ttl`` setting."""
    value = app.conf.get(TTL_SETTING)
    if value is None:
        return DEFAULT_TTL_S
    try:
        ttl = float(value)
    except (TypeError, ValueError):
        ttl = -1.0
    if not 0.5 <= ttl <= 600:
        raise ConfigurationError(TTL_SETTING, value, "must be seconds from 0.5 to 600")
    return ttl


def _opens(url: Any) -> bool:
    return isinstance(url, str) and url.startswith(_REDIS_SCHEMES)
