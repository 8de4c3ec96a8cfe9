"""Intake on Redis: a container takes up to its free slots in one round trip.

Celery on Redis takes one message per ``BRPOP`` and books it as unacknowledged with a
second round trip (kombu's ``QoS.append``: the ``unacked`` hash and the
``unacked_index`` sorted set), so a worker's intake is bounded by two round trips per
message on its event loop. A container knows how many slots it has free, so while the
queue holds messages it takes up to that many in one ``EVAL`` (a refill of one slot
too, in one round trip instead of two): the script
pops them and books each exactly as kombu does (the same hash entry, the same index
score from the client's clock), atomically, so a crash at any point loses nothing that
kombu would not (a message is in the list or booked, never neither). Each message then
goes through kombu's own delivery and Celery's own task strategy, unchanged; its ack,
reject and restore are kombu's.

When a take comes back with fewer than it asked for, the queue is empty, and the next
fetch is kombu's blocking ``BRPOP`` (an idle container costs what it did); the takes
return after the next message.
A container never takes more than its free slots: the take asks for ``limit -
reserved`` messages (Celery's own ``worker_disable_prefetch`` rule), so the broker's
queue length stays the true backlog. A message the script cannot read (not JSON, or no
delivery tag) is popped unbooked and handed to kombu as its ``BRPOP`` would hand it. A
message that kombu or Celery then fails on is dropped (or rejected) with an error in the
log and the rest of the take is delivered, where kombu's own read would stop the worker.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from celery import bootsteps
from celery.utils.log import get_logger
from celery.worker import state as worker_state
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str

from ..brokers import is_redis
from .decoding import loads

logger = get_logger(__name__)

#: KEYS: the queue's lists in priority order, then ``unacked`` and ``unacked_index``.
#: ARGV: how many to take, the client's clock (the index score kombu gives). Returns
#: ``{list number, booked (1/0), payload}`` for each message, in the order taken.
TAKE = """
local n = tonumber(ARGV[1])
local hash, index = KEYS[#KEYS - 1], KEYS[#KEYS]
local out, taken = {}, 0
for i = 1, #KEYS - 2 do
  while taken < n do
    local payload = redis.call('RPOP', KEYS[i])
    if not payload then break end
    taken = taken + 1
    local ok, message = pcall(cjson.decode, payload)
    local tag, info
    if ok and type(message) == 'table' and type(message['properties']) == 'table' then
      tag = message['properties']['delivery_tag']
      info = message['properties']['delivery_info']
    end
    if type(tag) == 'string' and type(info) == 'table'
        and type(info['exchange']) == 'string' and type(info['routing_key']) == 'string' then
      redis.call('HSET', hash, tag, '[' .. payload .. ',' .. cjson.encode(info['exchange'])
        .. ',' .. cjson.encode(info['routing_key']) .. ']')
      redis.call('ZADD', index, ARGV[2], tag)
      out[#out + 1] = {i, 1, payload}
    else
      out[#out + 1] = {i, 0, payload}
    end
  end
end
return out
"""


class Intake:
    """Takes up to the free slots in one round trip on one kombu Redis channel.

    Parameters
    ----------
    channel:
        The task consumer's channel (``kombu.transport.redis.Channel``).
    free:
        How many more messages the container may hold now.
    """

    def __init__(self, channel: Any, free: Callable[[], int], hub: Any = None) -> None:
        self.channel = channel
        self.free = free
        #: the event loop acks are batched on (None: each ack is sent at once)
        self.hub = hub
        self._hub_thread = threading.get_ident()
        #: tags acked on the loop's thread since the last flush
        self.acks: list[str] = []
        #: the client the batched acks go through (kombu makes one per ack)
        self._acks_client: Any = None
        #: delivery tags the script booked, until kombu's delivery reaches QoS.append
        self.booked: set[str] = set()
        #: the pending reply is a take's (else kombu's BRPOP)
        self.taking = False
        #: the queue may hold more: the next fetch is a take
        self.more = True
        #: the queue of each list the pending take reads, by the list's number - 1
        self._queues: list[str] = []
        #: how many the pending take asked for
        self._wanted = 0
        #: the message being delivered, once kombu has taken it in (its QoS.append ran)
        self._appended: Any = None
        self._brpop_start = channel._brpop_start
        self._append = channel.qos.append
        self._ack = channel.qos.ack

    def install(self) -> None:
        channel = self.channel
        channel._brpop_start = self.start
        channel._brpop_read = self.read
        channel.handlers["BRPOP"] = self.read
        channel.qos.append = self.append
        channel.qos.ack = self.ack
        if self.hub is not None:
            # After the turn's callbacks and timers, before the loop waits for events:
            # the acks made this turn go out before it sleeps.
            self.hub.on_tick.add(self.flush_acks)

    def uninstall(self) -> None:
        """Send the acks that wait; from now on each ack goes at once."""
        hub, self.hub = self.hub, None
        if hub is not None:
            hub.on_tick.discard(self.flush_acks)
        if self.acks and self.channel.connection is None:
            # Closed with the connection: kombu restores them after its visibility
            # timeout, as it does an ack that could not be sent.
            logger.warning(
                "celery-concurrent: %d acks not sent, the channel closed first", len(self.acks)
            )
            self.acks = []
            return
        self.flush_acks()

    # -- kombu's poller calls these on the event loop's thread ---------------------------

    def start(self, timeout: float | None = None) -> None:
        """Send the next fetch: a take while the queue may hold more, else ``BRPOP``."""
        channel = self.channel
        wanted = self.free()
        if not self.more or wanted < 1:
            self.taking = False
            self._brpop_start(timeout)
            return
        queues = channel._queue_cycle.consume(len(channel.active_queues))
        if not queues:
            return
        keys = [
            channel._q_for_pri(queue, pri) for pri in channel.priority_steps for queue in queues
        ]
        self._queues = [queue for _ in channel.priority_steps for queue in queues]
        keys += [channel.unacked_key, channel.unacked_index_key]
        prefix = channel.global_keyprefix or ""
        self.taking = True
        self._wanted = wanted
        channel._in_poll = channel.client.connection
        channel._brpop_sent_at = time.monotonic()
        channel.client.connection.send_command(
            "EVAL", TAKE, len(keys), *(prefix + key for key in keys), wanted, time.time()
        )

    def read(self, **options: Any) -> bool:
        """Read the pending reply and deliver what it holds."""
        if not self.taking:
            return self._read_brpop(**options)
        channel = self.channel
        try:
            try:
                reply = channel.client.parse_response(channel.client.connection, "EVAL")
            except channel.connection_errors:
                channel.client.connection.disconnect()
                raise
        finally:
            self.taking = False
            channel._in_poll = None
        if not reply:
            self.more = False
            raise virtual.Empty()
        self.more = len(reply) >= self._wanted  # fewer: the queue is empty now
        for number, booked, payload in reply:
            self._deliver(self._queues[int(number) - 1], bool(booked), payload)
        return True

    def _read_brpop(self, **options: Any) -> bool:
        """kombu's ``_brpop_read``, with its message delivered as a take's messages are."""
        channel = self.channel
        try:
            try:
                reply = channel.client.parse_response(channel.client.connection, "BRPOP", **options)
            except channel.connection_errors:
                channel.client.connection.disconnect()  # the next fetch reconnects
                raise
        finally:
            channel._in_poll = None
            reauth = getattr(channel, "_flush_brpop_reauth", None)  # kombu 5.7: now idle
            if reauth is not None:
                reauth()
        if not reply:
            raise virtual.Empty()
        self.more = True  # a message came: a burst may be behind it
        dest, payload = reply
        self._deliver(bytes_to_str(dest).rsplit(channel.sep, 1)[0], False, payload)
        return True

    def _deliver(self, queue: str, booked: bool, payload: bytes) -> None:
        """Hand one message to kombu and Celery; one they cannot read is logged and
        dropped, and the container goes on (kombu's own read would stop the worker)."""
        try:
            message = loads(payload.decode() if isinstance(payload, bytes) else payload)
            # The script booked only an envelope with a delivery tag and delivery_info.
            tag = message["properties"]["delivery_tag"] if booked else None
        except Exception as exc:  # noqa: BLE001 - not JSON
            self._drop(queue, None, payload, exc)
            return
        if tag is not None:
            self.booked.add(tag)
        channel = self.channel
        channel._queue_cycle.rotate(queue)
        self._appended = None
        try:
            channel.connection._deliver(message, queue)
        except Exception as exc:  # noqa: BLE001 - sorted out below
            # The broker went away: Celery reconnects, kombu restores what it holds.
            # (kombu counts a KeyError as a connection error; here it is the envelope's.)
            if isinstance(exc, channel.connection_errors) and not isinstance(exc, KeyError):
                raise
            taken, self._appended = self._appended, None
            if taken is None:
                # kombu could not make a message of it (no body, no properties...): the
                # same envelope would fail again, so it is dropped rather than put back.
                self.booked.discard(tag)
                self._drop(queue, tag, payload, exc)
            elif not taken.acknowledged:
                # kombu took it in and Celery's handling of it failed: rejected, so that
                # no restart runs into it again.
                logger.exception("celery-concurrent: rejected a message Celery could not handle")
                taken.reject(requeue=False)

    def _drop(self, queue: str, tag: str | None, payload: bytes, error: BaseException) -> None:
        if tag is not None:
            self._unbook([tag])
        logger.error(
            "celery-concurrent: could not read a message from %s, dropped it (%s: %s): %r",
            queue,
            type(error).__name__,
            error,
            payload[:200],
        )

    def append(self, message: Any, delivery_tag: str) -> None:
        """kombu's bookkeeping of a delivered message, less what the script did."""
        self._appended = message
        if delivery_tag in self.booked:
            self.booked.discard(delivery_tag)
            virtual.QoS.append(self.channel.qos, message, delivery_tag)
        else:
            self._append(message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        """kombu's ack; those made on the loop's thread go out together, once per turn.

        Celery acks on the event loop (its ``call_soon``), one round trip each: the acks
        of one turn of the loop (the inputs a take delivered start together) become one
        ``ZREM``/``HDEL`` pipeline at the end of the turn (the hub's ``on_tick``, which
        runs before it waits for events again).
        """
        if self.hub is None or threading.get_ident() != self._hub_thread:
            self._ack(delivery_tag)
            return
        virtual.QoS.ack(self.channel.qos, delivery_tag)
        self.acks.append(delivery_tag)

    def _client(self) -> Any:
        """A client of the channel's pool for the loop's own writes (kombu makes one per
        ack); not the channel's client, whose connection may wait on a fetch."""
        if self._acks_client is None:
            self._acks_client = self.channel._create_client()
        return self._acks_client

    def flush_acks(self) -> None:
        tags, self.acks = self.acks, []
        if tags:
            self._unbook(tags)

    def _unbook(self, tags: list[str]) -> None:
        """Take ``tags`` out of kombu's unacked bookkeeping, in one round trip."""
        qos = self.channel.qos
        with qos.pipe_or_acquire(client=self._client()) as pipe:
            pipe.zrem(qos.unacked_index_key, *tags).hdel(qos.unacked_key, *tags).execute()


class RedisIntake(bootsteps.StartStopStep):
    """Consumer bootstep: a Redis container takes up to its free slots per round trip."""

    label = "celery-concurrent intake"
    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, consumer: Any, concurrent_function: str | None = None, **kwargs: Any):
        self.enabled = bool(concurrent_function)
        self.intake: Intake | None = None
        super().__init__(consumer, **kwargs)

    def start(self, consumer: Any) -> None:
        if not is_redis(consumer.app) or not consumer.app.conf.worker_disable_prefetch:
            return
        channel = getattr(consumer.task_consumer, "channel", None)
        if channel is None or not hasattr(channel, "_brpop_start"):
            return  # not kombu's Redis channel (a transport of the user's own)
        # A reconnect starts the step again, on the new consumer's channel.
        self.intake = Intake(channel, lambda: free_slots(consumer), consumer.hub)
        self.intake.install()
        # Celery's disable_prefetch rule, with the finishing inputs' slots free.
        qos = channel.qos
        qos.can_consume = lambda: free_slots(consumer) > 0 and type(qos).can_consume(qos)

    def stop(self, consumer: Any) -> None:
        intake, self.intake = self.intake, None
        if intake is not None:
            intake.uninstall()

    def shutdown(self, consumer: Any) -> None:
        self.stop(consumer)


def free_slots(consumer: Any) -> int:
    """How many more messages the container may hold: Celery's ``disable_prefetch`` rule
    (the pool's size less the reserved requests), where an input whose function has
    returned no longer takes a slot while its outcome is stored."""
    limit = getattr(consumer.controller, "max_concurrency", None) or consumer.pool.num_processes
    finishing = getattr(getattr(consumer.pool, "slots", None), "finishing", 0)
    return int(limit) - len(worker_state.reserved_requests) + finishing
