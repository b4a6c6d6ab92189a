"""The Celery app of the project: ``celery -A proj worker`` finds ``app`` here."""

import os

from celery import Celery

import celery_msg

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")

app = Celery("proj")

# Every setting comes from Django's settings, under the CELERY_ prefix
# (CELERY_BROKER_URL -> broker_url, CELERY_MSG_POLICIES -> msg_policies, ...).
app.config_from_object("django.conf:settings", namespace="CELERY")

# Finds shop/tasks.py (and the tasks.py of any other installed app).
app.autodiscover_tasks()

# After config_from_object: configure() reads the loaded settings, validates the transport
# options and policies now (a typo fails at start-up, naming the field), and installs the worker
# consumer that dead-letters what it cannot run instead of acking it away.
celery_msg.configure(app)
