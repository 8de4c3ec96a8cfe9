"""The project's Celery app, configured and discovered as in Celery's Django guide."""

from __future__ import annotations

from celery import Celery

app = Celery("djproj")
app.config_from_object("djproj.settings", namespace="CELERY")
# Django's app registry would list these; without Django the packages are named here.
app.autodiscover_tasks(["djproj.orders"])
