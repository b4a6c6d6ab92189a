"""The dashboard in a real browser: headless chromium (Playwright) against ``celery msg web``
running as its own process, next to a real ``celery worker``, on a real server.

Effects are counted outside the dashboard: a replayed task's runs in the task event list,
purges in the broker's counts. The overview and dead-letter tests save the screenshots that
README.md shows (docs/dashboard-*.png) when run with CELERY_MSG_SCREENSHOTS=1.
"""

from __future__ import annotations

import base64
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from celery_app.settings import DEFAULT_QUEUE, SECOND_QUEUE
from celery_helpers import Stack, stack_factory, wait_until
from playwright.sync_api import Page, expect, sync_playwright
from test_cli import bury, fail_on_worker
from web_helpers import WebServer, launch_chromium, screenshot_dir

if TYPE_CHECKING:
    from conftest import Server

StackFactory = Callable[..., Stack]
#: The page refreshes its counts every 5 s (htmx); a change must show within two refreshes.
REFRESH_TIMEOUT_MS = 12_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 420})
    tab = context.new_page()
    dialogs: list[str] = []
    errors: list[str] = []
    tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    # A script error or a Content-Security-Policy violation shows as a console error.
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: errors.append(str(e)))
    yield tab
    context.close()
    assert dialogs == [], f"the page opened dialogs: {dialogs}"
    assert errors == [], f"the page logged errors: {errors}"


@pytest.fixture
def stack(server: Server, prefix: str, tmp_path: Path) -> Iterator[Stack]:
    with stack_factory(server.url, prefix, tmp_path) as make:
        yield make()


@pytest.fixture
def web(stack: Stack, tmp_path: Path) -> Iterator[WebServer]:
    server = WebServer(stack, tmp_path / "web.log", args=["--sample-interval", "0.5"])
    try:
        yield server.start()
    finally:
        server.close()
        print(server.log())  # shown by pytest only when the test failed


def _row(page: Page, queue: str) -> Any:
    return page.locator(f'#queue-rows tr[data-queue="{queue}"]')


def test_the_overview_shows_every_queue_and_refreshes_itself(
    stack: Stack, web: WebServer, page: Page, tmp_path: Path
):
    stack.worker()
    results = [stack.task("add").delay(i, i) for i in range(20)]
    assert [r.get(timeout=15) for r in results] == [2 * i for i in range(20)]
    fail_on_worker(stack, "boom")
    for _ in range(3):
        stack.task("routed").delay()  # no worker consumes the second queue: they wait
    stack.settled(DEFAULT_QUEUE, dead=1)

    fetched: list[str] = []
    page.on("request", lambda request: fetched.append(request.url))
    page.goto(web.url + "/")

    expect(page.locator("h1")).to_have_text("Queues")
    celery = _row(page, DEFAULT_QUEUE)
    expect(celery.locator("td.dead")).to_have_text("1")
    expect(celery.locator("td.ready")).to_have_text("0")
    second = _row(page, SECOND_QUEUE)
    expect(second.locator("td.ready")).to_have_text("3")
    expect(second.locator("td.oldest")).to_have_text(re.compile(r"^\d+s$"))
    expect(second.locator("td.consumers")).to_have_text("0")
    expect(celery.locator("td.consumers")).to_have_text("1")  # the worker
    expect(celery.locator("td.oldest")).to_have_text("-")  # nothing waits
    # The worker's remote-control mailbox is listed apart, as plumbing.
    expect(page.locator("#queue-rows tr.kind-pidbox").first).to_be_visible()

    # A new dead letter and more traffic show up without reloading the page.
    bury(stack, task="reports.daily", exc_type="builtins.ValueError")
    more = [stack.task("add").delay(i, 1) for i in range(30)]
    assert [r.get(timeout=15) for r in more] == [i + 1 for i in range(30)]
    expect(celery.locator("td.dead")).to_have_text("2", timeout=REFRESH_TIMEOUT_MS)
    # The sampler (every 0.5 s here) has drawn the publish rate as a line.
    expect(celery.locator("td.spark polyline").first).to_be_attached(timeout=REFRESH_TIMEOUT_MS)
    # Everything the page loaded (htmx, the stylesheet, the refreshes) came from the dashboard.
    assert {url.split("/")[2] for url in fetched} == {f"127.0.0.1:{web.port}"}
    assert any(url.endswith("/static/htmx.min.js") for url in fetched)
    assert any(url.endswith("/overview/rows") for url in fetched)
    page.screenshot(path=str(screenshot_dir(tmp_path) / "dashboard-overview.png"), full_page=True)


