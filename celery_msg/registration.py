"""Registers celery-msg with kombu and Celery once they are imported, without importing them.

Why not simply import kombu here: ``import celery_msg.core`` (the Redis core, used by the CLI,
benchmarks and tests without Celery) ran this package's ``__init__`` and paid ~160 ms for kombu
and Celery it never used. Yet ``import celery_msg`` must still make ``celery-msg://`` a kombu
transport and connect the worker start-up checks, whichever is imported first. So: when kombu or
Celery is already loaded, register now; otherwise a one-shot import hook registers right after
``kombu.transport`` (the scheme aliases) or ``celery.signals`` (the checks) has run.

The signal receivers are trampolines that import :mod:`celery_msg.startup` when a worker starts:
importing it inside the hook could meet a half-imported ``celery.app``.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

SCHEMES = ("celery-msg", "celery-msgs")
#: Sentinel URLs. kombu reads ``a+b://`` as transport ``a`` with the rest left for the transport
#: to parse (:func:`celery_msg.connection.sentinel_address`), but when it fails over to the next
#: ``;`` part it parses that one whole, as transport ``a+b``: so these are aliases too.
SENTINEL_SCHEMES = ("celery-msg+sentinel", "celery-msgs+sentinel")
#: Every broker URL scheme that selects celery-msg.
URL_SCHEMES = SCHEMES + SENTINEL_SCHEMES
TRANSPORT = "celery_msg.transport:Transport"
_lock = threading.Lock()


def register_schemes(kombu_transport: ModuleType) -> None:
    """``celery-msg://``, ``celery-msgs://`` (TLS) and their ``+sentinel`` forms select our
    transport."""
    for scheme in URL_SCHEMES:
        kombu_transport.TRANSPORT_ALIASES.setdefault(scheme, TRANSPORT)


def connect_checks(celery_signals: ModuleType) -> None:
    """Connect the worker start-up checks (idempotent: Celery dedupes by dispatch uid)."""
    celery_signals.celeryd_init.connect(_on_worker_init, weak=False, dispatch_uid="celery_msg.init")
    celery_signals.celeryd_after_setup.connect(
        _on_worker_setup, weak=False, dispatch_uid="celery_msg.setup"
    )


def _on_worker_init(*args: Any, **kwargs: Any) -> None:
    from .startup import on_worker_init

    on_worker_init(*args, **kwargs)


def _on_worker_setup(*args: Any, **kwargs: Any) -> None:
    from .startup import on_worker_setup

    on_worker_setup(*args, **kwargs)


_WHEN_LOADED: dict[str, Callable[[ModuleType], None]] = {
    "kombu.transport": register_schemes,
    "celery.signals": connect_checks,
}


def install() -> None:
    """Register with what is loaded; hook what is not (called once, by ``celery_msg``)."""
    with _lock:
        waiting = {}
        for name, action in _WHEN_LOADED.items():
            module = sys.modules.get(name)
            if module is not None and _initialised(module):
                action(module)
            else:
                waiting[name] = action
        if waiting and not any(isinstance(f, _AfterImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _AfterImport(waiting))


def _initialised(module: ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return not getattr(spec, "_initializing", False)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a watched module to act after it ran."""

    def __init__(self, waiting: dict[str, Callable[[ModuleType], None]]) -> None:
        self.waiting = waiting

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        action = self.waiting.get(fullname)
        if action is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenLoader(spec.loader, action)
                    with _lock:
                        self.waiting.pop(fullname, None)
                        if not self.waiting and self in sys.meta_path:
                            sys.meta_path.remove(self)
                return spec
        return None


class _ThenLoader(importlib.abc.Loader):
    """The real loader, then ``action(module)``; every other attribute is the real loader's."""

    def __init__(self, loader: Any, action: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._action = action

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        module: ModuleType | None = self._loader.create_module(spec)
        return module

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._action(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)
