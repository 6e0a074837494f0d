"""Who may see the dashboard when `access_token` is set: the bearer header, or the cookie that
`?token=` or the sign-in form sets.

The cookie holds an HMAC of the token, not the token: it opens the dashboard and nothing else
(`/metrics` and the findings endpoint take the header only), and changing the token signs every
browser out. It is HttpOnly (no script reads it), SameSite=Strict (no other site's page sends
it), scoped to the dashboard's path, and Secure when the request came over https.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import parse_qs

from ..endpoints import Receive, Scope, bearer

COOKIE = "perfmw_token"
#: The sign-in form's body holds one token: anything longer is refused unread.
FORM_LIMIT = 4096


class FormTooLarge(Exception):
    """The sign-in form's body was longer than FORM_LIMIT."""


def _session(token: str) -> str:
    return hmac.new(token.encode("utf-8"), b"perfmw dashboard", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8"))


def matches(given: str, token: str) -> bool:
    """Whether a token typed in the form or given as `?token=` is the access token."""
    return _same(given, token)


def _cookie(scope: Scope) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() != b"cookie":
            continue
        for pair in bytes(value).decode("latin-1").split(";"):
            name, _, content = pair.strip().partition("=")
            if name == COOKIE:
                return content
    return None


def signed_in(scope: Scope, token: str) -> bool:
    """The request carries `Authorization: Bearer <token>` or the dashboard's cookie."""
    if bearer(scope, token):
        return True
    cookie = _cookie(scope)
    return cookie is not None and _same(cookie, _session(token))


def set_cookie(scope: Scope, token: str, path: str) -> tuple[bytes, bytes]:
    """The Set-Cookie header that signs this browser in to the dashboard at `path`."""
    secure = "; Secure" if scope.get("scheme") in ("https", "wss") else ""
    value = f"{COOKIE}={_session(token)}; Path={path}; HttpOnly; SameSite=Strict{secure}"
    return b"set-cookie", value.encode("latin-1")


def query_token(scope: Scope) -> str | None:
    """The `?token=` of the request, if it has one."""
    query = bytes(scope.get("query_string", b"")).decode("latin-1")
    values = parse_qs(query, keep_blank_values=True).get("token")
    return values[0] if values else None


async def form_token(receive: Receive) -> str | None:
    """The `token` field of the sign-in form's urlencoded body; FormTooLarge past FORM_LIMIT."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None  # the client went away
        body += message.get("body", b"")
        if len(body) > FORM_LIMIT:
            raise FormTooLarge
        if not message.get("more_body", False):
            break
    values = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).get("token")
    return values[0] if values else None
