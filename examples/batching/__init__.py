"""LLM-style continuous batching: concurrent inputs of an async function share one model loop.

``python -m examples.batching`` shows the throughput rising with ``allow_concurrent_inputs``.
"""
