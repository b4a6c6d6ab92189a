"""celery-msg: a reliable Redis broker for Celery.

Importing this package registers the ``celery-msg://`` and ``celery-msgs://`` (TLS) URL schemes
with kombu, so that ``broker_url = "celery-msg://localhost:6379/0"`` selects
:class:`celery_msg.transport.Transport`, and connects the worker start-up checks.

It imports neither kombu nor Celery itself (:mod:`celery_msg.registration` acts when they are
loaded) and loads :func:`configure` on first use: ``import celery_msg.core`` stays free of them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import registration
from .errors import (
    AuthenticationFailed,
    BrokerConnectionError,
    CeleryMsgError,
    ConfigurationError,
    LeaseLost,
    MessageNotFound,
    PartialFanout,
    PermissionDenied,
    PoisonMessage,
    ReplicationTimeout,
    ScriptError,
)
from .policy import DeadLetter, Exponential, Fixed, Policies, Policy, Retry, Unique

if TYPE_CHECKING:
    from .app import configure
    from .bulk_publish import BulkPublishError, bulk

__version__ = "0.1.0"

registration.install()


def __getattr__(name: str) -> Any:
    """``configure`` lives in the Celery layer: import it (and Celery) only when asked for;
    ``bulk`` and ``BulkPublishError`` likewise (they need the core and redis-py)."""
    if name == "configure":
        from .app import configure

        return configure
    if name in ("bulk", "BulkPublishError"):
        from . import bulk_publish as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "PartialFanout",
    "PermissionDenied",
    "PoisonMessage",
    "Policies",
    "Policy",
    "ReplicationTimeout",
    "Retry",
    "ScriptError",
    "Unique",
    "__version__",
    "bulk",
    "configure",
]
