"""The celery-msg demo: the Flask example on a real (embedded) Redis, a worker killed mid-task.

Run it with ``make demo`` from a clone (it sets up the venv), or ``python -m example_project.demo``
from the clone's root. It lives next to the example it drives, not in the installed package.
"""
