"""``celery concurrent ...``: status and control of @concurrent functions."""

from __future__ import annotations

import click


@click.group(name="concurrent")
@click.pass_context
def concurrent(ctx: click.Context) -> None:
    """Inspect and control celery-concurrent function pools."""
