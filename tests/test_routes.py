"""Route labels through a real uvicorn server: the full template of every routing shape.

These run in the main venv (the newest Starlette and FastAPI) and in .venv-oldest (the oldest
supported ones, `make compat`): FastAPI changed how include_router routes are stored, and the
labels must be the same on both.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from fastapi import APIRouter, FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router
from starlette.staticfiles import StaticFiles

import perfmw
from support import label_values, request_count, serve


def plain(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def routes_of(text: str) -> set[str]:
    return label_values(text, "http_server_request_duration_seconds_count", "http_route")


def counts_of(text: str, labels: set[str], method: str = "GET") -> dict[str, float | None]:
    return {label: request_count(text, label, method=method) for label in labels}


def api_app() -> FastAPI:
    """Routers as real services build them: prefixes on routers and on include_router."""
    servers = APIRouter(prefix="/servers")

    @servers.get("")
    async def list_servers() -> list[int]:
        return []

    @servers.get("/{server_id}")
    async def get_server(server_id: int) -> int:
        return server_id

    api = APIRouter()
    api.include_router(servers)  # nested: /api + /servers + the route
    api.add_route("/health", plain)  # a plain Starlette route in a router
    well_known = APIRouter()

    @well_known.get("/mcp-servers")
    async def mcp_servers() -> list[str]:
        return []

    items = APIRouter()

    @items.get("/items/{item_id}")
    async def get_item(tenant: str, item_id: int) -> str:
        return tenant

    status = APIRouter()

    @status.get("/status")
    async def get_status() -> str:
        return "up"

    app = FastAPI()
    app.include_router(api, prefix="/api")
    app.include_router(well_known, prefix="/.well-known")
    app.include_router(items, prefix="/tenants/{tenant}")
    # One router included twice: two templates, not the first one twice.
    app.include_router(status, prefix="/v1")
    app.include_router(status, prefix="/v2")
    return app


def test_include_router_prefixes_are_part_of_the_label(registry: CollectorRegistry) -> None:
    app = api_app()
    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for path in (
            "/api/servers",
            "/api/servers/1",
            "/api/servers/2",
            "/api/health",
            "/.well-known/mcp-servers",
            "/tenants/acme/items/3",
            "/tenants/globex/items/4",
            "/v1/status",
            "/v2/status",
            "/v2/status",
        ):
            assert client.get(path).status_code == 200, path
        assert client.get("/api/servers/1/nope").status_code == 404
        assert client.delete("/api/servers/1").status_code == 405
        text = client.get("/metrics").text

    assert routes_of(text) == {
        "/api/servers",
        "/api/servers/{server_id}",
        "/api/health",
        "/.well-known/mcp-servers",
        "/tenants/{tenant}/items/{item_id}",
        "/v1/status",
        "/v2/status",
        "<unmatched>",
    }
    assert counts_of(text, routes_of(text) - {"<unmatched>"}) == {
        "/api/servers": 1,
        "/api/servers/{server_id}": 2,
        "/api/health": 1,
        "/.well-known/mcp-servers": 1,
        "/tenants/{tenant}/items/{item_id}": 2,
        "/v1/status": 1,
        "/v2/status": 2,
    }
    assert request_count(text, "<unmatched>", "404") == 1
    assert request_count(text, "/api/servers/{server_id}", "405", method="DELETE") == 1


def test_mounts_hosts_and_sub_apps_are_part_of_the_label(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    (tmp_path / "app.css").write_text("body {}")
    admin = Starlette(routes=[Route("/users/{user_id}", plain)])
    things = APIRouter()

    @things.get("/{thing_id}")
    async def get_thing(thing_id: int) -> int:
        return thing_id

    sub = FastAPI()
    sub.include_router(things, prefix="/things")
    app = FastAPI()
    app.mount("/sub", sub)  # a FastAPI sub-app whose own router has a prefix
    app.router.routes.extend(
        [
            Mount("/admin", app=admin),
            Mount("/a", routes=[Mount("/b/{shard}", routes=[Route("/c/{x}", plain)])]),
            Mount("/static", app=StaticFiles(directory=tmp_path)),
            Host("api.example.com", app=Router(routes=[Route("/ping", plain)])),
        ]
    )
    perfmw.instrument(app, registry=registry)
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for path in (
            "/sub/things/1",
            "/sub/things/2",
            "/admin/users/7",
            "/a/b/0/c/x",
            "/a/b/1/c/y",
            "/static/app.css",
        ):
            assert client.get(path).status_code == 200, path
        assert client.get("/ping", headers={"Host": "api.example.com"}).status_code == 200
        text = client.get("/metrics").text

    assert counts_of(text, routes_of(text)) == {
        "/sub/things/{thing_id}": 2,
        "/admin/users/{user_id}": 1,
        "/a/b/{shard}/c/{x}": 2,
        "/static": 1,
        "/ping": 1,
    }


def test_a_preflight_answered_before_routing_gets_the_full_template(
    registry: CollectorRegistry,
) -> None:
    app = api_app()
    app.add_middleware(CORSMiddleware, allow_origins=["https://example.com"], allow_methods=["GET"])
    perfmw.instrument(app, registry=registry)
    preflight = {"Origin": "https://example.com", "Access-Control-Request-Method": "GET"}
    with serve(app) as server, httpx.Client(base_url=server.url) as client:
        for path in ("/api/servers/3", "/tenants/acme/items/4", "/v2/status", "/api/nowhere"):
            assert client.options(path, headers=preflight).status_code == 200, path
        text = client.get("/metrics").text

    assert counts_of(text, routes_of(text), method="OPTIONS") == {
        "/api/servers/{server_id}": 1,
        "/tenants/{tenant}/items/{item_id}": 1,
        "/v2/status": 1,
        "<unmatched>": 1,
    }
