"""pytest plugin (entry point ``pytest11``): ``celery-msg://`` works in every test process.

kombu has no transport entry points: the scheme exists once :mod:`celery_msg` is imported. A
test that builds ``kombu.Connection("celery-msg://...")`` or an embedded worker
(``celery.contrib.testing``) from a settings module that never imports it would fail with
``No such transport``; pytest loads this plugin first, so it does not.
"""

from __future__ import annotations

import celery_msg  # noqa: F401  (registers the celery-msg:// and celery-msgs:// schemes)
