# Load the Celery app whenever Django starts, so that @shared_task binds to it (Celery's Django
# convention: https://docs.celeryq.dev/en/stable/django/first-steps-with-django.html).
from .celery import app as celery_app

__all__ = ("celery_app",)
