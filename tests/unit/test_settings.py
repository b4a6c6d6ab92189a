"""celery_msg.settings.FastSettings against Celery's own Settings: the same answer (or the same
KeyError) for every setting Celery defines, under every spelling, whatever changed since."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.app.defaults import _TO_OLD_KEY, DEFAULTS
from celery.app.utils import Settings

from celery_msg.settings import FastSettings, adopt

#: Every name Celery reads settings by: new names, old names, a few it does not know.
NAMES = sorted({*DEFAULTS, *_TO_OLD_KEY.values(), "no_such_setting", "NO_SUCH_SETTING", "x"})


def celerys(conf: Settings, name: str) -> tuple[str, Any]:
    """What Celery's own code path answers (the value, or the KeyError's text)."""
    try:
        return "value", Settings.__getitem__(conf, name)
    except KeyError as exc:
        return "missing", str(exc)


def ours(conf: Settings, name: str) -> tuple[str, Any]:
    try:
        return "value", FastSettings.__getitem__(conf, name)
    except KeyError as exc:
        return "missing", str(exc)


def same_everywhere(conf: Settings) -> None:
    for name in NAMES:
        assert ours(conf, name) == celerys(conf, name), name


def finalized(namespace: str | None = None, **changes: Any) -> Celery:
    app = Celery("settings-unit", set_as_current=False, namespace=namespace)
    app.conf.update(changes)
    app.conf.task_default_queue  # noqa: B018 (finalizes the configuration)
    adopt(app)
    return app


@pytest.mark.parametrize("namespace", [None, "CELERY"])
def test_every_setting_reads_as_celery_reads_it(namespace: str | None):
    app = finalized(namespace)
    assert type(app._conf) is FastSettings
    same_everywhere(app._conf)


def test_changes_made_every_way_celery_offers_are_read_at_once_after_reads():
    app = finalized(task_serializer="pickle")
    conf = app._conf
    same_everywhere(conf)  # every key's spellings remembered now
    conf.task_always_eager = True
    conf["task_default_priority"] = 5
    conf.update(task_send_sent_event=True, CELERY_TASK_TRACK_STARTED=True)
    conf.setdefault("task_repr_maxlevels", 9)
    conf.add_defaults({"task_acks_late": True, "my_own_setting": 1})
    conf.changes["result_expires"] = 7  # a map edited in place
    conf.maps[-1]["broker_pool_limit"] = 3
    del conf["task_serializer"]
    same_everywhere(conf)
    assert conf.task_always_eager is True
    assert conf["task_default_priority"] == 5
    assert conf.task_send_sent_event is True
    assert conf.result_expires == 7
    assert conf.my_own_setting == 1


def test_a_configuration_read_before_the_app_is_finalized_reads_as_celerys():
    app = Celery("settings-unit", set_as_current=False)
    app.conf.update(task_default_queue="q1")
    adopt(app)  # the pending settings object, whose first map finalizes on first read
    pending = app._conf
    assert type(pending) is FastSettings
    assert pending.task_default_queue == "q1"
    adopt(app)  # Celery made a new settings object when it finalized
    assert type(app._conf) is FastSettings
    same_everywhere(app._conf)


def test_adopting_stores_no_setting_and_leaves_a_subclass_alone():
    app = finalized()
    assert "__class__" not in app._conf.changes
    assert app._conf.get("__class__") is None

    class Mine(Settings):  # type: ignore[misc]
        pass

    other = Celery("settings-unit", set_as_current=False)
    other._conf = Mine({}, [dict(DEFAULTS)])
    adopt(other)
    assert type(other._conf) is Mine
