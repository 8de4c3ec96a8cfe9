"""Container leases: a function's bounds held over every node, in the user's Redis.

Each running container of a function holds a lease: one member (its node name,
``proj.fetch-1@host``) of the function's sorted set, scored by the lease's expiry.
There is no counter to leak and no coordinator: a node that dies simply stops renewing,
and its containers' leases fall out of the set at their expiry, pruned by whichever
node touches the set next. So the set's live members *are* the function's containers,
cluster-wide, and three atomic scripts hold the bounds over them:

- :meth:`ContainerLeases.acquire` admits a new container only while fewer than
  ``max_containers`` hold live leases (``concurrency_limit``);
- :meth:`ContainerLeases.release` lets an idle container go only while more than
  ``min_containers`` would remain (``keep_warm``);
- :meth:`ContainerLeases.renew` keeps a lease, and refuses one that has lapsed.

Every expiry is computed inside Lua from Redis ``TIME``: the nodes' clocks never
meet. Beside each lease the container's :class:`ContainerLoad` (what the cluster's
demand is made of) is written in the same call and pruned with it.

The TTL trade-off
-----------------
:data:`DEFAULT_TTL_S` is 10 s, renewed every :data:`RENEW_INTERVAL_S` (a third of it),
so two renewals in a row may fail before the lease lapses. A shorter TTL lets the
cluster replace a dead node's containers (and, with :mod:`.held_messages`, re-deliver
its inputs) sooner, but costs more Redis calls per container, and a live holder that a GC
pause, a swapping host or an overloaded Redis keeps from renewing for one TTL loses its
lease while it still runs. Seconds, not minutes: a dead node's share of
``max_containers`` comes back within about 10 s.

A holder whose renewal fails (``renew`` returns ``False``, or Redis cannot be reached
until the lease's expiry) must behave as if it had lost the lease: stop taking new
inputs, drain the ones it runs, and exit, or :meth:`~ContainerLeases.acquire` again and
continue only if admitted. Another node may already have started a container in its
place. Without an answer from Redis, the holder counts its lease from when it *sent*
its last successful renewal.

Key layout (``prefix`` defaults to :data:`DEFAULT_PREFIX`)::

    {prefix}:leases:{<function>}   sorted set   container node name -> expiry (ms, Redis TIME)
    {prefix}:load:{<function>}     hash         container node name -> {"at_ms": .., "load": ..}

The braces are Redis Cluster hash tags: a function's two keys share a slot. Both keys
expire (``PEXPIRE``) with their last lease, so a function no node serves leaves nothing
behind. With kombu's ``global_keyprefix`` set, pass ``prefix=global_keyprefix + DEFAULT_PREFIX``
so that apps sharing a Redis database do not share leases.

Needs Redis 3.2 or later (scripts that write after ``TIME``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis
    from redis.commands.core import Script

    from .spec import FunctionSpec

#: the first part of every key this package keeps in Redis
DEFAULT_PREFIX = "celery-concurrent"
#: how long a lease lives unless renewed (see the module's docstring for the trade-off)
DEFAULT_TTL_S = 10.0
#: how often a holder renews: a third of the TTL, so one failed renewal costs nothing
RENEW_INTERVAL_S = DEFAULT_TTL_S / 3

#: Redis ``TIME`` (its reply in ``t``, and as integer milliseconds in ``now``). Scripts
#: that write after ``TIME`` must replicate their effects (the default from Redis 5,
#: asked for on 3.2 and 4). :func:`register` starts every script with it.
LUA_NOW_MS = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

#: The writers first drop the leases (and load records) expired at ``now``; ``hold``
#: keeps the keys no longer than their last lease. KEYS[1] leases, KEYS[2] loads.
_LUA_PRUNED = """
local function hold(member, ttl, load)
  redis.call('ZADD', KEYS[1], now + ttl, member)
  if load ~= '' then
    redis.call('HSET', KEYS[2], member, '{"at_ms":' .. now .. ',"load":' .. load .. '}')
  end
  for _, key in ipairs(KEYS) do
    if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
  end
end

local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #gone > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  for _, member in ipairs(gone) do redis.call('HDEL', KEYS[2], member) end
end
"""

_LUA_ACQUIRE = (
    _LUA_PRUNED
    + """
-- ARGV: member, limit ('' for none), ttl ms, load json ('' for none)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  if ARGV[2] ~= '' and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
hold(ARGV[1], tonumber(ARGV[3]), ARGV[4])
return 1
"""
)

_LUA_RENEW = (
    _LUA_PRUNED
    + """
