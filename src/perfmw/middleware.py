"""PerfMiddleware: the pure ASGI middleware that opens one record per HTTP request.

    app = perfmw.PerfMiddleware(app)                      # any ASGI app
    perfmw.instrument(app)                                # Starlette/FastAPI: adds it outermost

The clock stops when the last body chunk has been sent, so background tasks that run after
the response are not part of its duration. Chunks pass straight through (never buffered) and
are counted as they go. The application's own call is never inside perfmw's guard: its
exceptions reach the server unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from . import _guard
from .detectors.http import CACHE_HEADERS_BYTES
from .endpoints import Message, Receive, Scope, Send, build_endpoints
from .exporters import tracing as tracing_sink
from .exporters._families import GaugeChild
from .exporters.prometheus import FOLD_BATCH
from .record import UNMATCHED, RequestRecord, _current
from .settings import Settings

if TYPE_CHECKING:
    from .perf import Perf

# Bound once: looking a method up on the ContextVar (or the clock on its module) would cost
# an attribute lookup and a bound-method object per request.
_enter = _current.set
_leave = _current.reset
_detach_span = tracing_sink.detach
_clock = time.perf_counter
_new = object.__new__
_KNOWN_METHODS = {
    m: m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
}


class PerfMiddleware:
    def __init__(
        self,
        app: Any,
        *,
        perf: Any = None,
        settings: Settings | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        from .perf import Perf

        self.app = app
        self.perf: Perf = perf if perf is not None else Perf(settings, registry)
        self.endpoints = build_endpoints(self.perf)
        # One lookup per request decides: a path perfmw serves (its endpoint), a path excluded
        # from measurement (None), or an ordinary request (absent).
        excluded = {path.rstrip("/") or "/" for path in self.perf.settings.exclude_paths}
        self._special: dict[str, Any] = dict.fromkeys(excluded)
        self._special.update(self.endpoints)
        # ...or below an excluded path (`/static` excludes `/static/app.css`, not `/statics`).
        self._excluded_below = tuple(path.rstrip("/") + "/" for path in excluded)
        self._exchange = _TimedExchange if self.perf.settings.server_timing else _Exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        perf = self.perf
        if not perf.loop_started:
            perf.on_loop()
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                send = _flushing_at_shutdown(send, perf)
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if path in self._special:
            endpoint = self._special[path]
            if endpoint is None:
                await self.app(scope, receive, send)
            else:
                await _serve_own(endpoint, perf, path, scope, receive, send)
            return
        if self._excluded_below and path.startswith(self._excluded_below):
            await self.app(scope, receive, send)
            return

        method = _KNOWN_METHODS.get(scope["method"], "_OTHER")
        record = RequestRecord(UNMATCHED, method, path, "http", perf)
        # The exchange's fields set here rather than by an __init__: a Python frame less
        # per request (measured: about 0.2 µs).
        exchange = _new(self._exchange)
        exchange.perf = perf
        exchange.record = record
        exchange.scope = scope
        exchange.root_path = scope.get("root_path", "")
        exchange.server_send = send
        active = perf.sink.active_requests.get(method)
        if active is None:
            active = perf.sink.active(method)
        active.value += 1  # the child's inc(), without a call per request
        exchange.active = active
        token = _enter(record)
        tracing = perf.tracing
        # The request's span, current during the app call.
        trace_token = None if tracing is None else tracing.start(scope, record)
        try:
            await self.app(scope, receive, exchange.send)
        except BaseException:
            if not record.closed:
                if not record.disconnected:
                    record.status_code = 500
                exchange.finish()
            raise
        else:
            if not record.closed:
                # The app returned without finishing its response: the client went away
                # (a streaming response cancelled on disconnect) or the app never answered.
                if record.status_code is None:
                    record.status_code = 500
                else:
                    record.disconnected = True
                exchange.finish()
        finally:
            _leave(token)
            if record.background is not None:
                _finish_background(perf, record.background)
            if trace_token is not None:
                try:  # inline: a call less per traced request
                    _detach_span(trace_token)
                except (ValueError, RuntimeError) as exc:  # a token from another context
                    _guard.report_internal_error("tracing", exc)


class _Exchange:
    """One request on its way through the middleware: the send it wraps and its finish.

    One object with a bound method rather than a closure: no cell per captured variable.
    """

    __slots__ = ("active", "perf", "record", "root_path", "scope", "server_send")

    perf: Perf
    record: RequestRecord
    scope: Scope
    root_path: str  # the scope's root_path when the request entered perfmw
    server_send: Send
    active: GaugeChild  # http_server_active_requests for the request's method

    def send(self, message: Message) -> Awaitable[None]:
        # A plain function handing back the server's own awaitable: on the common path (a
        # start and one body) perfmw adds no coroutine of its own per message.
        kind = message["type"]
        record = self.record
        if kind == "http.response.body":
            record.response_bytes += len(message.get("body", b""))
            if message.get("more_body", False):
                return _deliver(self.server_send, message, record)
        elif kind == "http.response.start":
            record.status_code = message["status"]
            record.response_headers = message.get("headers")
            return self.server_send(message)
        elif kind != "http.response.pathsend":
            return self.server_send(message)
        # The last message (the last body chunk, or a pathsend): the clock stops as it is
        # handed to the server (whose send queues it for the socket), before any background
        # task runs.
        self.finish()
        span = record.span
        if span is not None and span.recording:
            return _send_last_untraced(self.server_send, message)
        return self.server_send(message)

    def finish(self) -> None:
        # Once per request (record.closed tells): at the last chunk, or when the app ends.
        record = self.record
        record.duration_seconds = _clock() - record.started_at
        record.closed = True
        self.active.value -= 1
        perf = self.perf
        try:  # perfmw's guard, without a context manager's two calls per request
            scope = self.scope
            record.route = perf.routes.label_for(
                scope, record.path, self.root_path, record.status_code
            )
            span = record.span
            queries = record.queries
            if (
                queries
                or record.stalls
                or record.blocking_calls
                or record.response_bytes > CACHE_HEADERS_BYTES
            ):
                # Detectors, findings, the span and hooks. Most requests have nothing for
                # them to look at and skip this.
                record.endpoint = scope.get("endpoint")
                perf.finish(record)
            elif span is not None and span.recording:  # unsampled: nothing to add
                tracing_sink.end(record)  # nothing else to look at: the span alone
            # The request histograms: queued here, folded by the sink in batches.
            requests = perf.sink.requests
            requests.append(
                (
                    (record.method, record.route, record.status_code),  # type: ignore[arg-type]
                    record.duration_seconds,
                    record.response_bytes,
                    len(queries),
                    record.db_seconds if queries else 0.0,
                    None if span is None else span.exemplar,
                )
            )
            if len(requests) >= FOLD_BATCH:
                perf.sink.fold()
        except Exception as exc:
            _guard.report_internal_error("finish", exc)


def _finish_background(perf: Perf, record: RequestRecord) -> None:
    """The request's background tasks are done: their record is counted under its own route."""
    record.duration_seconds = _clock() - record.started_at
    try:
        perf.finish(record)
        perf.sink.observe_background(record)
    except Exception as exc:
        _guard.report_internal_error("finish", exc)


