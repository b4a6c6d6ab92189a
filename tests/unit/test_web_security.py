"""The dashboard's safety rules and rate charts, without a server."""

from __future__ import annotations

import base64
import fnmatch
import tomllib
from pathlib import Path

import pytest

from celery_msg.errors import ConfigurationError
from celery_msg.web.rates import RateSampler, sparkline
from celery_msg.web.security import Auth, InsecureBind, check_bind, check_csrf, csrf_cookie


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("address", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_addresses_need_no_auth(address: str):
    check_bind(address, Auth())


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "192.168.1.10", "dashboard.example"])
def test_other_addresses_are_refused_without_auth_and_allowed_with_it(address: str):
    with pytest.raises(InsecureBind, match="without authentication"):
        check_bind(address, Auth())
    check_bind(address, Auth("token", "", "x"))


def test_credentials_come_from_the_environment_and_missing_ones_are_named():
    with pytest.raises(ConfigurationError, match="CELERY_MSG_WEB_USER and CELERY_MSG_WEB_PASSWORD"):
        Auth.from_environ("basic", {})
    with pytest.raises(ConfigurationError, match="CELERY_MSG_WEB_TOKEN"):
        Auth.from_environ("token", {"CELERY_MSG_WEB_TOKEN": ""})
    auth = Auth.from_environ(
        "basic", {"CELERY_MSG_WEB_USER": "ops", "CELERY_MSG_WEB_PASSWORD": "pw"}
    )
    assert (auth.kind, auth.user, auth.secret) == ("basic", "ops", "pw")
    assert "pw" not in repr(auth)


def test_basic_auth_needs_both_user_and_password():
    auth = Auth("basic", "ops", "pw")
    assert auth.allows(_basic("ops", "pw"))
    for header in [None, "", _basic("ops", "nope"), _basic("root", "pw"), "Bearer pw",
                   "Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()]:  # fmt: skip
        assert not auth.allows(header), header


def test_a_token_is_taken_as_bearer_or_as_a_basic_password():
    auth = Auth("token", "", "tok")
    assert auth.allows("Bearer tok") and auth.allows("bearer tok")
    assert auth.allows(_basic("anyone", "tok"))
    assert not auth.allows("Bearer tok2") and not auth.allows(_basic("tok", "x"))


def test_csrf_token_must_match_the_cookie():
    assert check_csrf("a" * 40, "a" * 40)
    assert not check_csrf("a" * 40, "b" * 40)
    assert not check_csrf(None, "")
    assert not check_csrf("a" * 40, None)
    assert csrf_cookie([(b"cookie", b"x=1; celery_msg_csrf=" + b"t" * 43)]) == "t" * 43
    assert csrf_cookie([(b"cookie", b"celery_msg_csrf=short")]) is None
    assert csrf_cookie([(b"cookie", b"\xff;;==")]) is None


def test_rates_are_counter_differences_over_time_and_a_reset_counts_as_zero():
    now = [100.0]
    counters = iter([{"q": {"published": 0}}, {"q": {"published": 50}}, {"q": {"published": 10}}])
    sampler = RateSampler(lambda: next(counters), interval=5, clock=lambda: now[0])
    for _ in range(3):
        sampler.sample()
        now[0] += 5
    assert sampler.rates("q", "published") == [10.0, 0.0]
    assert sampler.rates("unknown", "published") == [0.0, 0.0]


def test_a_failing_read_leaves_a_gap_and_the_sampler_goes_on():
    calls = iter([{"q": {"acked": 1}}, RuntimeError("redis down"), {"q": {"acked": 3}}])

    def read() -> dict[str, dict[str, int]]:
        value = next(calls)
        if isinstance(value, Exception):
            raise value
        return value

    now = iter([0.0, 2.0])
    sampler = RateSampler(read, interval=1, clock=lambda: next(now))
    for _ in range(3):
        sampler.sample()
    assert sampler.rates("q", "acked") == [1.0]


def test_sparkline_draws_only_numbers():
    assert "<polyline" not in sparkline([])
    svg = sparkline([0, 5, 10])
    assert svg.count("<polyline") == 1 and 'aria-label="last 10.0/s, max 10.0/s"' in svg
    assert 'points="0,23 60,12 120,1"' in svg


def test_charts_are_drawn_once_per_reading():
    now = iter([0.0, 1.0, 2.0])
    values = iter([{"q": {"published": n, "acked": n // 2}} for n in (0, 4, 6)])
    sampler = RateSampler(lambda: next(values), interval=1, clock=lambda: next(now))
    for _ in range(3):
        sampler.sample()
    first = sampler.charts()
    assert set(first) == {"q"} and all("<polyline" in svg for svg in first["q"])
    assert sampler.charts() is first  # no new reading: the same drawing


def test_every_template_and_asset_is_package_data_so_a_wheel_ships_it():
    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["celery_msg"]
    web = root / "celery_msg" / "web"
    shipped = [
        p for p in web.rglob("*") if p.is_file() and p.parent.name in ("templates", "static")
    ]
    assert len(shipped) >= 10
    for path in shipped:
        name = path.relative_to(root / "celery_msg").as_posix()
        assert any(fnmatch.fnmatch(name, p) for p in patterns), f"{name} not in package-data"
