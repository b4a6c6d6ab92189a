"""The ``argsrepr`` / ``kwargsrepr`` headers of a task message, as Celery writes them, at a
fifth of the cost for the common arguments.

Celery writes both headers of every task message with ``celery.utils.saferepr.saferepr``
(``amqp.as_task_v2``): a streaming repr in Python, token by token, so that a huge or recursive
argument cannot blow up a publish. For the arguments most tasks get (a flat tuple, list or dict
of numbers, ``None`` and plain strings, shorter than the limit) it writes exactly what ``repr``
writes: 71,000 of the 751,000 instructions of a ``.delay()`` in a bulk block
(``python -m bench.instructions delay-bulk``) went into the two calls.

:func:`saferepr` answers those arguments with ``repr`` and hands everything else to Celery's
own function (nested containers, other types, strings ``repr`` would escape or quote
differently, a text at or over the limit, a ``seen`` set, a negative ``maxlevels``). What is
sent does not change: ``tests/unit/test_reprs.py`` compares both functions over generated
arguments, limits and levels. :func:`install` puts it where ``as_task_v2`` looks it up
(``celery.app.amqp.saferepr``), only while that is still Celery's own: for the whole process,
so an app that did not call ``configure`` gets the same text faster too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import celery.app.amqp
from celery.utils.saferepr import saferepr as celerys_saferepr

logger = logging.getLogger(__name__)

#: Types whose ``repr`` is what Celery's saferepr writes for them (``str(x)`` for a number,
#: ``repr(None)``), exact types only (a subclass may repr itself otherwise).
_SCALARS = frozenset({int, float, bool, type(None)})


def _plain(value: Any) -> bool:
    """Whether ``repr(value)`` is Celery's text for ``value`` inside a flat container."""
    kind = type(value)
    if kind is str:
        # Celery quotes with ' and escapes only ': repr agrees for printable text without
        # either quote character's escape or a backslash.
        return value.isprintable() and "'" not in value and "\\" not in value
    return kind in _SCALARS


def saferepr(o: Any, maxlen: int | None = None, maxlevels: int = 3, seen: Any = None) -> str:
    """Celery's ``saferepr(o, maxlen, maxlevels, seen)``, through ``repr`` when that is the
    same text (see the module)."""
    if seen is None and maxlen is not None and (not maxlevels or maxlevels > 0):
        kind = type(o)
        if ((kind is tuple or kind is list) and all(map(_plain, o))) or (
            kind is dict and all(_plain(k) and _plain(v) for k, v in o.items())
        ):
            try:
                text = repr(o)
            except ValueError:  # an int too long for str(): Celery's raises the same
                pass
            else:
                if len(text) < maxlen:  # nothing cut: the text is Celery's
                    return text
    return str(celerys_saferepr(o, maxlen, maxlevels, seen))


@contextmanager
def celerys_own() -> Iterator[None]:
    """Celery's own saferepr inside the block (benchmarks: kombu's transport as it is, in a
    process where a configured app installed :func:`saferepr`)."""
    installed = celery.app.amqp.saferepr
    celery.app.amqp.saferepr = celerys_saferepr
    try:
        yield
    finally:
        celery.app.amqp.saferepr = installed


def install() -> None:
    """Make Celery's task messages use :func:`saferepr` (once per process)."""
    current = getattr(celery.app.amqp, "saferepr", None)
    if current is saferepr:
        return
    if current is not celerys_saferepr:
        logger.warning(
            "celery.app.amqp.saferepr is not Celery's saferepr (replaced by someone else?): "
            "left as it is"
        )
        return
    celery.app.amqp.saferepr = saferepr
