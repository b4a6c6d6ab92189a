"""Which server kinds the test session runs against (``CELERY_MSG_TEST_SERVERS``, a comma list,
default ``redis,valkey``; ``CELERY_MSG_TLS_SERVERS`` for TLS, default ``redis``).

Its own module, not ``conftest``: ``tests/conftest.py`` and ``tests/integration/conftest.py``
are both named ``conftest``, so ``from conftest import KINDS`` in a test module resolves to
whichever was imported first.
"""

from __future__ import annotations

import os
from typing import cast, get_args

import pytest

from celery_msg.testing import ServerKind


def _kinds_from_env(variable: str, default: str) -> list[ServerKind]:
    raw = os.environ.get(variable, default)
    kinds = [k.strip() for k in raw.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(get_args(ServerKind)))
    if unknown:
        raise pytest.UsageError(f"{variable}={raw!r}: unknown kinds {unknown}; use redis,valkey")
    return [cast(ServerKind, k) for k in kinds]


KINDS = _kinds_from_env("CELERY_MSG_TEST_SERVERS", "redis,valkey")
TLS_KINDS = _kinds_from_env("CELERY_MSG_TLS_SERVERS", "redis")
