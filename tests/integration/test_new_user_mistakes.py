"""The mistakes a new user makes are loud: a worker that would lose messages refuses to start
(naming the fix), a scheme typo says "did you mean celery-msg://", a ``celery-msg://`` URL
works outside the app module in each documented way, and policies that cannot act are warned
about at worker start. Each app is a module written to the test's directory and run by a real
``celery worker`` (or a clean interpreter), as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest
from celery import Celery
from celery_helpers import Worker

import celery_msg
from celery_msg import ConfigurationError, Policies, Policy, Retry
from celery_msg.startup import PolicyNotAppliedWarning

if TYPE_CHECKING:
    from conftest import Server

#: Seconds a worker that refuses to start may take to exit (it imports Celery first).
EXIT_TIMEOUT = 60.0


def write_app(directory: Path, body: str, name: str = "proj_app") -> str:
    (directory / f"{name}.py").write_text(textwrap.dedent(body))
    return name


def broker_url(server: Server, scheme: str = "celery-msg") -> str:
    return f"{scheme}://{urlsplit(server.url).netloc}/0"


def prefixed_app(server: Server, rest: str = "") -> str:
    """An app module's source: a Celery app ``app`` on ``server`` whose keys start with the
    worker's prefix (``PROJ_PREFIX``, set by :func:`worker`), then ``rest``."""
    head = f"""
        import os
        from celery import Celery

        app = Celery("proj", broker="{broker_url(server)}")
        app.conf.broker_transport_options = {{"key_prefix": os.environ["PROJ_PREFIX"]}}
    """
    return textwrap.dedent(head) + textwrap.dedent(rest)


def worker(tmp_path: Path, app: str, prefix: str, queues: tuple[str, ...] = ("celery",)) -> Worker:
    return Worker(
        {"PROJ_PREFIX": prefix},
        tmp_path / "worker.log",
        name=f"w-{prefix.strip(':')}",
        queues=queues,
        app=app,
        cwd=tmp_path,
    )


def clean_python(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python *argv`` in a fresh interpreter that has imported nothing of ours."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        timeout=EXIT_TIMEOUT,
    )


# -- 1. forgetting configure() -------------------------------------------------------------

POLICIES_WITHOUT_CONFIGURE = """
    from celery import Celery
    from celery_msg import Policies, Policy, Retry

    app = Celery("proj", broker="{url}")
    app.conf.msg_policies = Policies(default=Policy(retry=Retry(max_retries=3)))

    @app.task
    def fail():
        raise ValueError("boom")
"""

DJANGO_STYLE_WITHOUT_CONFIGURE = """
    from celery import Celery
    from celery_msg import Policies, Policy

    class Settings:
        CELERY_BROKER_URL = "{url}"
        CELERY_MSG_POLICIES = Policies(default=Policy(ack="late"))

    app = Celery("proj")
    app.config_from_object(Settings, namespace="CELERY")
"""


@pytest.mark.parametrize(
    "source", [POLICIES_WITHOUT_CONFIGURE, DJANGO_STYLE_WITHOUT_CONFIGURE], ids=["conf", "django"]
)
def test_a_worker_with_policies_but_no_configure_call_refuses_to_start_naming_the_fix(
    server: Server, prefix: str, tmp_path: Path, source: str
):
    app = write_app(tmp_path, source.format(url=broker_url(server)))
    started = worker(tmp_path, app, prefix).spawn()

    code = started.wait_exit(EXIT_TIMEOUT)

    log = started.log()
    assert code != 0, log
    assert "celery_msg.configure(app) was not called" in log
    assert "ready." not in log


def test_a_worker_of_a_celery_msg_app_that_never_called_configure_warns_at_start(
    server: Server, prefix: str, tmp_path: Path
):
    # No `import celery_msg` at all: `celery -A` imports it (our celery.commands entry point).
    app = write_app(tmp_path, prefixed_app(server))
    started = worker(tmp_path, app, prefix).start()

    assert "never called celery_msg.configure(app)" in started.log()
    started.kill()


def test_configure_with_policies_on_a_broker_that_is_not_celery_msg_is_an_error():
    app = Celery("proj", broker="redis://127.0.0.1:6379/0")

    with pytest.raises(ConfigurationError, match="policies need a celery-msg:// broker"):
        celery_msg.configure(app, policies=Policies(default=Policy(ack="late")))


def test_configure_without_policies_on_another_broker_still_works():
    app = Celery("proj", broker="redis://127.0.0.1:6379/0")

    celery_msg.configure(app)

    assert app.conf.worker_consumer == "celery_msg.app:Consumer"


# -- 2. scheme typos -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scheme", "meant"),
    [
        ("celery_msg", "celery-msg"),
        ("celerymsg", "celery-msg"),
        ("celery-msg+redis", "celery-msg"),
        ("celery_msgs", "celery-msgs"),
        ("celery-mgs", "celery-msgs"),
    ],
)
def test_configure_with_a_scheme_close_to_ours_fails_with_did_you_mean(scheme: str, meant: str):
    app = Celery("proj", broker=f"{scheme}://127.0.0.1:6379/0")

    with pytest.raises(ConfigurationError, match=f"did you mean {meant}://"):
        celery_msg.configure(app)