def test_filter_dead_letters_and_replay_one_that_then_runs_on_the_worker(
    stack: Stack, web: WebServer, page: Page, tmp_path: Path
):
    stack.worker()
    # `attempt` fails its first run only: replayed, it runs again and succeeds.
    flaky = stack.task("attempt").delay(1, "flaky")
    with pytest.raises(Exception, match="run 1 of flaky"):
        flaky.get(timeout=15)
    [boom] = fail_on_worker(stack, "boom")
    old = bury(stack, task="reports.daily", exc_type="builtins.KeyError", age=3 * 3600)
    poison = bury(stack, task="billing.charge", reason="poison", age=600)
    stack.settled(DEFAULT_QUEUE, dead=4)
    assert len(stack.events("start")) == 1

    page.goto(web.url + "/dead")
    rows = page.locator("table.dead tbody tr")
    expect(rows).to_have_count(4)
    shots = screenshot_dir(tmp_path)
    page.screenshot(path=str(shots / "dashboard-dead-letters.png"), full_page=True)

    # The CLI's filters: task glob, exception type, reason, age.
    page.fill("input[name=task]", "att*")
    page.click("form.filters button")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-id", flaky.id)
    for field, value, expected in [
        ("exc_type", "KeyError", old),
        ("reason", "poison", poison),
        ("older_than", "1h", old),
    ]:
        page.goto(f"{web.url}/dead?{field}={value}")
        expect(rows).to_have_count(1)
        expect(rows.first).to_have_attribute("data-id", expected)
    page.goto(f"{web.url}/dead?task=fail&newer_than=5m")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-id", boom)

    # The record: decoded arguments, headers and traceback.
    page.goto(f"{web.url}/dead?task=att*")
    page.click(f'tr[data-id="{flaky.id}"] a')
    expect(page.locator("pre.args")).to_contain_text('"flaky"')
    expect(page.locator("pre.traceback")).to_contain_text("Transient: run 1 of flaky")

    # Replay it: asked first, then done, and counted.
    page.goto(f"{web.url}/dead?task=att*")
    page.check(f'tr[data-id="{flaky.id}"] input[type=checkbox]')
    page.click("button[value='replay selected']")
    expect(page.locator("h1")).to_have_text("Replay 1 dead message?")
    assert stack.broker.counts(DEFAULT_QUEUE)["dead"] == 4  # nothing done before confirming
    page.click("#confirm")
    expect(page.locator("#result")).to_have_text("Replayed 1 of 1 dead message")

    # The worker ran it a second time, and it succeeded (the result replaced the failure).
    runs = stack.wait_for_events("finish", 1, timeout=15)
    assert [(e.task, e.token) for e in runs] == [(flaky.id, "2")]
    assert [e.token for e in stack.events("start") if e.task == flaky.id] == ["1", "2"]
    fresh = stack.task("attempt").AsyncResult(flaky.id)
    assert wait_until(lambda: fresh.state == "SUCCESS", 10, "the SUCCESS result")
    assert fresh.result == 2
    stack.settled(DEFAULT_QUEUE, dead=3)

    # The look-up tells the same story as `celery msg inspect`.
    page.fill("form.lookup input", flaky.id)
    page.click("form.lookup button")
    expect(page.locator("#result-state")).to_have_text("SUCCESS")


def test_purge_all_matching_asks_first_and_reports_the_count(
    stack: Stack, web: WebServer, page: Page
):
    doomed = {bury(stack, task=f"reports.r{i}", exc_type="builtins.ValueError") for i in range(3)}
    kept = bury(stack, task="billing.charge", exc_type="builtins.ValueError")

    page.goto(f"{web.url}/dead?task=reports.*")
    expect(page.locator("table.dead tbody tr")).to_have_count(3)
    page.click("button[value='purge matching']")
    expect(page.locator("h1")).to_have_text("Purge 3 dead messages?")
    page.click("text=Cancel")
    assert stack.broker.counts(DEFAULT_QUEUE)["dead"] == 4

    page.goto(f"{web.url}/dead?task=reports.*")
    page.click("button[value='purge matching']")
    page.click("#confirm")
    expect(page.locator("#result")).to_have_text("Purged 3 of 3 dead messages")
    assert stack.broker.counts(DEFAULT_QUEUE)["dead"] == 1
    assert {i.id for i in stack.broker.dead_letters(DEFAULT_QUEUE)} == {kept}
    assert all(stack.broker.lookup(i) == [] for i in doomed)


