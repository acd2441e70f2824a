"""Load and speed: the soak run, and (later) benchmarks against bare Celery."""
