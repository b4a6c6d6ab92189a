"""celery-msg: a reliable Redis broker for Celery.

Importing this package registers the ``celery-msg://`` and ``celery-msgs://`` (TLS) URL schemes
with kombu, so that ``broker_url = "celery-msg://localhost:6379/0"`` selects
:class:`celery_msg.transport.Transport`.
"""

from __future__ import annotations

from kombu.transport import TRANSPORT_ALIASES

from .app import configure
from .bulk import BulkPublishError, bulk
from .errors import (
    AuthenticationFailed,
    BrokerConnectionError,
    CeleryMsgError,
    ConfigurationError,
    LeaseLost,
    MessageNotFound,
    PermissionDenied,
    PoisonMessage,
    ScriptError,
)
from .policy import DeadLetter, Exponential, Fixed, Policies, Policy, Retry, Unique
from .startup import connect_worker_checks

__version__ = "0.1.0"

TRANSPORT_ALIASES.setdefault("celery-msg", "celery_msg.transport:Transport")
TRANSPORT_ALIASES.setdefault("celery-msgs", "celery_msg.transport:Transport")
connect_worker_checks()

__all__ = [
    "AuthenticationFailed",
    "BrokerConnectionError",
    "BulkPublishError",
    "CeleryMsgError",
    "ConfigurationError",
    "DeadLetter",
    "Exponential",
    "Fixed",
    "LeaseLost",
    "MessageNotFound",
    "PermissionDenied",
    "PoisonMessage",
    "Policies",
    "Policy",
    "Retry",
    "ScriptError",
    "Unique",
    "__version__",
    "bulk",
    "configure",
]
