"""The threads pool of sync containers: Celery's own, plus a prompt refill."""

from __future__ import annotations

from typing import Any

from celery.concurrency.thread import TaskPool

from .wakeup import SlotWakeup


class ThreadPool(TaskPool):
    """Celery's threads pool that counts its running inputs and wakes the event loop."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = SlotWakeup()

    def register_with_event_loop(self, loop: Any) -> None:
        super().register_with_event_loop(loop)
        self.slots.register(loop)

    def on_apply(
        self,
        target: Any,
        args: Any = None,
        kwargs: Any = None,
        callback: Any = None,
        accept_callback: Any = None,
        **options: Any,
    ) -> Any:
        return super().on_apply(
            target,
            args,
            kwargs,
            self.slots.wrap(callback),
            self.slots.wrap_accept(accept_callback),
            **options,
        )

    def on_stop(self) -> None:
        super().on_stop()
        self.slots.close()
