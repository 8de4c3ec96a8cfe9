"""The usual Celery layout: the app in ``proj/celery.py``, the tasks in ``proj/tasks.py``."""

from .celery import app

__all__ = ["app"]
