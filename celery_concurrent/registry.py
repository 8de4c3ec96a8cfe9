"""Which tasks are ``@concurrent`` functions, and their :class:`FunctionSpec`.

The decorator leaves its settings on the function (below ``@app.task``) or on the task's
class (above it); task options (``@app.task(max_inputs=10)``) are read from the task.
Everything that needs a spec (routing, the supervisor, the CLI, the plugin) asks here.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.local import PromiseProxy

from .asyncbridge import original_async, sync_runner
from .batching import BATCH_OPTION_NAMES, BatchSettings, batch_runner, batched_of
from .errors import ConfigurationError
from .spec import OPTION_NAMES, FunctionSpec

if TYPE_CHECKING:
    from celery import Celery, Task

#: Where the decorator's keywords are kept, on the function or on the task class.
OPTIONS_ATTR = "__celery_concurrent__"
#: Where ``@batched`` above ``@app.task`` keeps its settings, on the task class.
BATCH_SETTINGS_ATTR = "__celery_concurrent_batch__"

# Specs by task class: a spec is read once per task, and forgotten with the class.
_specs: weakref.WeakKeyDictionary[type, FunctionSpec] = weakref.WeakKeyDictionary()


def is_async(fn: Any) -> bool:
    """Whether ``fn`` is an ``async def`` function, or our synchronous runner of one."""
    raw = fn.__func__ if isinstance(fn, staticmethod) else fn
    batched = batched_of(raw)
    if batched is not None:
        return batched.is_async
    return inspect.iscoroutinefunction(raw) or original_async(raw) is not None


def task_is_async(task: Task) -> bool:
    """Whether the task's body is an ``async def`` function."""
    return is_async(type(task).__dict__.get("run"))


def record_options(task: Task, options: dict[str, Any]) -> None:
    """Keep the decorator's ``options`` on the task's class (``@concurrent`` above)."""
    cls = type(task)
    setattr(cls, OPTIONS_ATTR, dict(options))
    _specs.pop(cls, None)


def record_batch_settings(task: Task, settings: BatchSettings) -> None:
    """Keep ``@batched``'s settings on the task's class (``@batched`` above)."""
    cls = type(task)
    setattr(cls, BATCH_SETTINGS_ATTR, settings)
    _specs.pop(cls, None)


def spec_of(task: Task) -> FunctionSpec | None:
    """The :class:`FunctionSpec` of a task, or ``None`` for a plain Celery task.

    Raises :class:`ConfigurationError` when the task's settings are invalid.
    """
    if isinstance(task, PromiseProxy):
        task = task._get_current_object()
    cls = type(task)
    cached = _specs.get(cls)
    if cached is not None:
        return cached
    batch = batch_settings_of(task)
    options = _options_of(task)
    if options is None and batch is None:
        return None
    options = options or {}
    task_queue = getattr(task, "queue", None)
    own_queue = options.get("queue")
    if own_queue and task_queue and own_queue != task_queue:
        raise ConfigurationError(
            "queue", own_queue, f"the task's own queue option says {task_queue!r}"
        )
    if task_queue and not own_queue:
        options["queue"] = task_queue
    spec = FunctionSpec.from_options(task.name, options, is_async=task_is_async(task), batch=batch)
    _specs[cls] = spec
    return spec


def _options_of(task: Task) -> dict[str, Any] | None:
    from_task = {
        name: getattr(task, name)
        for name in OPTION_NAMES - {"queue"}
        if getattr(task, name, None) is not None
    }
    decorated = getattr(type(task), OPTIONS_ATTR, None) or getattr(task.run, OPTIONS_ATTR, None)
    if decorated is None and not from_task:
        return None
    return {**from_task, **(decorated or {})}


def batch_settings_of(task: Task) -> BatchSettings | None:
    """The ``@batched`` settings of a task (decorated, or task options), or ``None``."""
    cls = type(task)
    batched = batched_of(cls.__dict__.get("run"))
    if batched is not None:
        return batched.settings
    recorded = getattr(cls, BATCH_SETTINGS_ATTR, None)
    if isinstance(recorded, BatchSettings):
        return recorded
    options = {name: getattr(task, name, None) for name in BATCH_OPTION_NAMES}
    if all(value is None for value in options.values()):
        return None
    return BatchSettings.from_options(options)


def adopt_batched_run(task: Task, settings: BatchSettings | None = None) -> None:
    """Make a batched task's ``run`` take one input: its function's item runner.

    Only a task whose class holds the batched function itself needs it: one decorated
    with ``@batched`` above ``@app.task``, or declared with task options. Raises
    :class:`ConfigurationError` for a bound task (a batch has no one request) and for a
    function a batch cannot call.
    """
    cls = type(task)
    settings = settings or batch_settings_of(task)
    run = cls.__dict__.get("run")
    if settings is None:
        return
    if not isinstance(run, staticmethod):
        raise ConfigurationError(
            "bind", True, f"{task.name} is @batched: a batch has no one request to bind"
        )
    if batched_of(run) is not None:
        return
    cls.run = staticmethod(batch_runner(run.__func__, settings))


def specs_of(app: Celery) -> dict[str, FunctionSpec]:
    """Every ``@concurrent`` function of ``app``, by task name."""
    out: dict[str, FunctionSpec] = {}
    for name, task in sorted(app.tasks.items()):
        spec = spec_of(task)
        if spec is not None:
            out[name] = spec
    return out


def adopt_async_run(task: Task) -> None:
    """Make an ``async def`` task's ``run`` return its result instead of a coroutine.

    Only a task whose class holds the coroutine function itself needs it: one decorated
    above ``@app.task``, or declared with task options only. Below ``@app.task`` the
    decorator hands Celery the runner already.
    """
    cls = type(task)
    fn = cls.__dict__.get("run")
    if isinstance(fn, staticmethod) and inspect.iscoroutinefunction(fn.__func__):
        cls.run = staticmethod(sync_runner(fn.__func__))
    elif inspect.iscoroutinefunction(fn):
        cls.run = sync_runner(fn)


def runner_for(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What Celery should make a task of: ``fn``, or the runner of an ``async def`` one."""
    return sync_runner(fn) if inspect.iscoroutinefunction(fn) else fn
