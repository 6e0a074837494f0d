"""`configure_tracing()`: a TracerProvider exporting OTLP/HTTP protobuf, kind to tail latency.

    provider = perfmw.configure_tracing("registry")   # OTEL_* environment variables honoured

OpenTelemetry's BatchSpanProcessor encodes spans on its export thread, a whole batch at once.
Encoding is Python work holding the GIL: a batch of 512 spans is about 15 ms of CPU during which
the event loop's thread waits for the GIL, and the requests it serves at that moment are late:
we measured p99 at concurrency 1 going from 0.25 ms to 18-24 ms. `LoopFriendlySpanProcessor`
encodes each span where it ends (a request's span after its response went out), writing
protobuf's wire format directly (`_otlp_wire.py`, a fraction of the exporter's encoding cost),
and leaves only network I/O to its thread. docs/tracing.md has the numbers.
"""

from __future__ import annotations

import gzip
import http.client
import logging
import math
import os
import random
import ssl
import threading
import time
import urllib.parse
import weakref
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace as otel_trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from .. import _guard
from ._mongo_spans import instrument_pymongo
from ._otlp_wire import Group, encode_request, sampled_span

logger = logging.getLogger("perfmw")

_EXPORT_GUARD = _guard.guard("tracing-export")
DEFAULT_ENDPOINT = "http://localhost:4318"
TRACES_PATH = "/v1/traces"


