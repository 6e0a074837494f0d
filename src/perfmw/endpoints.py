"""The endpoints perfmw serves itself: Prometheus metrics, the JSON findings and the dashboard.

Served by the middleware before routing, so they add no route to the app (or its OpenAPI),
and protected by `access_token` when one is set; without one, the findings (stacks and file
paths, as JSON and on the dashboard) are served to this machine only. In multiprocess mode they
answer for every worker of the directory, read from its files in a thread: not on the loop. The
dashboard's page, its sign-in and its data live in `dashboard/`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from . import _guard
from .exporters import shared_findings
from .exporters._families import multiprocess_enabled
from .exporters.multiprocess_files import ScrapeError
from .exporters.prometheus import exposition

if TYPE_CHECKING:
    from .perf import Perf

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Endpoint = Callable[[Scope, Receive, Send], Awaitable[None]]
logger = logging.getLogger("perfmw")


TEXT = "text/plain; charset=utf-8"


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def respond(
    send: Send, status: int, body: bytes, content_type: str, extra: list[tuple[bytes, bytes]]
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def bearer(scope: Scope, token: str) -> bool:
    """Whether the request carries `Authorization: Bearer <token>`."""
    given = header(scope, b"authorization") or ""
    return hmac.compare_digest(given.encode("utf-8"), ("Bearer " + token).encode("utf-8"))


Accepts = Callable[[Scope, str], bool]
UNAUTHORIZED = [(b"www-authenticate", b'Bearer realm="perfmw"')]


LOCAL_ONLY = (
    b"perfmw serves its findings (stacks, file paths) to this machine only; set access_token "
    b"(PERFMW_ACCESS_TOKEN) to serve them to others\n"
)
# Headers a reverse proxy adds: a request through one comes from elsewhere, whatever its address.
_FORWARDING = frozenset({b"forwarded", b"x-forwarded-for", b"x-real-ip"})
_IN_PROCESS = frozenset({"testclient"})  # Starlette's TestClient: no network at all


def from_this_machine(scope: Scope) -> bool:
    """Whether the request comes from a loopback address (or a Unix socket), not via a proxy."""
    client = scope.get("client")
    if client and client[0] not in _IN_PROCESS:
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
        if not (address.is_loopback or (mapped is not None and mapped.is_loopback)):
            return False
    return not any(bytes(key).lower() in _FORWARDING for key, _ in scope.get("headers", ()))


def _refusal(
    scope: Scope, token: str | None, accepts: Accepts, local_only: bool
) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
    if scope.get("method") not in ("GET", "HEAD"):
        return 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")]
    if token is not None and not accepts(scope, token):
        return 401, b"unauthorized\n", UNAUTHORIZED
    if token is None and local_only and not from_this_machine(scope):
        return 403, LOCAL_ONLY, []
    return None


def read_findings(perf: Perf) -> tuple[list[dict[str, Any]], list[int]]:
    """The app's findings, most costly first, and the pids of the workers they come from:
    every worker's in multiprocess mode (ScrapeError when the directory is gone)."""
    shared = shared_findings.read(perf)
    if shared is None:
        return [f.to_dict() for f in perf.findings.snapshot()], [os.getpid()]
    return shared


def build_endpoints(perf: Perf) -> dict[str, Endpoint]:
    """The endpoints a Perf serves, keyed by their path."""
    settings = perf.settings

    def metrics(scope: Scope) -> tuple[bytes, str]:
        return exposition(perf.registry, header(scope, b"accept"))

    def findings(scope: Scope) -> tuple[bytes, str]:
        found, pids = read_findings(perf)
        document = {"pid": os.getpid(), "pids": pids, "findings": found}
        return json.dumps(document).encode(), "application/json"

    served: dict[str, Endpoint] = {}
    if settings.metrics_path is not None:
        served[settings.metrics_path] = protected(metrics, settings.access_token)
    if settings.findings_path is not None:
        served[settings.findings_path] = protected(findings, settings.access_token, local_only=True)
    from .dashboard import dashboard_endpoints  # it builds on this module's helpers

    served.update(dashboard_endpoints(perf))
    return served


def protected(
    render: Callable[[Scope], tuple[bytes, str]],
    token: str | None,
    *,
    accepts: Accepts = bearer,
    component: str = "endpoint",
    headers: list[tuple[bytes, bytes]] | None = None,
    local_only: bool = False,
) -> Endpoint:
    """An endpoint answering GET/HEAD with `render(scope)`, behind the token if set: the
    request must carry what `accepts` takes (the bearer header unless told otherwise). With
    `local_only` and no token, only requests from this machine are answered."""
    extra_headers = headers or []

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        refusal = _refusal(scope, token, accepts, local_only)
        if refusal is not None:
            status, text, extra = refusal
            await respond(send, status, text, TEXT, [*extra, *extra_headers])
            return
        try:
            if multiprocess_enabled():
                loop = asyncio.get_running_loop()
                body, content_type = await loop.run_in_executor(None, render, scope)
            else:
                body, content_type = render(scope)
        except ScrapeError as exc:  # said at each scrape: nothing is exported until it is fixed
            logger.error("perfmw: %s", exc)
            await respond(send, 500, f"perfmw: {exc}\n".encode(), TEXT, extra_headers)
            return
        except Exception as exc:
            _guard.report_internal_error(component, exc)
            await respond(send, 500, b"perfmw internal error (logged)\n", TEXT, extra_headers)
            return
        await respond(send, 200, body, content_type, extra_headers)

    return endpoint
