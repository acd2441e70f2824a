"""Load and speed: the soak run, and benchmarks against bare Celery and Dramatiq."""

#: the parts of a run, in order; ``python -m bench --only`` picks some
PARTS = ("commands", "sql", "fanout", "growth")