XSS = '<script>window.pwned=1</script><img src=x onerror="window.pwned=2">'


def test_a_task_argument_holding_a_script_tag_is_shown_as_text(
    stack: Stack, web: WebServer, page: Page
):
    stack.worker()
    [task_id] = fail_on_worker(stack, XSS)

    page.goto(f"{web.url}/dead")
    expect(page.locator("table.dead tbody tr")).to_have_count(1)
    expect(page.locator("td.detail")).to_contain_text("<script>window.pwned=1</script>")
    page.goto(f"{web.url}/queues/{DEFAULT_QUEUE}?state=DEAD")
    expect(page.locator("main table code").nth(1)).to_contain_text("<script>")
    page.goto(f"{web.url}/dead?task=fail")
    page.click(f'tr[data-id="{task_id}"] a')
    expect(page.locator("pre.args")).to_contain_text(XSS.replace('"', '\\"'))

    assert page.evaluate("window.pwned") is None
    assert page.locator("main script, main img").count() == 0


def test_a_non_loopback_address_is_refused_without_auth(stack: Stack, tmp_path: Path):
    server = WebServer(stack, tmp_path / "web.log", address="0.0.0.0")

    refused = server.run()
    assert refused.returncode != 0
    assert "refusing to serve the dashboard on '0.0.0.0' without authentication" in refused.stderr

    missing = server.run("--auth", "token", env={"CELERY_MSG_WEB_TOKEN": ""})
    assert missing.returncode != 0
    assert "--auth token needs CELERY_MSG_WEB_TOKEN set" in missing.stderr


def test_with_auth_a_request_without_credentials_gets_401(
    stack: Stack, tmp_path: Path, browser: Any
):
    stack.broker.declare(DEFAULT_QUEUE)
    env = {"CELERY_MSG_WEB_USER": "ops", "CELERY_MSG_WEB_PASSWORD": "s3cret-pass"}
    server = WebServer(
        stack, tmp_path / "web.log", address="0.0.0.0", args=["--auth", "basic"], env=env
    )
    try:
        server.start()
        # A browser with no (or wrong) credentials gets the 401 and its Basic challenge.
        anonymous = browser.new_context()
        response = anonymous.request.get(server.url + "/")
        assert response.status == 401
        assert response.headers["www-authenticate"].startswith('Basic realm="celery-msg"')
        assert "celery-msg" not in response.text().replace('realm="celery-msg"', "")
        anonymous.close()

        wrong = browser.new_context(http_credentials={"username": "ops", "password": "nope"})
        assert wrong.request.get(server.url + "/dead").status == 401
        wrong.close()

        good = browser.new_context(http_credentials={"username": "ops", "password": "s3cret-pass"})
        tab = good.new_page()
        response = tab.goto(server.url + "/")
        assert response is not None and response.status == 200
        expect(_row(tab, DEFAULT_QUEUE)).to_be_visible()
        good.close()
    finally:
        server.close()


def test_token_auth_takes_a_bearer_header_and_refuses_without_it(stack: Stack, tmp_path: Path):
    server = WebServer(
        stack, tmp_path / "web.log", args=["--auth", "token"],
        env={"CELERY_MSG_WEB_TOKEN": "t0ken-abc"},
    )  # fmt: skip
    try:
        server.start()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(server.url + "/", timeout=10)
        assert refused.value.code == 401
        request = urllib.request.Request(
            server.url + "/", headers={"Authorization": "Bearer t0ken-abc"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        as_basic = base64.b64encode(b"anyone:t0ken-abc").decode()
        request = urllib.request.Request(
            server.url + "/dead", headers={"Authorization": f"Basic {as_basic}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    finally:
        server.close()


def test_a_post_without_the_csrf_token_is_refused_and_changes_nothing(
    stack: Stack, web: WebServer, page: Page
):
    dead = bury(stack, task="reports.daily", exc_type="builtins.ValueError")
    page.goto(web.url + "/dead")  # the visitor has a CSRF cookie now

    response = page.request.post(
        web.url + "/dead/action",
        form={"op": "purge matching", "confirm": "yes", "task": "reports.*"},
    )

    assert response.status == 403
    assert wait_until(lambda: stack.broker.counts(DEFAULT_QUEUE)["dead"] == 1, 1, "no change")
    assert [i.id for i in stack.broker.dead_letters(DEFAULT_QUEUE)] == [dead]
