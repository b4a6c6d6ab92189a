"""Benchmarks of celery-msg against kombu's redis transport; run ``python -m bench``."""
