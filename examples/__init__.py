"""Runnable examples; each starts what it needs and stops every process it started.

- ``python -m examples.demo`` (``make demo``): a burst, the scale-up and the idle scale-down.
- ``python -m examples.io_bound``: sync and async I/O-bound calls to a local HTTP server.
- ``python -m examples.batching``: LLM-style continuous batching in an async function.
- ``python -m examples.gpu_embeddings``: ``gpu="any"`` on a GPU node (or ``--gpus`` to simulate).
- ``python -m examples.existing_project``: a Celery project before and after the decorator.
"""
