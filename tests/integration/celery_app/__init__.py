"""A small Celery app for the worker integration tests, configured entirely from environment.

The tests build a :class:`~celery_app.settings.Settings`, start ``celery -A celery_app.worker``
with :meth:`Settings.environ` in its environment, and talk to it through an app built by
:func:`celery_app.tasks.create_app` from the same mapping.
"""
