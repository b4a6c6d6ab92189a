"""``import celery_msg`` registers with kombu and Celery whichever is loaded first, and the core
loads neither: each case runs in a fresh interpreter, where import order is real."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("module", ["celery_msg", "celery_msg.core", "celery_msg.deadletters"])
def test_importing_the_core_loads_neither_celery_nor_kombu(module: str):
    loaded = run(
        f"import sys, {module}; print(sorted(m for m in ('celery', 'kombu') if m in sys.modules))"
    )
    assert loaded == "[]"


@pytest.mark.parametrize(
    "imports",
    ["import celery_msg; import kombu.transport", "import kombu.transport; import celery_msg"],
)
def test_the_schemes_are_kombu_transports_whichever_is_imported_first(imports: str):
    found = run(
        f"{imports}\nfrom kombu.transport import resolve_transport as r\n"
        "print(r('celery-msg').__module__, r('celery-msgs').__module__)"
    )
    assert found == "celery_msg.transport celery_msg.transport"


@pytest.mark.parametrize(
    "imports",
    [
        "import celery_msg; from celery import Celery",
        "from celery import Celery; import celery_msg",
    ],
)
def test_the_worker_checks_are_connected_whichever_is_imported_first(imports: str):
    found = run(
        f"{imports}\nfrom celery import signals\n"
        "print(sorted(uid for (uid, _), _ in signals.celeryd_init.receivers"
        " + signals.celeryd_after_setup.receivers))"
    )
    assert found == "['celery_msg.init', 'celery_msg.setup']"


def test_configure_is_loaded_on_first_use():
    assert run("import celery_msg; print(celery_msg.configure.__module__)") == "celery_msg.app"