async def _serve_own(
    endpoint: Any, perf: Perf, path: str, scope: Scope, receive: Receive, send: Send
) -> None:
    """One of perfmw's own endpoints, in a record of its own named by its path.

    A loop stall while it runs (a collection during a scrape) is then counted on that route,
    and never reported as the application's: `Perf.finish` runs no detector for it. The
    request itself is not measured, as before.
    """
    method = _KNOWN_METHODS.get(scope["method"], "_OTHER")
    record = RequestRecord(path, method, path, "perfmw", perf)
    token = _enter(record)
    try:
        await endpoint(scope, receive, send)
    finally:
        _leave(token)
        record.duration_seconds = _clock() - record.started_at
        record.closed = True
        if record.stalls or record.blocking_calls:
            perf.finish(record)  # guarded inside


def _flushing_at_shutdown(send: Send, perf: Perf) -> Send:
    """The lifespan's `send`: once the app has shut down, the worker's last counts and findings
    go to the multiprocess files, with no code in the application (a worker stopped by SIGTERM
    exits without running atexit handlers)."""

    async def send_flushed(message: Message) -> None:
        if message.get("type") in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            with _guard.guard("shutdown"):
                perf.flush()
        await send(message)

    return send_flushed


class _TimedExchange(_Exchange):
    """An exchange whose response start carries the Server-Timing header (`server_timing`)."""

    __slots__ = ()

    def send(self, message: Message) -> Awaitable[None]:
        if message["type"] == "http.response.start":
            try:
                message = _with_server_timing(message, self.record)
            except Exception as exc:
                _guard.report_internal_error("middleware", exc)
        return _Exchange.send(self, message)


async def _deliver(send: Send, message: Message, record: RequestRecord) -> None:
    try:
        await send(message)
    except BaseException:
        record.disconnected = True  # the server could not deliver it: the client is gone
        raise


async def _send_last_untraced(send: Send, message: Message) -> None:
    """Hand the server a traced request's last message outside the request's contexts.

    Servers capture the current context in the callbacks they schedule at that moment
    (uvicorn's keep-alive timer, kept until the connection's next request and the loop's
    next timer clean-up), and with it whatever the context holds: the record, its span and
    everything the span refers to. Measured on uvicorn at 32 connections: every request's
    span lived long enough to reach the oldest GC generation, and full collections of 20 ms
    landed in p99. The request's code (background tasks) gets its contexts back after.
    """
    record_token = _enter(None)
    trace_token = tracing_sink.step_out()
    try:
        await send(message)
    finally:
        tracing_sink.step_in(trace_token)
        _leave(record_token)


def _with_server_timing(message: Message, record: RequestRecord) -> Message:
    """The response start with our Server-Timing appended to the app's own, if any."""
    ours = server_timing_value(record).encode("latin-1")
    headers: list[tuple[bytes, bytes]] = []
    merged = False
    for name, value in message.get("headers", ()):
        if not merged and name.lower() == b"server-timing":
            value = bytes(value) + b", " + ours
            merged = True
        headers.append((name, value))
    if not merged:
        headers.append((b"server-timing", ours))
    return {**message, "headers": headers}


def server_timing_value(record: RequestRecord) -> str:
    """`db;dur=12.3;desc="4 queries", cache;desc="3 hit 1 miss", app;dur=45.6`."""
    queries = len(record.queries)
    noun = "query" if queries == 1 else "queries"
    parts = [
        f'db;dur={record.db_seconds * 1000:.1f};desc="{queries} {noun}"',
        f'cache;desc="{record.cache_hits} hit {record.cache_misses} miss"',
    ]
    # Called at the response start: `app` is the time the app took to start its response.
    parts.append(f"app;dur={(time.perf_counter() - record.started_at) * 1000:.1f}")
    if record.stalls:
        parts.append(f"stall;dur={record.stall_seconds * 1000:.1f}")
    return ", ".join(parts)
