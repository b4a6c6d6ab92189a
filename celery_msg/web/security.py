"""Safe by default: loopback unless authenticated, credentials from the environment, CSRF.

- :func:`check_bind` refuses an address other than loopback unless authentication is on: the
  dashboard can replay and purge messages, so it never listens openly by accident.
- :class:`Auth` is HTTP basic auth (``CELERY_MSG_WEB_USER`` / ``CELERY_MSG_WEB_PASSWORD``) or
  a token (``CELERY_MSG_WEB_TOKEN``: ``Authorization: Bearer <token>``, or as the password of
  basic auth, so a browser can log in). Credentials are read from the environment, never from
  the command line (where ``ps`` shows them); compared in constant time.
- :class:`Guard` is the ASGI middleware doing both, and handing every visitor a CSRF token
  (a random cookie, ``SameSite=Strict``): every state-changing request is a POST carrying the
  same token in its form (double-submit), and checked by :func:`check_csrf`.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookies import SimpleCookie
from typing import Literal

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import ConfigurationError

USER_ENV = "CELERY_MSG_WEB_USER"
PASSWORD_ENV = "CELERY_MSG_WEB_PASSWORD"
TOKEN_ENV = "CELERY_MSG_WEB_TOKEN"
CSRF_COOKIE = "celery_msg_csrf"
CSRF_FIELD = "csrf_token"

#: Sent with every response: scripts only from the dashboard itself (the bundled htmx), no
#: framing by other sites, no content-type guessing.
SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
]

AuthKind = Literal["none", "basic", "token"]


class InsecureBind(ConfigurationError):
    """Asked to listen on a non-loopback address without authentication."""


@dataclass(frozen=True, repr=False)
class Auth:
    """How requests must authenticate; ``repr`` never shows the secret."""

    kind: AuthKind = "none"
    user: str = ""
    secret: str = ""

    def __repr__(self) -> str:
        return f"Auth(kind={self.kind!r}, user={self.user!r})"

    @classmethod
    def from_environ(cls, kind: AuthKind, environ: Mapping[str, str] | None = None) -> Auth:
        """The credentials of ``kind`` from the environment; a missing or empty one is a
        :class:`ConfigurationError` naming the variable."""
        env = os.environ if environ is None else environ
        if kind == "none":
            return cls()
        names = (USER_ENV, PASSWORD_ENV) if kind == "basic" else (TOKEN_ENV,)
        missing = [n for n in names if not env.get(n)]
        if missing:
            raise ConfigurationError(f"--auth {kind} needs {' and '.join(missing)} set")
        if kind == "basic":
            return cls("basic", env[USER_ENV], env[PASSWORD_ENV])
        return cls("token", "", env[TOKEN_ENV])

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries these credentials."""
        if self.kind == "none":
            return True
        scheme, _, value = (authorization or "").partition(" ")
        value = value.strip()
        if self.kind == "token" and scheme.lower() == "bearer":
            return _same(value, self.secret)
        if scheme.lower() != "basic":
            return False
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (ValueError, binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        if self.kind == "token":  # any user name, the token as the password
            return _same(password, self.secret)
        # Both compared, whatever the first gives: no timing hint of which one was wrong.
        return _same(user, self.user) & _same(password, self.secret)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(address: str, auth: Auth) -> None:
    """Refuse to listen beyond this machine without authentication."""
    if auth.kind == "none" and not is_loopback(address):
        raise InsecureBind(
            f"refusing to serve the dashboard on {address!r} without authentication: it can "
            f"replay and purge messages. Use --auth basic ({USER_ENV}, {PASSWORD_ENV}) or "
            f"--auth token ({TOKEN_ENV}), or bind to 127.0.0.1"
        )


def check_csrf(cookie_token: str | None, form_token: object) -> bool:
    """Whether a POST's form carries the token of the visitor's CSRF cookie."""
    if not cookie_token or not isinstance(form_token, str) or not form_token:
        return False
    return _same(form_token, cookie_token)


def csrf_cookie(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The CSRF token of a request's cookies, if it has a well-formed one."""
    for name, value in headers:
        if name == b"cookie":
            cookie: SimpleCookie = SimpleCookie()
            try:
                cookie.load(value.decode("latin-1"))
            except Exception:  # a malformed Cookie header is the client's problem
                continue
            morsel = cookie.get(CSRF_COOKIE)
            if morsel is not None and 20 <= len(morsel.value) <= 100:
                return morsel.value
    return None


class Guard:
    """ASGI middleware: authentication first (401 without credentials), then a CSRF token for
    the request (``scope["state"]["csrf"]``), set as a cookie when the visitor has none."""

    def __init__(self, app: ASGIApp, auth: Auth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        authorization = next(
            (v.decode("latin-1") for k, v in headers if k == b"authorization"), None
        )
        if not self.auth.allows(authorization):
            await _unauthorized(send)
            return
        token = csrf_cookie(headers)
        fresh = token is None
        if token is None:
            token = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf"] = token

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                out = message.setdefault("headers", [])
                out.extend(SECURITY_HEADERS)
                if fresh:
                    cookie = f"{CSRF_COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
                    out.append((b"set-cookie", cookie.encode()))
            await send(message)

        await self.app(scope, receive, send_with_cookie)


async def _unauthorized(send: Send) -> None:
    body = b"authentication required\n"
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"www-authenticate", b'Basic realm="celery-msg", charset="UTF-8"'),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