-- ARGV: member, ttl ms, load json ('' for none)
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
hold(ARGV[1], tonumber(ARGV[2]), ARGV[3])
return 1
"""
)

_LUA_RELEASE = (
    _LUA_PRUNED
    + """
-- ARGV: member, keep
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('ZCARD', KEYS[1]) <= tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""
)

_LUA_LIVE = """
-- read only: {now, member, expiry, member, expiry, ...}
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
table.insert(live, 1, now)
return live
"""

_LUA_LOADS = """
-- read only: {now, live nodes, member, record, member, record, ...} for the live leases
local out = {now, redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf')}
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf')) do
  local record = redis.call('HGET', KEYS[2], member)
  if record then
    table.insert(out, member)
    table.insert(out, record)
  end
end
return out
"""


_LUA_ANNOUNCE = """
-- KEYS: nodes.  ARGV: node, ttl ms
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return 1
"""


def register(client: redis.Redis, body: str) -> Script:
    """Register the Lua ``body`` on ``client``, after :data:`LUA_NOW_MS`."""
    return client.register_script(LUA_NOW_MS + body)


@dataclass(frozen=True)
class ContainerLoad:
    """What one container adds to its function's demand, as the cluster sees it.

    Parameters
    ----------
    node:
        The ``celery worker`` node that runs the container (``celery@host``), so that a
        node can tell its own containers from the others'.
    in_flight:
        Inputs the container holds (running or about to run).
    idle_s:
        Seconds since it last had an input in flight, when it was written (``0`` while
        busy); :attr:`idle_now` adds the record's age.
    ready:
        Whether the container consumes its queue yet (a starting one does not).
    spec_digest:
        :func:`spec_digest` of the spec the node runs the function with: nodes that
        disagree (a rolling deploy) can see it and hold the stricter bounds.
    draining:
        Retired: it finishes what it runs and takes nothing new. It still holds its
        lease (its inputs still run) but no longer counts as capacity.
    max_containers:
        The function's ``max_containers`` on that node: the lowest over the nodes holds.
    age_s:
        Seconds since the record was written, by Redis' clock; set when it is read
        (:meth:`ContainerLeases.cluster_load`), never written.
    """

    node: str
    in_flight: int
    idle_s: float
    ready: bool
    spec_digest: str
    draining: bool = False
    max_containers: int | None = None
    age_s: float = field(default=0.0, compare=False)

    @property
    def idle_now(self) -> float:
        """Seconds idle now, if it stayed idle since it was written."""
        return self.idle_s + self.age_s if self.in_flight == 0 else 0.0

    def encode(self) -> str:
        written = asdict(self)
        del written["age_s"]
        return json.dumps(written, separators=(",", ":"))

    @classmethod
    def decode(cls, data: str | bytes | Mapping[str, Any], age_s: float = 0.0) -> ContainerLoad:
        given = dict(data) if isinstance(data, Mapping) else json.loads(data)
        # A newer node (a rolling deploy) may write fields this one does not know.
        known = {f.name for f in fields(cls)} - {"age_s"}
        return cls(**{k: v for k, v in given.items() if k in known}, age_s=age_s)


