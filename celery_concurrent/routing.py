"""Routing: every ``@concurrent`` function's inputs travel on a queue of their own.

That queue is the spec's: ``concurrent.<task name>``, ``concurrent.gpu.<task name>`` for a
GPU function, or what ``queue=`` names. The router is appended after the user's own
``task_routes``, so a route the user set still wins, and plain tasks are never touched.
Each function's queue is declared in the app's queue set as Celery would declare a missing
one, so that ``task_create_missing_queues=False`` keeps working; a queue the user declared
in ``task_queues`` is used as it is.
"""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from celery import Celery

from .registry import spec_of


class ConcurrentRouter:
    """A Celery router that sends each ``@concurrent`` function to its queue."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def __call__(
        self,
        name: str,
        args: Any = None,
        kwargs: Any = None,
        options: Any = None,
        task: Any = None,
        **_: Any,
    ) -> dict[str, str] | None:
        if task is None:
            task = self.app.tasks.get(name)
        spec = spec_of(task) if task is not None else None
        if spec is None:
            return None
        declare_queue(self.app, spec.queue)
        return {"queue": spec.queue}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConcurrentRouter) and other.app is self.app

    def __hash__(self) -> int:
        return hash((ConcurrentRouter, id(self.app)))

    def __repr__(self) -> str:
        return f"<ConcurrentRouter {self.app.main}>"


def ensure_router(app: Celery) -> None:
    """Append the router to ``task_routes`` unless it is there already."""
    routes = app.conf.task_routes
    if routes is None:
        current: list[Any] = []
    elif isinstance(routes, list | tuple):
        current = list(routes)
    else:
        current = [routes]
    router = ConcurrentRouter(app)
    if router in current:
        return
    app.conf.task_routes = (*current, router)
    if "amqp" in app.__dict__:
        # Routes are prepared once; a router already built must see the new list.
        app.amqp.flush_routes()
        with suppress(AttributeError, KeyError):
            del app.amqp.router


def declare_queue(app: Celery, name: str) -> None:
    """Add the queue ``name`` to the app's queues unless it is there (the user's wins).

    It gets the exchange and routing key Celery gives a missing queue.
    """
    queues = app.amqp.queues
    if name not in queues:
        queues.add(queues.new_missing(name))
