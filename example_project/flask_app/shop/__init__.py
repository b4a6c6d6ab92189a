"""A shop's back office as a Flask app, with its background work on Celery and celery-msg.

The app factory follows Flask's own Celery pattern (flask.palletsprojects.com, "Background Tasks
with Celery"): the Celery app is built from ``app.config["CELERY"]``, its tasks run inside the
Flask app context, and it is kept in ``app.extensions["celery"]``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from celery import Celery, Task
from flask import Flask

import celery_msg

from .config import settings


def create_app(environ: Mapping[str, str] | None = None) -> Flask:
    """The app, configured from ``environ`` (default: the process environment)."""
    app = Flask(__name__)
    app.config.update(settings(os.environ if environ is None else environ))
    celery_init_app(app)
    from .routes import api

    app.register_blueprint(api)
    return app


def celery_init_app(app: Flask) -> Celery:
    class FlaskTask(Task):  # type: ignore[misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with app.app_context():
                return self.run(*args, **kwargs)

    celery_app = Celery(app.name, task_cls=FlaskTask)
    celery_app.config_from_object(app.config["CELERY"])
    # The one celery-msg line: policies and options are checked here, at start-up.
    celery_msg.configure(celery_app)
    celery_app.set_default()
    app.extensions["celery"] = celery_app
    from . import tasks  # noqa: F401  (registers the shared tasks with this app)

    return celery_app
