"""The module ``celery -A celery_app.worker worker`` loads: the app from this process's env."""

from __future__ import annotations

import os

from .tasks import create_app

app = create_app(os.environ)
