"""The large_response detector through a real uvicorn server: thresholds, headers, location."""

from __future__ import annotations

import inspect
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import Response

import perfmw
from perfmw.detectors import http
from perfmw.record import RequestRecord
from support import serve

KIB = 1024


def body(size: int) -> bytes:
    return b"x" * size


def build(registry: CollectorRegistry, **settings: Any) -> tuple[FastAPI, perfmw.Perf]:
    app = FastAPI()

    @app.get("/big")
    async def big() -> Response:
        return Response(body(600 * KIB), media_type="text/plain")

    @app.get("/medium")
    async def medium() -> Response:
        return Response(body(100 * KIB), media_type="text/plain")

    @app.get("/medium/etag")
    async def medium_etag() -> Response:
        return Response(body(100 * KIB), media_type="text/plain", headers={"ETag": '"v1"'})

    @app.get("/medium/cache-control")
    async def medium_cached() -> Response:
        return Response(body(100 * KIB), headers={"Cache-Control": "max-age=60"})

    @app.get("/big/encoded")
    async def big_encoded() -> Response:
        # Already encoded by the app: compression is on, cache headers are not.
        return Response(body(600 * KIB), headers={"Content-Encoding": "identity"})

    @app.post("/medium")
    async def medium_post() -> Response:
        return Response(body(100 * KIB))

    @app.get("/small")
    async def small() -> Response:
        return Response(body(64 * KIB))

    perf = perfmw.instrument(app, settings=perfmw.Settings(**settings), registry=registry)
    return app, perf


def findings(perf: perfmw.Perf) -> dict[str, dict[str, Any]]:
    return {f.route: f.to_dict() for f in perf.findings.snapshot() if f.kind == "large_response"}


def line_of(app: FastAPI, path: str) -> str:
    for route in app.routes:
        if getattr(route, "path", None) == path and "GET" in getattr(route, "methods", ()):
            endpoint = route.endpoint  # type: ignore[attr-defined]
            return f"tests/test_detectors_http.py:{inspect.getsourcelines(endpoint)[1]}"
    raise LookupError(path)


def test_thresholds_headers_and_handler_location(registry: CollectorRegistry) -> None:
    app, perf = build(registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for path in ("/big", "/medium", "/medium/etag", "/medium/cache-control", "/big/encoded"):
            assert client.get(path).status_code == 200
        assert client.get("/big").status_code == 200
        assert client.post("/medium").status_code == 200
        assert client.get("/small").status_code == 200
    found = findings(perf)
    assert set(found) == {"/big", "/medium", "/big/encoded"}
    assert found["/big"]["detail"] == {
        "bytes": 600 * KIB,
        "problems": ["uncompressed", "no_cache_headers"],
        "method": "GET",
    }
    assert found["/big"]["count"] == 2
    assert found["/medium"]["detail"]["problems"] == ["no_cache_headers"]
    assert found["/big/encoded"]["detail"]["problems"] == ["no_cache_headers"]
    # The decorator line of the handler, as the user sees it in their editor.
    assert found["/big"]["location"] == line_of(app, "/big")
    assert found["/medium"]["location"] == line_of(app, "/medium")
    assert found["/big"]["total_seconds"] > 0


def test_gzip_middleware_compresses_and_is_not_flagged_for_size(
    registry: CollectorRegistry,
) -> None:
    app, perf = build(registry)
    app.add_middleware(GZipMiddleware, minimum_size=1000)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        response = client.get("/big", headers={"Accept-Encoding": "gzip"})
        assert response.headers["content-encoding"] == "gzip"
        assert len(response.content) == 600 * KIB
    # 600 KiB of one byte compresses to well under 64 KiB on the wire: nothing to report.
    assert findings(perf) == {}


def test_silenced_location_is_not_reported(registry: CollectorRegistry) -> None:
    app, perf = build(registry, silenced_locations=("tests/test_detectors_http.py",))
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/big").status_code == 200
    assert findings(perf) == {}


def test_endpoint_location_of_classes_instances_and_nothing() -> None:
    class Handler:
        async def __call__(self) -> None:
            return None

    assert http.endpoint_location(None) is None
    here = inspect.getsourcelines(Handler)[1]
    assert http.endpoint_location(Handler) == f"tests/test_detectors_http.py:{here}"
    call_line = inspect.getsourcelines(Handler.__call__)[1]
    assert http.endpoint_location(Handler()) == f"tests/test_detectors_http.py:{call_line}"
    assert http.endpoint_location(len) is None


def test_a_record_without_endpoint_still_gets_its_finding() -> None:
    record = RequestRecord("/x", "GET")
    record.response_bytes = 100 * KIB
    record.response_headers = [(b"content-type", b"text/plain")]
    record.duration_seconds = 0.01
    [finding] = http.detect(record, perfmw.Settings())
    assert (finding.kind, finding.route, finding.location) == ("large_response", "/x", None)
    record.response_headers = [(b"ETag", b'"1"')]
    assert http.detect(record, perfmw.Settings()) == []
