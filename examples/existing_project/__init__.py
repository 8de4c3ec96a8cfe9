"""An existing Celery project, before and after: the only change is one decorator.

``before.py`` is the project as it was; ``after.py`` adds ``@concurrent`` to the task that
waits on the network (and the import). ``python -m examples.existing_project`` runs the
same calls through each, with the same worker command.
"""
