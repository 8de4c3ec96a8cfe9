"""Held-message leases: a running input is never re-delivered while its holder lives,
and a dead holder's inputs come back within a lease, on any live node (Redis).

kombu's Redis transport emulates acknowledgements. A delivered, unacknowledged message
waits in the hash ``unacked`` (delivery tag -> payload), and the sorted set
``unacked_index`` scores its tag with the delivery time; any consumer's
``QoS.restore_visible`` puts back every tag older than ``visibility_timeout`` (one hour
by default). So an input that runs longer than that is delivered twice, and one whose
consumer died waits that long. A holder lease fixes both:

- the holder (a container) calls :meth:`HeldLeases.renew` every
  :data:`~.leases.RENEW_INTERVAL_S` with the tags it holds: their ``unacked_index``
  scores move to now (Redis ``TIME``), but only for tags still unacknowledged, and the
  tags are recorded under the holder, whose lease runs :data:`~.leases.DEFAULT_TTL_S`;
- a live node's supervisor lists :meth:`HeldLeases.expired_holders`, takes one with
  :meth:`HeldLeases.claim_expired` (atomic: of two racing nodes one gets the tags), puts
  them back with kombu's ``restore_by_tag`` (``supervisor.redelivery.Redelivery``), and
  calls :meth:`HeldLeases.forget`.

A claim leases the dead holder's record to the claimer for ``claim_ttl``: a claimer that
dies before :meth:`~HeldLeases.forget` leaves the record to the next, which gets only the
tags still unacknowledged. ``restore_by_tag`` is a transaction that requeues a tag only
while it is in ``unacked``, so no message is put back twice. A claim also marks the
holder as claimed: if it was only paused and renews again, :meth:`~HeldLeases.renew`
refuses (returns ``None``) and the holder must stop taking inputs and drain; its inputs
are on their way to another container.

Key layout (``prefix`` defaults to :data:`~.leases.DEFAULT_PREFIX`)::

    {prefix}:held-holders          sorted set   holder -> lease expiry (ms, Redis TIME)
    {prefix}:held:{<holder>}       set          the holder's delivery tags
    {prefix}:held-claimed:{<holder>} string     the claimer, once the holder was claimed

A dead holder's records outlive its lease by :data:`HELD_RECORD_KEEP_S`; one that no
node claims in that time falls back to kombu's own ``visibility_timeout``.

Limits. ``visibility_timeout`` must be well above the renew interval (it is an hour by
default). kombu compares the index scores with each client's ``time()``, so a node whose
clock runs ahead of Redis' by nearly ``visibility_timeout`` would still restore a renewed
tag. The scripts touch kombu's keys and ours together: one Redis, not a Redis Cluster
(which kombu's transport does not support either).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .leases import DEFAULT_PREFIX, DEFAULT_TTL_S, decoded, register, ttl_ms

if TYPE_CHECKING:
    import redis

#: how long a dead holder's tags and claim mark outlive its lease: kombu's default
#: ``visibility_timeout``, after which kombu restores the tags by itself anyway
HELD_RECORD_KEEP_S = 3600.0

_LUA_RENEW = """
-- KEYS: holders, held, claimed, unacked_index, unacked
-- ARGV: holder, ttl ms, keep ms, tag...
if redis.call('EXISTS', KEYS[3]) == 1 then return false end
local stamp = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
local ttl, keep = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - keep)
redis.call('DEL', KEYS[2])
local kept = {}
for i = 4, #ARGV do
  local tag = ARGV[i]
  if redis.call('ZSCORE', KEYS[4], tag) and redis.call('HEXISTS', KEYS[5], tag) == 1 then
    redis.call('ZADD', KEYS[4], 'XX', stamp, tag)
    redis.call('SADD', KEYS[2], tag)
    table.insert(kept, tag)
  end
end
if #kept == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
else
  redis.call('PEXPIRE', KEYS[2], ttl + keep)
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
end
return kept
"""

_LUA_EXPIRED = """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
"""

_LUA_CLAIM = """
-- KEYS: holders, held, claimed, unacked.  ARGV: holder, claimer, claim ttl ms, keep ms
local expiry = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expiry or tonumber(expiry) > now then return false end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('SET', KEYS[3], ARGV[2], 'PX', tonumber(ARGV[4]))
local waiting = {}
for _, tag in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  if redis.call('HEXISTS', KEYS[4], tag) == 1 then
    table.insert(waiting, tag)
  else
    redis.call('SREM', KEYS[2], tag)
  end
end
return waiting
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


