"""What runs inside one container: a Celery worker dedicated to one function."""
