"""FunctionSpec: one frozen, validated configuration per ``@concurrent`` function.

Both spellings of every setting are accepted: the seed's names
(``allow_concurrent_inputs``, ``concurrency_limit``, ``keep_warm``,
``container_idle_timeout``) and the current reference names (``max_inputs``,
``max_containers``, ``min_containers``, ``scaledown_window``). The spec stores the
current names only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from .batching import BatchSettings
from .constants import DEFAULT_MAX_INPUTS, DEFAULT_SCALEDOWN_WINDOW
from .errors import ConfigurationError
from .gpu import GpuRequest, parse_gpu

#: seed name -> current name
ALIASES: Mapping[str, str] = {
    "allow_concurrent_inputs": "max_inputs",
    "concurrency_limit": "max_containers",
    "keep_warm": "min_containers",
    "container_idle_timeout": "scaledown_window",
}

SCALING_SETTINGS = (
    "max_inputs",
    "target_inputs",
    "max_containers",
    "min_containers",
    "buffer_containers",
    "scaledown_window",
)

#: the scaling settings a running function may change (``concurrent update``): all but
#: ``max_inputs``, since running containers were started with their slot count
RUNTIME_BOUNDS = tuple(name for name in SCALING_SETTINGS if name != "max_inputs")
#: ... in either spelling
RUNTIME_BOUND_NAMES: frozenset[str] = frozenset(
    (*RUNTIME_BOUNDS, *(seed for seed, name in ALIASES.items() if name in RUNTIME_BOUNDS))
)
#: the settings given in seconds (the others are counts)
SECONDS_SETTINGS = frozenset({"scaledown_window", "container_idle_timeout"})

#: Every keyword ``@concurrent`` (or a task option) accepts.
OPTION_NAMES: frozenset[str] = frozenset(
    (*SCALING_SETTINGS, *ALIASES, "gpu", "pool", "queue"),
)

SYNC_POOLS = ("threads", "gevent")
ASYNC_POOL = "asyncio"


@dataclass(frozen=True)
class FunctionSpec:
    """The settings of one ``@concurrent`` function, validated and normalised.

    Parameters
    ----------
    name:
        The Celery task name.
    queue:
        The broker queue the function's inputs travel on.
    is_async:
        Whether the function is ``async def``; its inputs then run as asyncio tasks.
    max_inputs:
        Hard cap on inputs one container runs at once (``allow_concurrent_inputs``).
    target_inputs:
        The per-container load the autoscaler aims for; ``<= max_inputs``.
    max_containers:
        The most containers of the function (``concurrency_limit``); ``None`` means
        bounded only by the node.
    min_containers:
        Containers kept running with no traffic (``keep_warm``).
    buffer_containers:
        Extra idle containers kept while the function is busy.
    scaledown_window:
        Seconds a container may sit idle before it is retired (``container_idle_timeout``).
    gpu:
        Acceptable device shapes in order of preference, or ``None``.
    pool:
        ``"threads"`` or ``"gevent"`` for sync functions, ``"asyncio"`` for async ones.
    max_batch_size, wait_ms:
        A ``@batched`` function's batch settings; ``None`` for a function that takes one
        input per call. One batch takes one of the ``max_inputs`` slots.
    """

    name: str
    queue: str
    is_async: bool = False
    max_inputs: int = DEFAULT_MAX_INPUTS
    target_inputs: int = DEFAULT_MAX_INPUTS
    max_containers: int | None = None
    min_containers: int = 0
    buffer_containers: int = 0
    scaledown_window: float = DEFAULT_SCALEDOWN_WINDOW
    gpu: tuple[GpuRequest, ...] | None = None
    pool: str = "threads"
    max_batch_size: int | None = None
    wait_ms: int | None = None

    @classmethod
    def from_options(
        cls,
        name: str,
        options: Mapping[str, Any],
        *,
        is_async: bool = False,
        batch: BatchSettings | None = None,
    ) -> FunctionSpec:
        """Build a spec from ``@concurrent`` keywords (either spelling), and the
        ``@batched`` settings of a batched function."""
        settings = normalize_options(options, is_async=is_async)
        queue = settings.pop("queue", None) or default_queue(name, gpu=settings["gpu"])
        if batch is None:
            return cls(name=name, queue=queue, is_async=is_async, **settings)
        if settings["pool"] == "gevent":
            raise ConfigurationError(
                "pool",
                "gevent",
                "a @batched function runs its batches on threads of their own (sync) or "
                "on the container's event loop (async); leave pool unset",
            )
        return cls(
            name=name,
            queue=queue,
            is_async=is_async,
            max_batch_size=batch.max_batch_size,
            wait_ms=batch.wait_ms,
            **settings,
        )

    @property
    def batch_settings(self) -> BatchSettings | None:
        """The ``@batched`` settings, or ``None`` for a function that takes one input."""
        if self.max_batch_size is None or self.wait_ms is None:
            return None
        return BatchSettings(self.max_batch_size, self.wait_ms)

    @property
    def max_items(self) -> int:
        """The most inputs (items) one container holds: ``max_inputs`` batches of up to
        ``max_batch_size`` each, or ``max_inputs`` for a function without batches."""
        return self.max_inputs * (self.max_batch_size or 1)

    @property
    def target_items(self) -> int:
        """The per-container load the autoscaler aims for, in inputs (items):
        ``target_inputs`` batches of ``max_batch_size``."""
        return self.target_inputs * (self.max_batch_size or 1)

    def with_bounds(self, **bounds: Any) -> FunctionSpec:
        """A copy with new scaling bounds (either spelling), validated like the decorator.

        Raises :class:`ConfigurationError` for a bad value, and for a setting that is not
        a scaling bound (``gpu``, ``pool``, ``queue`` are fixed when the function is made).
        """
        given = _canonical_names(bounds)
        fixed = sorted(set(bounds) & {"gpu", "pool", "queue"})
        if fixed:
            raise ConfigurationError(
                fixed[0],
                bounds[fixed[0]],
                "is fixed when the function is decorated; only scaling bounds change",
            )
        # Without a new target_inputs, a target equal to max_inputs (the default: fill
        # each container) follows the new max_inputs; a lower one is kept, capped by it.
        follow_target = "max_inputs" in given and "target_inputs" not in given
        kept = {
            key: getattr(self, key)
            for key in SCALING_SETTINGS
            if key not in given and not (follow_target and key == "target_inputs")
        }
        # The user's own spelling goes through, so that an error names what they wrote.
        settings = normalize_options(
            {**kept, **bounds, "gpu": self._gpu_option(), "pool": self.pool},
            is_async=self.is_async,
        )
        if follow_target and self.target_inputs < self.max_inputs:
            settings["target_inputs"] = min(self.target_inputs, settings["max_inputs"])
        return replace(self, **{k: settings[k] for k in SCALING_SETTINGS})

    def _gpu_option(self) -> list[str] | None:
        return None if self.gpu is None else [str(g) for g in self.gpu]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-friendly view, with the names used everywhere in status output."""
        data = asdict(self)
        data["gpu"] = self._gpu_option()
        return data