@pytest.mark.parametrize("scheme", ["redis", "rediss", "amqp", "memory", "sqs"])
def test_other_brokers_schemes_are_not_taken_for_typos(scheme: str):
    app = Celery("proj", broker=f"{scheme}://127.0.0.1:6379/0")

    celery_msg.configure(app)


def test_a_worker_with_a_scheme_typo_refuses_to_start_with_did_you_mean(
    server: Server, prefix: str, tmp_path: Path
):
    url = broker_url(server, scheme="celery_msg")
    app = write_app(tmp_path, f'from celery import Celery\napp = Celery("proj", broker="{url}")\n')
    started = worker(tmp_path, app, prefix).spawn()

    code = started.wait_exit(EXIT_TIMEOUT)

    assert code != 0
    assert "did you mean celery-msg://" in started.log()


# -- 3. a bare URL outside Celery's app module ---------------------------------------------

ROUND_TRIP = """
    import kombu
    with kombu.Connection({args}) as conn:
        queue = conn.SimpleQueue("bare")
        queue.put({{"n": 1}})
        print("got", queue.get(timeout=5).payload)
"""


@pytest.mark.parametrize(
    "args",
    [
        '"{url}", transport="celery_msg.transport:Transport", '
        'transport_options={{"key_prefix": "{prefix}"}}',
    ],
    ids=["transport-class"],
)
def test_a_bare_url_works_in_a_clean_interpreter_with_the_transport_class(
    server: Server, prefix: str, tmp_path: Path, args: str
):
    code = ROUND_TRIP.format(args=args.format(url=broker_url(server), prefix=prefix))

    done = clean_python(tmp_path, "-c", textwrap.dedent(code))

    assert done.returncode == 0, done.stderr
    assert "got {'n': 1}" in done.stdout


def test_a_bare_url_works_in_a_test_run_by_pytest_through_its_plugin(
    server: Server, prefix: str, tmp_path: Path
):
    test = ROUND_TRIP.format(
        args=f'"{broker_url(server)}", transport_options={{"key_prefix": "{prefix}"}}'
    )
    body = "\n    ".join(textwrap.dedent(test).strip().splitlines())
    (tmp_path / "test_bare.py").write_text(f"def test_bare():\n    {body}\n")

    done = clean_python(tmp_path, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s")

    assert done.returncode == 0, done.stdout + done.stderr
    assert "got {'n': 1}" in done.stdout
    assert "1 passed" in done.stdout


def test_without_the_plugin_or_the_transport_class_a_bare_url_is_unknown_to_kombu(
    server: Server, tmp_path: Path
):
    # What the two ways above fix.
    done = clean_python(
        tmp_path, "-c", f'import kombu\nkombu.Connection("{broker_url(server)}").connect()\n'
    )

    assert done.returncode != 0
    assert "No such transport: celery-msg" in done.stderr


# -- 5. policies that cannot act -----------------------------------------------------------


def test_policies_for_an_unused_queue_or_an_unmatched_task_glob_are_warned_about_at_start(
    server: Server, prefix: str, tmp_path: Path
):
    rest = """
        import celery_msg
        from celery_msg import Policies, Policy

        app.conf.task_routes = {"proj_app.send": {"queue": "emails"}}
        app.conf.msg_policies = Policies(
            queues={"emails": Policy(ack="late"), "emials": Policy(ack="late")},
            tasks={"proj_app.*": Policy(ack="late"), "billing.*": Policy(ack="early")},
        )
        celery_msg.configure(app)

        @app.task
        def send():
            return 1
    """
    app = write_app(tmp_path, prefixed_app(server, rest))
    started = worker(tmp_path, app, prefix).start()
    log = started.log()
    started.kill()

    assert "policy for queue 'emials': no route, declared queue or -Q queue uses it" in log
    assert "policy for task 'billing.*': matches no task registered on this worker" in log
    assert "'emails'" not in log
    assert "'proj_app.*'" not in log


def test_configure_warns_that_eager_tasks_run_without_the_policies():
    app = Celery("proj", broker="celery-msg://127.0.0.1:6379/0")
    app.conf.task_always_eager = True

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        celery_msg.configure(app, policies=Policies(default=Policy(retry=Retry(max_retries=2))))

    assert [w.category for w in caught] == [PolicyNotAppliedWarning]
    assert "not applied" in str(caught[0].message)


# -- 4. a config written for kombu's redis transport -----------------------------------------


def test_two_apps_that_global_keyprefix_keeps_apart_do_not_share_queues(
    server: Server, prefix: str
):
    import kombu

    def connection(app: str) -> kombu.Connection:
        options = {"global_keyprefix": f"{prefix}{app}:", "client_name": f"kombu-config-{app}"}
        return kombu.Connection(broker_url(server), transport_options=options)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # honoured options warn about nothing
        with connection("a") as a, connection("b") as b:
            a.SimpleQueue("signups").put({"from": "a"})
            queue_b = b.SimpleQueue("signups")
            with pytest.raises(queue_b.Empty):
                queue_b.get(timeout=0.2)
            assert a.SimpleQueue("signups").get(timeout=5).payload == {"from": "a"}
            with server.process.client() as client:
                names = {c["name"] for c in client.client_list()}
            assert {"kombu-config-a", "kombu-config-b"} <= names
