"""I/O-bound calls: one HTTP call as a plain task, a sync ``@concurrent`` function and an async one.

``python -m examples.io_bound`` starts a slow local HTTP server and a node, and sends the
same calls through each of the three.
"""