def default_queue(task_name: str, gpu: tuple[GpuRequest, ...] | None = None) -> str:
    """The queue a function's inputs travel on unless ``queue=`` names another.

    GPU functions get a queue of their own kind (``concurrent.gpu.<task name>``), so that
    whatever works by queue name (broker dashboards, ``-Q``, a queue-length scaler) can
    tell GPU work apart and send it to GPU machines only.
    """
    return f"concurrent.gpu.{task_name}" if gpu else f"concurrent.{task_name}"


def _canonical_names(options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        canonical = ALIASES.get(key, key)
        if canonical in out:
            seed = next(k for k, v in ALIASES.items() if v == canonical)
            raise ConfigurationError(
                seed,
                options[seed],
                f"give either {seed!r} or {canonical!r}, not both "
                f"({canonical}={options[canonical]!r})",
            )
        out[canonical] = value
    return out


def normalize_options(options: Mapping[str, Any], *, is_async: bool = False) -> dict[str, Any]:
    """Validate ``@concurrent`` keywords and return them under the current names.

    Raises :class:`ConfigurationError` naming the parameter and the value.
    """
    unknown = sorted(set(options) - OPTION_NAMES)
    if unknown:
        raise ConfigurationError(
            unknown[0],
            options[unknown[0]],
            f"unknown setting; expected one of {', '.join(sorted(OPTION_NAMES))}",
        )
    given = _canonical_names(options)
    spelled = {ALIASES.get(k, k): k for k in options}

    def name_of(canonical: str) -> str:
        return spelled.get(canonical, canonical)

    max_inputs = _count(name_of("max_inputs"), given.get("max_inputs", DEFAULT_MAX_INPUTS), 1)
    target = given.get("target_inputs")
    target_inputs = max_inputs if target is None else _count("target_inputs", target, 1)
    if target_inputs > max_inputs:
        raise ConfigurationError(
            "target_inputs",
            target_inputs,
            f"must not exceed {name_of('max_inputs')}={max_inputs}",
        )
    max_containers_raw = given.get("max_containers")
    max_containers = (
        None
        if max_containers_raw is None
        else _count(name_of("max_containers"), max_containers_raw, 1)
    )
    min_containers = _count(name_of("min_containers"), given.get("min_containers", 0), 0)
    if max_containers is not None and min_containers > max_containers:
        raise ConfigurationError(
            name_of("min_containers"),
            min_containers,
            f"must not exceed {name_of('max_containers')}={max_containers}",
        )
    buffer_containers = _count("buffer_containers", given.get("buffer_containers", 0), 0)
    window = given.get("scaledown_window", DEFAULT_SCALEDOWN_WINDOW)
    scaledown_window = _seconds(name_of("scaledown_window"), window)

    out: dict[str, Any] = dict(
        max_inputs=max_inputs,
        target_inputs=target_inputs,
        max_containers=max_containers,
        min_containers=min_containers,
        buffer_containers=buffer_containers,
        scaledown_window=scaledown_window,
        gpu=parse_gpu(given.get("gpu")),
        pool=_pool(given.get("pool"), is_async),
    )
    if given.get("queue") is not None:
        out["queue"] = _queue(given["queue"])
    return out


def _queue(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError("queue", value, "must be a non-empty string")
    return value


def _count(parameter: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(parameter, value, "must be a whole number")
    if value < minimum:
        what = "positive" if minimum == 1 else "zero or more"
        raise ConfigurationError(parameter, value, f"must be {what}")
    return value


def _seconds(parameter: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(parameter, value, "must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ConfigurationError(parameter, value, "must be a positive, finite number of seconds")
    return float(value)


def _pool(value: Any, is_async: bool) -> str:
    if is_async:
        if value in (None, ASYNC_POOL):
            return ASYNC_POOL
        raise ConfigurationError(
            "pool",
            value,
            "async functions run as asyncio tasks on one event-loop thread; "
            "leave pool unset or use 'asyncio'",
        )
    if value is None:
        return "threads"
    if value not in SYNC_POOLS:
        raise ConfigurationError("pool", value, f"expected one of {', '.join(SYNC_POOLS)}")
    return str(value)
