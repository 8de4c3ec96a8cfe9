"""Every tunable of celery-concurrent, with its default, in one place.

The decorator's own defaults are the function's (``max_inputs`` 1, ``scaledown_window``
60 s); the rest are the node's and the containers'. Help texts and docs are built from
these, so a default is written once.
"""

from __future__ import annotations

# -- a function (the decorator) --------------------------------------------------------

#: inputs one container runs at once, unless ``max_inputs`` says otherwise
DEFAULT_MAX_INPUTS = 1
#: seconds a container may sit idle before it is retired
DEFAULT_SCALEDOWN_WINDOW = 60.0
#: the largest ``max_batch_size`` of a ``@batched`` function
MAX_BATCH_SIZE_LIMIT = 1000
#: the longest ``wait_ms`` of a ``@batched`` function (ten minutes)
MAX_WAIT_MS = 600_000

# -- a node (the supervisor) -----------------------------------------------------------

#: seconds between two supervisor turns (each reads every backlog in one round trip)
DEFAULT_POLL_INTERVAL = 0.05
#: the node-wide bound on containers, unless ``--concurrent-max-containers`` says: this
#: many per CPU ...
CONTAINERS_PER_CPU = 4
#: ... and at most one per this much memory
MEMORY_PER_CONTAINER = 256 << 20
#: a container that does not drain within this long after it was retired is killed
DEFAULT_DRAIN_TIMEOUT = 300.0
#: a load report with the most delivery tags a container sends fits in this
MAX_REPORT_BYTES = 256 * 1024
#: how long the backlog probe waits before it tries an unreachable broker again
RECONNECT_INTERVAL = 0.5
#: a container that exits within this long of its start counts towards a crash streak
CRASH_WINDOW_SECONDS = 30.0
#: the back-off after a crash doubles from this ...
BACKOFF_BASE_SECONDS = 1.0
#: ... up to this
BACKOFF_MAX_SECONDS = 60.0
#: the buckets of the cold-start histogram (seconds from a start to the first ready report)
COLD_START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: the buckets of the batch-size histogram (items per call of a ``@batched`` function)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
#: how long a starting container may take to read the node's revokes
REVOKES_SEND_TIMEOUT = 5.0
#: how long ``nvidia-smi`` may take to list the node's GPUs
GPU_DETECT_TIMEOUT = 10.0
#: the address the metrics endpoint binds unless ``--concurrent-metrics-address`` says
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
#: where a function's bounds hold unless ``--concurrent-scope`` (or the
#: ``concurrent_scope`` setting) says: ``cluster``, over every node on the broker, or
#: ``node``, on each node alone
DEFAULT_SCOPE = "cluster"
SCOPES = ("cluster", "node")
#: how long a call to the coordination Redis may take before the node counts it failed
#: (a node cut off from Redis must not hang its turns)
COORDINATION_SOCKET_TIMEOUT = 1.0

# -- a container -----------------------------------------------------------------------

#: a container's Redis connection pool holds one connection per slot and this many more:
#: every slot may acknowledge at the same instant, on its own thread, and kombu's pool
#: (10 by default) raises when it has none left, failing the ack
CONNECTIONS_BESIDE_SLOTS = 10
#: how long an idle container's ``BRPOP`` on Redis waits (a warm shutdown waits for it)
REDIS_POLL_SECONDS = 0.25
#: how long a container waits for its node's revokes before it starts without them
REVOKES_RECEIVE_TIMEOUT = 10.0
#: a container whose supervisor died gets this long to drain before it exits hard
ORPHAN_GRACE_SECONDS = 5.0
#: the shortest time between two load reports
REPORT_INTERVAL = 0.01
#: how often the container checks that its supervisor is alive
SUPERVISOR_CHECK_INTERVAL = 0.5
#: the most delivery tags one report carries (about 39 bytes each): a datagram must stay
#: under the socket's send buffer (208 KiB by default); tags beyond these fall back on
#: the transport's ``visibility_timeout``
MAX_HELD_TAGS = 4096
#: a container holding more inputs than this, on Redis, reports at most once per
#: HELD_REPORT_INTERVAL: finding its unacknowledged tags costs a pass over them all
HELD_REPORT_THRESHOLD = 64
HELD_REPORT_INTERVAL = 0.01
#: ... and waits this many times the CPU time its last report took, so that reporting
#: stays about 2 % of the container at 10,000 inputs in flight too
HELD_REPORT_COST_RATIO = 50
#: a container holding part of a batch, with a slot free, asks the broker this often
#: whether the function's queue is empty (then the batch goes at once)
BATCH_PROBE_INTERVAL = 0.002
#: how long a pool thread waits for the event loop to accept its input before it accepts
#: it itself (the loop is stopping)
ACCEPT_ON_LOOP_TIMEOUT = 5.0
#: an input on threads that is still running this long after its ``time_limit`` (or a
#: revoke with ``terminate=True``) makes its container recycle: it stops taking inputs,
#: lets the others finish, exits and is replaced
OVERRUN_GRACE_SECONDS = 2.0

#: threads of an asyncio container that store its inputs' results, off the event loop
BOOKKEEPING_THREADS = 8
#: how long a cold-stopping asyncio container waits for the results being stored off its
#: loop (normally a round trip; the bookkeeping threads are daemons and end with it)
BOOKKEEPING_GRACE_SECONDS = 5.0
#: how long a supervisor's hold of kombu's restore mutex (``unacked_mutex_key``) lasts
#: at most, if it is never released: a give-back or a sweep that a broker restart cut
#: off blocks the other restores for this long, not for kombu's ``unacked_mutex_expire``
RESTORE_MUTEX_SECONDS = 10