def holder_name(nodename: str, pid: int) -> str:
    """The holder name of a container process: its node name and pid, which its
    supervisor knows too. A restarted container is a new holder."""
    return f"{nodename}:{pid}"


class HeldLeases:
    """Holder leases over kombu's unacknowledged messages, in one Redis database.

    Parameters
    ----------
    client:
        A plain :class:`redis.Redis` on the broker's database (not kombu's
        key-prefixing client: it would prefix only a script's first key).
    unacked:
        kombu's key names, prefix included: :meth:`UnackedKeys.of` a channel.
    prefix:
        The first part of our keys. :meth:`for_channel` puts the channel's
        ``global_keyprefix`` before it.
    """

    def __init__(
        self,
        client: redis.Redis,
        unacked: UnackedKeys | None = None,
        prefix: str = DEFAULT_PREFIX,
    ) -> None:
        self.client = client
        self.unacked = unacked or UnackedKeys()
        self.prefix = prefix
        self.holders_key = f"{prefix}:held-holders"
        self._renew = register(client, _LUA_RENEW)
        self._expired = register(client, _LUA_EXPIRED)
        self._claim = register(client, _LUA_CLAIM)

    @classmethod
    def for_channel(
        cls, client: redis.Redis, channel: Any, prefix: str = DEFAULT_PREFIX
    ) -> HeldLeases:
        """The leases over a kombu Redis channel's messages, under its ``global_keyprefix``."""
        keyprefix = getattr(channel, "global_keyprefix", "") or ""
        return cls(client, UnackedKeys.of(channel), keyprefix + prefix)

    def held_key(self, holder: str) -> str:
        return f"{self.prefix}:held:{{{holder}}}"

    def claimed_key(self, holder: str) -> str:
        return f"{self.prefix}:held-claimed:{{{holder}}}"

    def renew(
        self, holder: str, tags: Iterable[str], ttl: float = DEFAULT_TTL_S
    ) -> list[str] | None:
        """Keep ``holder``'s unacknowledged messages from re-delivery for ``ttl`` more.

        One round trip: each tag still unacknowledged gets ``unacked_index`` score now
        (Redis ``TIME``; a tag acknowledged or restored meanwhile is not re-added), and
        the holder's recorded tags become exactly those, under a lease of ``ttl``.

        Returns the tags renewed (those still unacknowledged), or ``None`` when another
        node has claimed ``holder``: its lease had lapsed and its messages are being
        re-delivered, so it must stop taking inputs and drain.
        """
        keys = [
            self.holders_key,
            self.held_key(holder),
            self.claimed_key(holder),
            self.unacked.index,
            self.unacked.payloads,
        ]
        args: list[str | int] = [holder, ttl_ms(ttl), ttl_ms(HELD_RECORD_KEEP_S), *tags]
        kept = self._renew(keys=keys, args=args)
        return None if kept is None else [decoded(tag) for tag in kept]

    def forget(self, holder: str) -> None:
        """Drop ``holder``'s record: it exited having acknowledged (or restored) what it
        held, or a claimer has restored its tags."""
        with self.client.pipeline(transaction=True) as pipe:
            pipe.zrem(self.holders_key, holder)
            pipe.delete(self.held_key(holder))
            pipe.execute()

    def expired_holders(self) -> list[str]:
        """The holders whose lease has expired, unclaimed (or whose claim lapsed)."""
        return [decoded(holder) for holder in self._expired(keys=[self.holders_key])]

    def claim_expired(
        self, holder: str, claimer: str, claim_ttl: float = DEFAULT_TTL_S
    ) -> list[str] | None:
        """Take over an expired holder, atomically, to restore what it held.

        Parameters
        ----------
        holder:
            One of :meth:`expired_holders`.
        claimer:
            Who claims (the live node's name), recorded for the holder to see.
        claim_ttl:
            Seconds the claimer has to restore the tags and :meth:`forget` the holder;
            past them, another node may claim what is still unacknowledged.

        Returns the holder's tags still unacknowledged, for ``restore_by_tag``, or
        ``None`` when ``holder`` is not expired (it renewed, or another node claimed it).
        """
        keys = [
            self.holders_key,
            self.held_key(holder),
            self.claimed_key(holder),
            self.unacked.payloads,
        ]
        args: list[str | int] = [holder, claimer, ttl_ms(claim_ttl), ttl_ms(HELD_RECORD_KEEP_S)]
        tags = self._claim(keys=keys, args=args)
        return None if tags is None else [decoded(tag) for tag in tags]