def configure_tracing(service_name: str | None = None, *, set_global: bool = True) -> Any:
    """A TracerProvider exporting to an OTLP/HTTP endpoint (Jaeger, a collector), set globally.

    `service_name` is used unless OTEL_SERVICE_NAME is set. OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT,
    _HEADERS, _TIMEOUT, _COMPRESSION, _CERTIFICATE, _PROTOCOL (http/protobuf only: any other
    raises ValueError here rather than being ignored), OTEL_TRACES_SAMPLER(_ARG),
    OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_EXPORTER (otlp or none) and OTEL_BSP_SCHEDULE_DELAY,
    _MAX_QUEUE_SIZE, _MAX_EXPORT_BATCH_SIZE are honoured. Spans are encoded and sent by perfmw
    itself: OpenTelemetry's OTLP exporter package is not needed.
    Returns the provider; with `set_global=False` it is not made the global one (pass it to
    `perfmw.instrument(app, tracer_provider=...)`).
    """
    if service_name is not None and (not isinstance(service_name, str) or not service_name):
        raise ValueError(f"service_name must be a non-empty string, got {service_name!r}")
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter not in ("otlp", "none"):
        raise ValueError(
            f"OTEL_TRACES_EXPORTER={exporter!r}: perfmw.configure_tracing() exports with "
            "'otlp' (or 'none'); build your own TracerProvider for other exporters"
        )
    protocol_variable = next(
        (name for name in _variables("PROTOCOL") if os.environ.get(name, "").strip()), None
    )
    protocol = os.environ[protocol_variable].strip().lower() if protocol_variable else ""
    if exporter == "otlp" and protocol not in ("", "http/protobuf"):
        raise ValueError(
            f"{protocol_variable}={protocol!r}: perfmw.configure_tracing() sends OTLP over HTTP "
            "as protobuf ('http/protobuf'); for another protocol, build a TracerProvider with "
            "OpenTelemetry's exporter for it and pass it to "
            "perfmw.instrument(app, tracer_provider=...)"
        )
    attributes: dict[str, str] = {}
    if service_name and not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler from OTEL_*
    if exporter == "otlp":
        provider.add_span_processor(
            LoopFriendlySpanProcessor(
                OtlpHttpSender.from_env(),
                max_queue_size=_env_int("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
                max_export_batch_size=_env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
                schedule_delay_millis=_env_int("OTEL_BSP_SCHEDULE_DELAY", 5000),
            )
        )
    if set_global:
        otel_trace.set_tracer_provider(provider)
    instrument_pymongo()  # MongoDB clients created from now on get child spans
    return provider


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return value


def _variables(name: str) -> tuple[str, str]:
    """The variables that set `name`, the traces' own first."""
    return f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"


def _env(name: str) -> str | None:
    """OTEL_EXPORTER_OTLP_TRACES_<name>, else OTEL_EXPORTER_OTLP_<name>."""
    traces, general = _variables(name)
    value = os.environ.get(traces) or os.environ.get(general)
    return value.strip() if value else None


#: Answers after which the OTLP specification says to send the same batch again, later.
RETRYABLE = frozenset({429, 502, 503, 504})
#: The first wait before sending a batch again, doubled at each attempt (with jitter) up to the
#: longest; after the last attempt the batch is dropped.
RETRY_FIRST_SECONDS = 1.0
RETRY_LONGEST_SECONDS = 32.0
RETRY_ATTEMPTS = 6


class Retryable(Exception):
    """The collector answered `status`: send the batch again, after `after` seconds if it
    said (Retry-After)."""

    def __init__(self, status: int, after: float | None) -> None:
        super().__init__(f"answered {status}")
        self.status = status
        self.after = after


def _seconds(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds (a date instead is ignored), at most the longest
    wait."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    if seconds is None or not 0 <= seconds < math.inf:
        return None
    return min(seconds, RETRY_LONGEST_SECONDS)


class OtlpHttpSender:
    """POSTs encoded ExportTraceServiceRequest bodies to an OTLP/HTTP endpoint."""

    def __init__(
        self,
        endpoint: str,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
        compression: str = "none",
        certificate: str | None = None,
    ) -> None:
        url = urllib.parse.urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"OTLP endpoint must be an http(s) URL, got {endpoint!r}")
        if compression not in ("none", "gzip"):
            raise ValueError(f"OTLP compression must be 'none' or 'gzip', got {compression!r}")
        self.endpoint = endpoint
        self._url = url
        self._path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        self._headers = {"Content-Type": "application/x-protobuf", **(headers or {})}
        if compression == "gzip":
            self._headers["Content-Encoding"] = "gzip"
        self._compression = compression
        self._timeout = timeout
        self._context = (
            ssl.create_default_context(cafile=certificate) if url.scheme == "https" else None
        )
        self._connection: http.client.HTTPConnection | None = None

    @classmethod
    def from_env(cls) -> OtlpHttpSender:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        if not endpoint:
            base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
            endpoint = base.rstrip("/") + TRACES_PATH
        headers: dict[str, str] = {}
        for item in (_env("HEADERS") or "").split(","):
            name, sep, value = item.partition("=")
            if sep and name.strip():
                headers[urllib.parse.unquote(name.strip())] = urllib.parse.unquote(value.strip())
        timeout_raw = _env("TIMEOUT")
        try:
            timeout = float(timeout_raw) if timeout_raw else 10.0
        except ValueError:
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_TIMEOUT must be seconds, got {timeout_raw!r}"
            ) from None
        compression = (_env("COMPRESSION") or "none").lower()
        return cls(endpoint, headers, timeout, compression, _env("CERTIFICATE"))

    def send(self, body: bytes) -> bool:
        """One POST (retried once on a dropped keep-alive connection); True when accepted,
        False when refused. An answer the OTLP specification calls retryable (429, 502, 503,
        504) raises `Retryable`, with the wait its Retry-After header asks for."""
        if self._compression == "gzip":
            body = gzip.compress(body, compresslevel=6)
        for attempt in (1, 2):
            connection = self._connection or self._connect()
            try:
                connection.request("POST", self._path, body, self._headers)
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                self._connection = None
                if attempt == 2:
                    raise
                continue
            if response.status in RETRYABLE:
                raise Retryable(response.status, _seconds(response.getheader("Retry-After")))
            if response.status >= 300:
                logger.warning(
                    "OTLP endpoint %s answered %d; spans dropped", self.endpoint, response.status
                )
                return False
            return True
        return False

    def _connect(self) -> http.client.HTTPConnection:
        url = self._url
        if url.scheme == "https":
            self._connection = http.client.HTTPSConnection(
                url.hostname or "", url.port, timeout=self._timeout, context=self._context
            )
        else:
            self._connection = http.client.HTTPConnection(
                url.hostname or "", url.port, timeout=self._timeout
            )
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


