"""The endpoints perfmw serves itself: Prometheus metrics and the JSON findings.

Served by the middleware before routing, so they add no route to the app (or its OpenAPI),
and protected by `access_token` when one is set. In multiprocess mode both answer for every
worker of the directory, read from its files in a thread: not on the loop.
"""

from __future__ import annotations

import asyncio
import hmac
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


_TEXT = "text/plain; charset=utf-8"


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _respond(
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


def _refusal(
    scope: Scope, token: str | None
) -> tuple[int, bytes, list[tuple[bytes, bytes]]] | None:
    if scope.get("method") not in ("GET", "HEAD"):
        return 405, b"method not allowed\n", [(b"allow", b"GET, HEAD")]
    if token is not None:
        given = _header(scope, b"authorization") or ""
        expected = "Bearer " + token
        if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
            return 401, b"unauthorized\n", [(b"www-authenticate", b'Bearer realm="perfmw"')]
    return None


def build_endpoints(perf: Perf) -> dict[str, Endpoint]:
    """The endpoints a Perf serves, keyed by their path."""
    settings = perf.settings

    def metrics(scope: Scope) -> tuple[bytes, str]:
        return exposition(perf.registry, _header(scope, b"accept"))

    def findings(scope: Scope) -> tuple[bytes, str]:
        shared = shared_findings.read(perf)
        if shared is None:
            found, pids = [f.to_dict() for f in perf.findings.snapshot()], [os.getpid()]
        else:
            found, pids = shared
        document = {"pid": os.getpid(), "pids": pids, "findings": found}
        return json.dumps(document).encode(), "application/json"

    served: dict[str, Endpoint] = {}
    if settings.metrics_path is not None:
        served[settings.metrics_path] = _protected(metrics, settings.access_token)
    if settings.findings_path is not None:
        served[settings.findings_path] = _protected(findings, settings.access_token)
    return served


def _protected(render: Callable[[Scope], tuple[bytes, str]], token: str | None) -> Endpoint:
    """An endpoint answering GET/HEAD with `render(scope)`, behind the bearer token if set."""

    async def endpoint(scope: Scope, receive: Receive, send: Send) -> None:
        refusal = _refusal(scope, token)
        if refusal is not None:
            status, text, extra = refusal
            await _respond(send, status, text, _TEXT, extra)
            return
        try:
            if multiprocess_enabled():
                loop = asyncio.get_running_loop()
                body, content_type = await loop.run_in_executor(None, render, scope)
            else:
                body, content_type = render(scope)
        except ScrapeError as exc:  # said at each scrape: nothing is exported until it is fixed
            logger.error("perfmw: %s", exc)
            await _respond(send, 500, f"perfmw: {exc}\n".encode(), _TEXT, [])
            return
        except Exception as exc:
            _guard.report_internal_error("endpoint", exc)
            await _respond(send, 500, b"perfmw internal error (logged)\n", _TEXT, [])
            return
        await _respond(send, 200, body, content_type, [])

    return endpoint
