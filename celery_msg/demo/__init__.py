"""The celery-msg demo: a real worker on a real (embedded) Redis, killed mid-task, recovering.

Run it with ``python -m celery_msg.demo`` (``make demo`` from a clone does the set-up first).
"""
