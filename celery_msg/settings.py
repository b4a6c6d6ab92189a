"""Reading a configured app's settings with Celery's own answers, for fewer instructions.

Celery reads its settings six times per published task (in ``Task.apply_async``, twice in
``send_task``, twice in ``as_task_v2`` for ``task_repr_maxlevels``, once in the router). Each
read of Celery's ``Settings`` (``ConfigurationView.__getitem__``) builds the key's spellings
(the namespace prefix, the old and new setting names) and tries each in every map, catching a
``KeyError`` per miss: 152,000 of the 730,000 instructions Celery and kombu spent per
``.delay()`` inside a bulk block (``python -m bench.instructions delay-bulk-nopublish``).

:class:`FastSettings` answers exactly what Celery's ``__getitem__`` answers, read at the same
moment: it remembers only a key's spellings (a pure function of the key, the prefix and the
key converters, which are fixed when the view is made), never a value, so a setting changed
at any time and by any means (``conf.x = ...``, ``update``, ``add_defaults``, a map edited in
place) is seen by the next read. In a plain ``dict`` map a spelling is looked up with ``get``
instead of a caught ``KeyError`` (the same answer for a ``dict``); any other map (Celery's
``PendingConfiguration`` before the app is finalized, a user's mapping) is read as Celery reads
it, and a key found nowhere goes to Celery's own ``__getitem__`` (its ``__missing__``, its
error message).

:func:`adopt` gives the class to an app's current settings object (Celery replaces that object
when it finalizes the configuration, and on ``config_from_object``: the publish hook in
:mod:`celery_msg.canvas` adopts again). Pinned by ``tests/unit/test_settings.py``: every
setting Celery defines, under its new and old names, with and without a namespace, before and
after changes made every way Celery offers, read through both classes.
"""

from __future__ import annotations

from typing import Any

from celery.app.utils import Settings

#: A value no setting holds.
_MISSING: Any = object()
#: Where a settings object keeps its keys' spellings (in ``__dict__``: Celery's ``__setattr__``
#: would store an attribute as a setting).
_SPELLINGS = "_celery_msg_spellings"


class FastSettings(Settings):  # type: ignore[misc]
    """Celery's ``Settings``, each key's spellings worked out once (see the module)."""

    def __getitem__(self, key: str) -> Any:
        spellings: dict[str, tuple[Any, ...]] | None = self.__dict__.get(_SPELLINGS)
        if spellings is None:
            spellings = self.__dict__[_SPELLINGS] = {}
        names = spellings.get(key)
        if names is None:
            names = spellings[key] = tuple(self._key(name) for name in self._to_keys(key))
        for mapping in self.maps:
            if type(mapping) is dict:
                for name in names:
                    value = mapping.get(name, _MISSING)
                    if value is not _MISSING:
                        return value
            else:
                for name in names:
                    try:
                        return mapping[name]
                    except KeyError:
                        pass
        return Settings.__getitem__(self, key)


def adopt(app: Any) -> None:
    """Make ``app``'s current settings object a :class:`FastSettings` (if it is Celery's
    ``Settings`` exactly: a subclass someone else made is left alone)."""
    conf = app._conf
    if type(conf) is Settings:
        object.__setattr__(conf, "__class__", FastSettings)  # Celery's would store a setting
