"""Development tooling, never installed with the package: what the demo, the examples, the
tests and the benchmarks run on.

- ``devkit.servers``: a throwaway Redis, a Flower server, stopping processes by PID;
- ``devkit.workers``: ``celery worker`` subprocesses, each stopped by its PID and group;
- ``devkit.processes``: what runs below a node (its containers), read from ``/proc``;
- ``devkit.bursts``: a queue full of inputs at one instant;
- ``devkit.waiting``: waiting on a condition.
"""

from pathlib import Path

#: the repository: where workers start, and what their ``PYTHONPATH`` begins with
ROOT = Path(__file__).resolve().parent.parent
