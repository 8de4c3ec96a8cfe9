"""Benchmarks of celery-concurrent against plain Celery on the same work."""
