"""A Django-style project without Django: the app is ``celery_app``, found by ``-A djproj``.

``djproj/celery.py`` reads its settings with the ``CELERY_`` namespace, as Django projects
do, and autodiscovers each package's ``tasks.py``.
"""

from .celery import app as celery_app

__all__ = ("celery_app",)
