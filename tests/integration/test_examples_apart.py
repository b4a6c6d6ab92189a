"""The two examples can run on one Redis: each keeps its keys (queues, dead letters, results)
under its own default prefix, so neither worker takes the other's tasks (same queue and task
names, different signatures). Read from each example's own settings, in its own interpreter
(both are a package called ``shop``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from celery_helpers import REPO_ROOT

EXAMPLES = REPO_ROOT / "example_project"

FLASK = """
import json
from shop.config import settings
conf = settings({})["CELERY"]
print(json.dumps([conf["broker_transport_options"]["key_prefix"],
                  conf["result_backend_transport_options"]["global_keyprefix"]]))
"""

DJANGO = """
import json, django
django.setup()
from django.conf import settings
print(json.dumps([settings.CELERY_BROKER_TRANSPORT_OPTIONS["key_prefix"],
                  settings.CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS["global_keyprefix"]]))
"""


def prefixes(directory: str, code: str) -> list[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SHOP_KEY_PREFIX", "CELERY_MSG_KEY_PREFIX", "PYTHONPATH")
    }
    env["DJANGO_SETTINGS_MODULE"] = "proj.settings"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=EXAMPLES / directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def test_the_flask_and_django_examples_use_different_default_key_prefixes():
    flask = prefixes("flask_app", FLASK)
    django = prefixes("django_site", DJANGO)

    assert flask == ["flask-shop:", "flask-shop:"]
    assert django == ["django-shop:", "django-shop:"]
    assert not flask[0].startswith(django[0]) and not django[0].startswith(flask[0])
