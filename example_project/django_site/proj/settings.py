"""Settings of the shop's back office: Django, then Celery on celery-msg.

Everything that differs between a laptop, CI and production comes from the environment:

- ``CELERY_MSG_REDIS_URL``  the Redis of the broker and the result backend
  (default ``redis://127.0.0.1:6379/0``; ``rediss://`` for TLS)
- ``CELERY_MSG_KEY_PREFIX`` prefix of every key the app writes (default ``django-shop:``;
  the Flask example uses ``flask-shop:``)
- ``SHOP_DATA_DIR``         where tasks write reports and the activity log (default: a temp dir)
- ``SHOP_OUTBOX``           where e-mails are written as .eml files (default:
  ``$SHOP_DATA_DIR/outbox``)
- ``SHOP_CACHE_DIR``        this host's cache (default: a temp dir)
- ``DJANGO_DEBUG``          ``1`` for debug pages (default ``0``)
- ``DJANGO_SECRET_KEY``, ``DJANGO_ALLOWED_HOSTS``, ``DJANGO_DB_PATH``
"""

import os
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from kombu import Queue
from kombu.common import Broadcast

from celery_msg import DeadLetter, Exponential, Policies, Policy, Retry

BASE_DIR = Path(__file__).resolve().parent.parent

# --- Django --------------------------------------------------------------------------------

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "django-insecure-example-only-do-not-deploy")
DEBUG = os.environ.get("DJANGO_DEBUG", "0").lower() in ("1", "true", "yes", "on")
ALLOWED_HOSTS = os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "shop.apps.ShopConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]

ROOT_URLCONF = "proj.urls"
WSGI_APPLICATION = "proj.wsgi.application"
APPEND_SLASH = False

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.environ.get("DJANGO_DB_PATH", str(BASE_DIR / "db.sqlite3")),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True

# Each host keeps hot data (rendered product pages, prices) in a cache on its local disk: that is
# why invalidating a key is a broadcast to every worker rather than a task for one of them.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.filebased.FileBasedCache",
        "LOCATION": os.environ.get("SHOP_CACHE_DIR")
        or str(Path(tempfile.gettempdir()) / "shop-backoffice-cache"),
    }
}

# --- The shop ------------------------------------------------------------------------------

SHOP_DATA_DIR = Path(
    os.environ.get("SHOP_DATA_DIR") or Path(tempfile.gettempdir()) / "shop-backoffice"
)
SHOP_OUTBOX = Path(os.environ.get("SHOP_OUTBOX") or SHOP_DATA_DIR / "outbox")
SHOP_REPORTS_DIR = SHOP_DATA_DIR / "reports"
#: One JSON line per thing a task did (which process, which worker, which attempt).
SHOP_ACTIVITY_LOG = SHOP_DATA_DIR / "activity.jsonl"
DEFAULT_FROM_EMAIL = "Shop <no-reply@shop.example>"

# --- Celery on celery-msg ------------------------------------------------------------------
# Read by proj/celery.py: app.config_from_object("django.conf:settings", namespace="CELERY").

REDIS_URL = os.environ.get("CELERY_MSG_REDIS_URL", "redis://127.0.0.1:6379/0")
KEY_PREFIX = os.environ.get("CELERY_MSG_KEY_PREFIX", "django-shop:")


def _celery_msg_url(redis_url: str) -> str:
    """redis://host:port/db -> celery-msg://host:port/db (rediss:// -> celery-msgs://)."""
    parts = urlsplit(redis_url)
    scheme = {"redis": "celery-msg", "rediss": "celery-msgs"}.get(parts.scheme)
    if scheme is None:
        raise ValueError(f"CELERY_MSG_REDIS_URL must be redis:// or rediss://, got {redis_url!r}")
    return parts._replace(scheme=scheme).geturl()


CELERY_BROKER_URL = _celery_msg_url(REDIS_URL)
CELERY_BROKER_TRANSPORT_OPTIONS = {
    # Several apps can share one Redis: every broker key starts with this.
    "key_prefix": KEY_PREFIX,
    # A worker that dies (SIGKILL, OOM, lost host) gives its tasks back after 5 s; a live
    # worker renews its leases every 5/3 s, however long its tasks run.
    "lease_timeout": 5.0,
    "sweep_interval": 1.0,
}

# Results in the same Redis, under the same prefix (celery-task-meta-* keys).
CELERY_RESULT_BACKEND = REDIS_URL
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS = {"global_keyprefix": KEY_PREFIX}
CELERY_RESULT_EXTENDED = True  # name, args, retries and worker of each task in its result
CELERY_RESULT_EXPIRES = 24 * 3600
CELERY_TASK_TRACK_STARTED = True  # GET /tasks/<id> shows STARTED while a report is built

CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TIMEZONE = TIME_ZONE
# Long tasks (reports) live next to short ones: take one message at a time per process.
CELERY_WORKER_PREFETCH_MULTIPLIER = 1

CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_QUEUES = (
    Queue("default"),
    Queue("emails"),
    Queue("reports"),
    Queue("webhooks"),
    # A fanout exchange "cache"; each worker consuming "cache" (-Q ...,cache) gets a queue of
    # its own bound to it, so a task routed there runs once on *every* worker.
    Broadcast("cache"),
)
CELERY_TASK_ROUTES = {
    "shop.tasks.send_welcome_email": {"queue": "emails"},
    "shop.tasks.send_reminder": {"queue": "emails"},
    "shop.tasks.build_report": {"queue": "reports"},
    "shop.tasks.call_webhook": {"queue": "webhooks"},
    "shop.tasks.invalidate_cache": {"queue": "cache"},
    # shop.tasks.charge_card and anything else: CELERY_TASK_DEFAULT_QUEUE ("default").
}

# What happens to a message when its task fails, times out or kills its worker, per queue.
# Checked when the app is configured: a bad field raises celery_msg.ConfigurationError.
CELERY_MSG_POLICIES = Policies(
    # Every queue: ack when the task ends (a failure is final and goes to the dead-letter
    # store, where someone can look at it and replay it); a message that killed its worker
    # five times is poison and is dead-lettered instead of run again.
    default=Policy(ack="late", max_deliveries=5),
    queues={
        # "late", not "early": the outbox file is named after the task id, so running the task
        # again after a crash rewrites the same file rather than sending a second e-mail; a
        # welcome e-mail lost with a crashed worker ("early": at most once) would just be lost.
        # With a real SMTP relay, where a duplicate is worse than a miss, choose "early".
        "emails": Policy(ack="late"),
        # Reports are idempotent (same id, same file) and must finish: ack only on success, so
        # a killed pool process or a time limit runs the report again (bounded by
        # max_deliveries). A live worker renews its lease, so a long report runs once.
        "reports": Policy(ack="on_success"),
        # Partners' endpoints go down: retry connection problems with exponential backoff
        # (0.5 s, 1 s, 2 s, 4 s, capped at 5 s, with full jitter); the retries wait in Redis,
        # not in a worker. A bad URL (ValueError) is not retried.
        "webhooks": Policy(
            retry=Retry(
                max_retries=4,
                backoff=Exponential(base=0.5, factor=2, cap=5),
                retry_on=(ConnectionError, TimeoutError),
                give_up_on=(ValueError,),
            )
        ),
        # Payments: never retried blindly; a failed charge is kept for a month in the
        # dead-letter store for `celery -A proj msg dlq list/show/replay`.
        "default": Policy(dead_letter=DeadLetter(max_length=100_000, max_age=30 * 24 * 3600.0)),
    },
)
