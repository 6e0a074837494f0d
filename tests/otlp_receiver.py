"""A real OTLP/HTTP trace receiver on 127.0.0.1: decodes ExportTraceServiceRequest protobuf bodies.

with OtlpReceiver() as receiver:                 # in a test
    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
    ...
    receiver.spans                               # every span received, decoded

python tests/otlp_receiver.py PORT [--count-only]   # as a process (the benchmarks use it)
"""

from __future__ import annotations

import gzip
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

SPAN_KINDS = {
    0: "UNSPECIFIED",
    1: "INTERNAL",
    2: "SERVER",
    3: "CLIENT",
    4: "PRODUCER",
    5: "CONSUMER",
}


@dataclass
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status_code: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any]
    scope: str
    links: list[str] = field(default_factory=list)
    dropped_attributes: int = 0
    status_message: str = ""
    trace_state: str = ""


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def _attributes(items: Any) -> dict[str, Any]:
    return {item.key: _value(item.value) for item in items if isinstance(item, KeyValue)}


def decode(body: bytes) -> list[ReceivedSpan]:
    """Every span of one ExportTraceServiceRequest body."""
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                        attributes=_attributes(span.attributes),
                        events=[(e.name, _attributes(e.attributes)) for e in span.events],
                        status_code=span.status.code,
                        resource=resource,
                        scope=scope_spans.scope.name,
                        links=[link.trace_id.hex() for link in span.links],
                        dropped_attributes=span.dropped_attributes_count,
                        status_message=span.status.message,
                        trace_state=span.trace_state,
                    )
                )
    return spans


class OtlpReceiver:
    """Serves POST /v1/traces on 127.0.0.1 (a random port) and keeps what it decodes."""

    def __init__(self, port: int = 0, decode: bool = True) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.bytes = 0
        self.decode = decode  # False: accept and count bodies only (a remote collector's cost)
        self.status = 200  # what it answers a well-formed export (500: a failing collector)
        # Answers given first, one per export, before `status`: (status, Retry-After or None).
        self.answers: list[tuple[int, str | None]] = []
        self.gate: threading.Event | None = None  # when set: each answer waits for it to open
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self._answer(404, b"")
                    return
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                spans: list[ReceivedSpan] = []
                if receiver.decode:
                    try:
                        spans = decode(body)
                    except Exception:
                        self._answer(400, b"")
                        return
                with receiver._lock:
                    status, after = (
                        receiver.answers.pop(0) if receiver.answers else (receiver.status, None)
                    )
                    if status < 300:  # what a collector refuses is not received
                        receiver.spans.extend(spans)
                    receiver.requests += 1
                    receiver.bytes += len(body)
                if receiver.gate is not None:
                    receiver.gate.wait(60)
                self._answer(status, ExportTraceServiceResponse().SerializeToString(), after)

            def _answer(self, status: int, body: bytes, after: str | None = None) -> None:
                self.send_response(status)
                if after is not None:
                    self.send_header("Retry-After", after)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler

    def start(self) -> OtlpReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def clear(self) -> None:
        with self._lock:
            self.spans.clear()
            self.requests = 0


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--")]
    receiver = OtlpReceiver(
        int(arguments[0]) if arguments else 0, decode="--count-only" not in sys.argv
    ).start()
    print(receiver.endpoint, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        receiver.stop()
