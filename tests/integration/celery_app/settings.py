"""What the test app reads from its environment; the tests write it with :meth:`environ`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from urllib.parse import urlsplit

ENV_PREFIX = "CELERY_MSG_TEST_"

#: Queue every unrouted task goes to (Celery's default name).
DEFAULT_QUEUE = "celery"
#: Queue that ``task_routes`` sends the ``routed`` task to.
SECOND_QUEUE = "second"
#: The brokers the test app can use (URL schemes).
TRANSPORTS = ("celery-msg", "redis")


def _flag(text: str) -> bool:
    return text == "True"


@dataclass(frozen=True)
class Settings:
    """One test's app configuration; every field travels as ``CELERY_MSG_TEST_<NAME>``."""

    #: ``redis://127.0.0.1:PORT`` of the test server (no database number).
    redis_url: str
    #: Key prefix of the broker, the result backend and the task event list.
    prefix: str
    lease_timeout: float = 10.0
    sweep_interval: float = 0.5
    binding_ttl: float = 60.0
    prefetch_multiplier: int = 1
    #: celery-msg's max_deliveries (0 = unlimited).
    max_deliveries: int = 0
    #: Name of a policy profile in :data:`celery_app.policies.PROFILES` ("" = no policies).
    policies: str = ""
    #: Celery's worker_lost_wait: how long a prefork pool waits for the result of a job whose
    #: child died before failing it with WorkerLostError.
    worker_lost_wait: float = 10.0
    #: ACL user and password of the broker URL only ("" = none; the result backend and the
    #: event list keep the server's default user).
    broker_user: str = ""
    broker_password: str = ""
    #: The broker: ``celery-msg`` (ours) or ``redis`` (kombu's redis transport, for comparing).
    transport: str = "celery-msg"
    #: Whether the app calls :func:`celery_msg.configure` (else the transport options are set
    #: by hand, as an app that only changes its broker URL would).
    configure: bool = True
    #: Name of a ``Broadcast`` exchange added to ``task_queues`` ("" = none): the worker's
    #: broadcast queue is declared without a name, as in Celery's documentation.
    broadcast: str = ""
    #: A whole broker URL that replaces the one built from ``redis_url`` ("" = none): a
    #: ``celery-msg+sentinel://`` URL; the result backend and the event list stay on
    #: ``redis_url``, a server no test kills.
    broker_url_override: str = ""
    #: The Sentinel master name (transport option ``master_name``; "" = none).
    master_name: str = ""
    #: TLS: the CA file the broker's servers are verified with (``broker_use_ssl``; with
    #: ``master_name`` the sentinels' too, through ``sentinel_kwargs``; "" = no TLS options).
    broker_ca_file: str = ""

    @property
    def broker_url(self) -> str:
        if self.broker_url_override:
            return self.broker_url_override
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport {self.transport!r}: use one of {TRANSPORTS}")
        credentials = f"{self.broker_user}:{self.broker_password}@" if self.broker_user else ""
        return f"{self.transport}://{credentials}{urlsplit(self.redis_url).netloc}/0"

    @property
    def backend_url(self) -> str:
        return f"{self.redis_url}/1"

    @property
    def events_url(self) -> str:
        return f"{self.redis_url}/0"

    @property
    def events_key(self) -> str:
        """Redis list (database 0) where tasks and control commands record what they did."""
        return f"{self.prefix}events"

    def environ(self) -> dict[str, str]:
        return {f"{ENV_PREFIX}{f.name.upper()}": str(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Settings:
        values: dict[str, object] = {}
        for f in fields(cls):
            name = f"{ENV_PREFIX}{f.name.upper()}"
            if name in environ:
                kind = {"float": float, "int": int, "bool": _flag}.get(str(f.type), str)
                values[f.name] = kind(environ[name])
        if "redis_url" not in values or "prefix" not in values:
            raise RuntimeError(
                f"the test app needs {ENV_PREFIX}REDIS_URL and {ENV_PREFIX}PREFIX in its "
                "environment"
            )
        return cls(**values)  # type: ignore[arg-type]