def spec_digest(spec: FunctionSpec) -> str:
    """A short digest of every setting of ``spec``: equal on nodes that agree on it."""
    text = json.dumps(spec.as_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decoded(value: str | bytes) -> str:
    """A Redis reply as text, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def ttl_ms(ttl: float) -> int:
    """A lease's ``ttl`` in seconds as the scripts take it: positive milliseconds."""
    if ttl <= 0:
        raise ValueError(f"a lease's ttl must be positive, not {ttl!r}")
    return max(1, round(ttl * 1000))


class ContainerLeases:
    """The container leases of one function, in one Redis.

    Parameters
    ----------
    client:
        A plain :class:`redis.Redis` (not kombu's key-prefixing client: it would prefix
        only a script's first key).
    function:
        The function's name (``FunctionSpec.name``).
    prefix:
        The first part of the keys (:data:`DEFAULT_PREFIX`).
    """

    def __init__(self, client: redis.Redis, function: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.function = function
        self.leases_key = f"{prefix}:leases:{{{function}}}"
        self.loads_key = f"{prefix}:load:{{{function}}}"
        self.nodes_key = f"{prefix}:nodes:{{{function}}}"
        self._keys = [self.leases_key, self.loads_key]
        self._acquire = register(client, _LUA_ACQUIRE)
        self._renew = register(client, _LUA_RENEW)
        self._release = register(client, _LUA_RELEASE)
        self._live = register(client, _LUA_LIVE)
        self._loads = register(client, _LUA_LOADS)
        self._announce = register(client, _LUA_ANNOUNCE)

    def acquire(
        self,
        member: str,
        limit: int | None,
        ttl: float = DEFAULT_TTL_S,
        load: ContainerLoad | None = None,
    ) -> bool:
        """Take a lease for ``member``, or renew the one it holds.

        Parameters
        ----------
        member:
            The container's node name.
        limit:
            The most live leases (``max_containers``); ``None``: no bound, but the lease
            is still taken so that the cluster counts the container.
        ttl:
            Seconds the lease lives unless renewed.
        load:
            The container's load record, written with the lease when it is admitted.

        Returns whether ``member`` holds a live lease now: ``False`` when ``limit``
        live leases are held by others.
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be None or >= 0, not {limit!r}")
        args = [member, "" if limit is None else limit, ttl_ms(ttl), _encoded(load)]
        return bool(self._acquire(keys=self._keys, args=args))

    def renew(
        self, member: str, ttl: float = DEFAULT_TTL_S, load: ContainerLoad | None = None
    ) -> bool:
        """Extend ``member``'s live lease to ``ttl`` from now, writing ``load`` with it.

        Returns ``False``, renewing nothing, when the lease has lapsed (or was dropped):
        the holder must then stop taking inputs and drain, or :meth:`acquire` again.
        """
        return bool(self._renew(keys=self._keys, args=[member, ttl_ms(ttl), _encoded(load)]))

    def release(self, member: str, keep: int) -> bool:
        """Give up ``member``'s lease only while more than ``keep`` live leases remain.

        The scale-down guard for ``min_containers`` (``keep_warm``): an idle container
        retires only if this returns ``True``. Returns ``False`` when the release would
        leave fewer than ``keep``, and when ``member`` holds no live lease.
        """
        if keep < 0:
            raise ValueError(f"keep must be >= 0, not {keep!r}")
        return bool(self._release(keys=self._keys, args=[member, keep]))

    def drop(self, member: str) -> bool:
        """Remove ``member``'s lease and load record whatever remains: it has exited.

        Returns whether there was a lease (live or not yet pruned) to remove.
        """
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(self.leases_key, member)
            pipe.hdel(self.loads_key, member)
            removed, _ = pipe.execute()
        return bool(removed)

    def live(self) -> dict[str, float]:
        """The live leases: member -> seconds left, the soonest to expire first."""
        now, *flat = self._live(keys=self._keys)
        return {
            decoded(member): (float(expiry) - int(now)) / 1000
            for member, expiry in zip(flat[::2], flat[1::2], strict=True)
        }

    def count(self) -> int:
        """How many containers of the function hold a live lease, over every node."""
        return len(self.live())

    def cluster_load(self) -> dict[str, ContainerLoad]:
        """The load records of the live leases (member -> record, ``age_s`` set).

        A container that holds a lease without having written a record is left out.
        """
        return self.view()[0]

    def view(self) -> tuple[dict[str, ContainerLoad], int]:
        """:meth:`cluster_load`, and how many nodes serve the function (:meth:`announce`),
        in one round trip."""
        now, nodes, *flat = self._loads(keys=[*self._keys, self.nodes_key])
        loads = {}
        for member, raw in zip(flat[::2], flat[1::2], strict=True):
            record = json.loads(raw)
            age_s = max(0.0, (int(now) - int(record["at_ms"])) / 1000)
            loads[decoded(member)] = ContainerLoad.decode(record["load"], age_s=age_s)
        return loads, int(nodes)

    def announce(self, node: str, ttl: float = DEFAULT_TTL_S) -> None:
        """Say that ``node`` serves the function (and could place a container of it) for
        ``ttl`` more seconds: the nodes share a scale-up among those that do."""
        self._announce(keys=[self.nodes_key], args=[node, ttl_ms(ttl)])

    def withdraw(self, node: str) -> None:
        """``node`` no longer serves the function (it is stopping)."""
        self.client.zrem(self.nodes_key, node)


def _encoded(load: ContainerLoad | None) -> str:
    return "" if load is None else load.encode()
