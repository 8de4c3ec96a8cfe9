"""Held messages: a running input is never re-delivered while its container lives, and
a dead container's inputs come back within seconds, on any live node (Redis).

kombu's Redis transport emulates acknowledgements. A delivered, unacknowledged message
waits in the hash ``unacked`` (delivery tag -> ``[message, exchange, routing key]``),
and the sorted set ``unacked_index`` scores its tag with the delivery time; any
consumer's ``QoS.restore_visible`` puts back every tag older than
``visibility_timeout`` (one hour by default). So an input that runs longer than that is
delivered twice (celery#5935), and one whose consumer died unseen (its whole node lost)
waits an hour. Two moves fix both:

- every container calls :meth:`HeldMessages.renew` every
  :data:`~.leases.RENEW_INTERVAL_S` with the tags it holds (running, reserved or
  waiting for an ETA): their ``unacked_index`` scores move to now, by Redis ``TIME``,
  but only while they are still unacknowledged;
- every node's supervisor asks :meth:`HeldMessages.orphans` every renew interval for
  the tags of its functions' queues that no one has renewed for
  :data:`~.leases.DEFAULT_TTL_S`, and puts them back with kombu's ``restore_by_tag``
  (``supervisor.redelivery.Redelivery``): a WATCH/MULTI transaction that requeues a tag
  only while it is in ``unacked``, so two nodes that find the same orphan put it back
  once.

A tag not renewed for a TTL belongs to a container that is gone, or cut off from Redis
(which then drains, its container lease lapsed: see :mod:`.leases`). A tag is found from
its delivery on, with no record of its holder to write first, so a node that dies just
after a delivery loses nothing either.

Limits. Only the queues of ``@concurrent`` functions are swept: a plain worker's
messages keep kombu's own ``visibility_timeout``, and so would those of a plain worker
pointed at a function's queue with ``-Q`` (which nothing renews: do not). kombu scores a
delivery with the consuming host's clock, the sweep compares with Redis' clock: a host
whose clock runs behind Redis' by nearly a TTL would see its fresh deliveries swept. The
scripts touch kombu's keys: one Redis, not a Redis Cluster (which kombu's transport does
not support either).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .leases import DEFAULT_TTL_S, decoded, register, ttl_ms

if TYPE_CHECKING:
    import redis

#: the most old tags one sweep looks at (a plain worker's long inputs may be among them)
ORPHAN_SCAN_LIMIT = 5000

_LUA_RENEW = """
-- KEYS: unacked_index, unacked.  ARGV: tag...
local stamp = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local kept = {}
for _, tag in ipairs(ARGV) do
  if redis.call('HEXISTS', KEYS[2], tag) == 1 and redis.call('ZSCORE', KEYS[1], tag) then
    redis.call('ZADD', KEYS[1], 'XX', stamp, tag)
    table.insert(kept, tag)
  end
end
return kept
"""

_LUA_ORPHANS = """
-- KEYS: unacked_index, unacked.  ARGV: age ms, scan limit, routing key...
local cutoff = (now - tonumber(ARGV[1])) / 1000
local ours = {}
for i = 3, #ARGV do ours[ARGV[i]] = true end
local found = {}
local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[2]))
for _, tag in ipairs(old) do
  local payload = redis.call('HGET', KEYS[2], tag)
  if payload then
    local ok, decoded = pcall(cjson.decode, payload)
    if ok and type(decoded) == 'table' and ours[tostring(decoded[3])] then
      table.insert(found, tag)
    end
  end
end
return found
"""


@dataclass(frozen=True)
class UnackedKeys:
    """The full names of kombu's ``unacked_index`` sorted set and ``unacked`` hash."""

    index: str = "unacked_index"
    payloads: str = "unacked"

    @classmethod
    def of(cls, channel: Any) -> UnackedKeys:
        """A kombu Redis channel's names: its transport options may rename the keys, and
        its ``global_keyprefix`` prefixes them (the channel's own client adds it)."""
        prefix = getattr(channel, "global_keyprefix", "") or ""
        return cls(prefix + channel.unacked_index_key, prefix + channel.unacked_key)


class HeldMessages:
    """Renewal and sweep of kombu's unacknowledged messages, in the broker's Redis.

    Parameters
    ----------
    client:
        A plain :class:`redis.Redis` on the broker's database (not kombu's
        key-prefixing client: it would prefix only a script's first key).
        :func:`plain_client` makes one from a kombu channel.
    unacked:
        kombu's key names, prefix included: :meth:`UnackedKeys.of` a channel.
    """

    def __init__(self, client: redis.Redis, unacked: UnackedKeys | None = None) -> None:
        self.client = client
        self.unacked = unacked or UnackedKeys()
        self._keys = [self.unacked.index, self.unacked.payloads]
        self._renew = register(client, _LUA_RENEW)
        self._orphans = register(client, _LUA_ORPHANS)

    @classmethod
    def for_channel(cls, channel: Any) -> HeldMessages:
        """The messages of a kombu Redis channel, over its own connection settings."""
        return cls(plain_client(channel), UnackedKeys.of(channel))

    def renew(self, tags: Iterable[str]) -> list[str]:
        """Score ``tags`` with now, so that neither kombu nor a sweep re-delivers them.

        One round trip. A tag acknowledged or restored meanwhile is not put back in the
        index. Returns the tags renewed (those still unacknowledged).
        """
        tags = list(tags)
        if not tags:
            return []
        return [decoded(tag) for tag in self._renew(keys=self._keys, args=tags)]

    def orphans(
        self,
        routing_keys: Iterable[str],
        older_than: float = DEFAULT_TTL_S,
        limit: int = ORPHAN_SCAN_LIMIT,
    ) -> list[str]:
        """The unacknowledged tags on ``routing_keys`` that no one renewed for
        ``older_than`` seconds (by Redis' clock): their holders are gone."""
        keys = list(routing_keys)
        if not keys:
            return []
        args: list[str | int] = [ttl_ms(older_than), limit, *keys]
        return [decoded(tag) for tag in self._orphans(keys=self._keys, args=args)]


def plain_client(channel: Any) -> redis.Redis:
    """A client on a kombu Redis channel's server and database that prefixes nothing.

    It shares the channel's connection settings (password, TLS, socket options) through
    kombu's synchronous connection pool.
    """
    import redis

    return redis.Redis(connection_pool=channel.pool)