class LoopFriendlySpanProcessor(SpanProcessor):
    """Batches spans like BatchSpanProcessor, but never encodes a batch on a thread.

    Each span is encoded where it ends (a request's server span after its response was sent),
    in protobuf's wire format: a small, steady cost (about 6 µs) instead of a burst that holds
    the GIL, and only bytes are kept, no span objects (holding spans to encode them 16 or 64
    at a time gave wrk's p99 at 32 connections 21 and 28 ms, against 15 ms encoding each).
    The encoded spans are wrapped into one request (resource and scope headers, done once)
    and posted by a background thread, which otherwise only does network I/O (that releases
    the GIL), every `schedule_delay_millis` or once `max_export_batch_size` spans wait. Spans
    beyond `max_queue_size` are dropped and counted in `dropped_spans`. A batch the collector
    answers 429, 502, 503 or 504 is sent again later, as the OTLP specification says: after
    the Retry-After it gives, else after 1 s doubling to 32 s (with jitter), up to 6 attempts;
    new spans wait meanwhile in the bounded queue.
    """

    #: It reads only a span's fields: perfmw's tracing may hand it `LeanSpan`s (_lean_span.py).
    takes_lean_spans = True

    def __init__(
        self,
        sender: OtlpHttpSender,
        *,
        max_queue_size: int = 2048,
        max_export_batch_size: int = 512,
        schedule_delay_millis: int = 5000,
        retry_first_seconds: float = RETRY_FIRST_SECONDS,
    ) -> None:
        self.sender = sender
        self.retry_first_seconds = retry_first_seconds
        self.max_queue_size = max_queue_size
        self.max_export_batch_size = min(max_export_batch_size, max_queue_size)
        self.schedule_delay = schedule_delay_millis / 1000.0
        self.dropped_spans = 0
        # Encoded spans waiting to be sent, by (resource, scope): what encode_request takes.
        self._groups: dict[tuple[int, int], Group] = {}
        self._queued = 0  # spans in _groups
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None  # started by the first span, per process
        self._closed = False
        self._warned = False
        # A batch the collector asked for again (429, 502, 503, 504): sent when it is due.
        self._retry: bytes | None = None
        self._retry_at = 0.0
        self._attempts = 0
        _processors.add(self)

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._closed:
            return
        try:  # perfmw's guard, without a context manager's two calls per span
            sampled = sampled_span(span)
            if sampled is None:
                return
            resource, scope, encoded = sampled
            key = (id(resource), id(scope))
            with self._lock:
                if self._queued >= self.max_queue_size:
                    self.dropped_spans += 1
                    return
                group = self._groups.get(key)
                if group is None:
                    group = self._groups[key] = (resource, scope, [])
                group[2].append(encoded)
                self._queued += 1
                full = self._queued == self.max_export_batch_size
            if full:
                self._wake.set()
            if self._thread is None:
                self._start_thread()
        except Exception as exc:
            _guard.swallowed(_EXPORT_GUARD.component, exc)

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="perfmw-otlp-export", daemon=True
            )
            self._thread.start()

    def _forked(self) -> None:
        """In a forked child: the parent's thread does not exist here; the first span starts
        one, and what the parent had queued is the parent's to send."""
        self._thread = None
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._groups, self._queued = {}, 0
        self._retry, self._attempts = None, 0

    def _run(self) -> None:
        while not self._closed:
            retry = self._retry is not None
            self._wake.wait(
                max(0.0, self._retry_at - time.monotonic()) if retry else self.schedule_delay
            )
            self._wake.clear()
            with _EXPORT_GUARD:
                self._export()

    def _export(self, now: bool = False) -> bool:
        """Send the batch the collector asked for again, once it is due (at once with `now`),
        then every span encoded so far, as one request."""
        with self._send_lock:
            if self._retry is not None:
                if not now and time.monotonic() < self._retry_at:
                    return False
                if not self._send(self._retry) or self._retry is not None:
                    return False
            with self._lock:
                groups, self._groups = self._groups, {}
                self._queued = 0
            if not groups:
                return True
            return self._send(encode_request(groups.values()))

    def _send(self, body: bytes) -> bool:
        self._retry = None
        try:
            accepted = self.sender.send(body)
        except Retryable as answer:
            self._attempts += 1
            if self._attempts >= RETRY_ATTEMPTS:
                logger.warning(
                    "OTLP endpoint %s answered %d to %d attempts; spans dropped",
                    self.sender.endpoint,
                    answer.status,
                    self._attempts,
                )
                self._attempts = 0
                return False
            backoff = self.retry_first_seconds * 2 ** (self._attempts - 1)
            wait = answer.after
            if wait is None:
                wait = min(backoff, RETRY_LONGEST_SECONDS) * random.uniform(0.5, 1.0)
            self._retry, self._retry_at = body, time.monotonic() + wait
            self._wake.set()  # the export thread waits for it from now on
            return False
        except Exception as exc:  # the collector is unreachable: drop these, say so once
            self._attempts = 0
            if not self._warned:
                self._warned = True
                logger.warning(
                    "perfmw could not send spans to %s (%r); dropping them until it "
                    "answers (logged once)",
                    self.sender.endpoint,
                    exc,
                )
            return False
        self._attempts = 0
        return accepted

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        """Send everything queued, now, on the calling thread."""
        return self._export(now=True)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._export(now=True)
        self._closed = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout=5)
        self.sender.close()


#: Every processor of this process, for the fork hook below.
_processors: weakref.WeakSet[LoopFriendlySpanProcessor] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for processor in list(_processors):
        processor._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
