"""The live dashboard: a web page a developer opens in the browser, and the JSON it polls.

    GET  /perfmw             the page (with `access_token` set and no credentials: a sign-in form)
    POST /perfmw             the sign-in form: the token, checked, becomes a cookie
    GET  /perfmw/data.json   what the page shows, built at each poll from what perfmw keeps

(`dashboard_path` moves both; None serves neither.) The pieces:

- `page.py`: the HTML (`page.html`, with its CSS and script inline) and its Content-Security-Policy;
- `auth.py`: the token by header, by `?token=` or the form, and the cookie they set;
- `data.py`: the JSON: routes, findings with their advice, stalls, caches, pools;
- `stalls.py`: each application's recent stalls, for the chart (a bounded store).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from .. import _guard
from ..endpoints import TEXT, UNAUTHORIZED, Endpoint, Receive, Scope, Send, protected, respond
from . import auth, page, stalls  # noqa: F401  (stalls: its hook keeps each app's stalls)

if TYPE_CHECKING:
    from ..perf import Perf

_ALLOW = [(b"allow", b"GET, HEAD, POST")]


def dashboard_endpoints(perf: Perf) -> dict[str, Endpoint]:
    """The page and its data endpoint, keyed by their paths; none when dashboard_path is None."""
    settings = perf.settings
    if settings.dashboard_path is None or settings.dashboard_data_path is None:
        return {}

    def render(scope: Scope) -> tuple[bytes, str]:
        from . import data  # with the report's analysis: imported once the page is first read

        return json.dumps(data.document(perf)).encode(), "application/json"

    return {
        settings.dashboard_path: _page(settings.dashboard_path, settings.access_token),
        settings.dashboard_data_path: protected(
            render,
            settings.access_token,
            accepts=auth.signed_in,
            component="dashboard",
            headers=page.HEADERS,
            local_only=True,
        ),
    }


def _page(path: str, token: str | None) -> Endpoint:
    """The page at `path`, and its sign-in when `token` is set."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method")
        if method not in ("GET", "HEAD", "POST"):
            await respond(send, 405, b"method not allowed\n", TEXT, _ALLOW)
            return
        try:
            status, body, content_type, extra = await _answer(scope, receive, method, path, token)
        except Exception as exc:
            _guard.report_internal_error("dashboard", exc)
            status, body, content_type, extra = 500, b"perfmw internal error (logged)\n", TEXT, []
        await respond(send, status, body, content_type, [*extra, *page.HEADERS])

    return endpoint


Answer = tuple[int, bytes, str, list[tuple[bytes, bytes]]]


async def _answer(
    scope: Scope, receive: Receive, method: str, path: str, token: str | None
) -> Answer:
    """(status, body, content type, headers) of the page's answer."""
    the_page: Answer = (200, page.PAGE, page.HTML, [])
    if token is None:  # open, as the other endpoints are without a token
        return _to_page(path) if method == "POST" else the_page
    if method == "POST":
        try:
            given = await auth.form_token(receive)
        except auth.FormTooLarge:
            return 413, b"the sign-in form holds one token\n", TEXT, []
    else:
        given = auth.query_token(scope)
    if given is not None:
        if not auth.matches(given, token):
            return 401, page.sign_in_form(path, refused=True), page.HTML, UNAUTHORIZED
        # Signed in: the cookie, and the page again without the token in its address.
        return _to_page(path, auth.set_cookie(scope, token, path))
    if auth.signed_in(scope, token):
        return _to_page(path) if method == "POST" else the_page
    return 401, page.sign_in_form(path, refused=False), page.HTML, UNAUTHORIZED


def _to_page(path: str, *headers: tuple[bytes, bytes]) -> Answer:
    """See Other: the page, at its own address."""
    return 303, b"", TEXT, [(b"location", path.encode("latin-1")), *headers]
