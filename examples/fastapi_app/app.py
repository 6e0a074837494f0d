"""A small service registry on MongoDB, with each performance anti-pattern beside its fix.

    uvicorn examples.fastapi_app.app:app     # embedded MongoDB unless MONGODB_URI is set

Anti-pattern                         | Fixed twin
-------------------------------------|-----------------------------------------
GET /servers-with-agents (N+1)       | GET /servers-with-agents/batched ($in)
GET /dashboard (sequential awaits)   | GET /dashboard/concurrent (asyncio.gather)
GET /reports/blocking (time.sleep)   | GET /reports/threadpool (run_in_threadpool)
GET /servers/legacy (sync client)    | GET /servers (AsyncMongoClient)
GET /servers/{id}/uncached           | GET /servers/{id} (TTLCache)
GET /servers/by-owner (no index)     | GET /servers/by-region (indexed)
GET /agents/export (no limit)        | GET /agents?limit=100 (paginated)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from cachetools import TTLCache
from fastapi import FastAPI, HTTPException
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient, MongoClient
from starlette.concurrency import run_in_threadpool

import perfmw

SERVERS = 1000
AGENTS_PER_SERVER = 5
EXPORT_AGENTS = SERVERS * AGENTS_PER_SERVER  # what /agents/export reads at once
REGIONS = ("eu-west", "us-east", "ap-south", "sa-east")
ROLLOUT = "2.0"  # the agent version being rolled out: no agent runs it yet


async def seed(db: Any) -> None:
    """Fill an empty database with servers, agents and incidents."""
    if await db.servers.estimated_document_count():
        return
    await db.servers.insert_many(
        {
            "_id": i,
            "name": f"srv-{i:04d}",
            "region": REGIONS[i % len(REGIONS)],
            "owner": f"team-{i % 4}",  # 250 servers each, as many as a region has
            "status": "down" if i % 50 == 0 else "up",
        }
        for i in range(SERVERS)
    )
    await db.agents.insert_many(
        {"server_id": i % SERVERS, "name": f"agent-{i}", "version": f"1.{i % 5}"}
        for i in range(EXPORT_AGENTS)
    )
    await db.incidents.insert_many(
        {"server_id": i % SERVERS, "severity": i % 3, "open": i % 20 == 0} for i in range(300)
    )
    await db.agents.create_index("server_id")
    await db.servers.create_index("region")
    # The fixed twins are fixed all the way: the dashboard's counts and the paginated /agents
    # (sorted by name) use indexes; only /servers/by-owner filters on an unindexed field.
    await db.servers.create_index("status")
    await db.incidents.create_index("open")
    await db.agents.create_index("version")
    await db.agents.create_index("name")


def create_app(
    mongo_uri: str | None = None,
    *,
    settings: perfmw.Settings | None = None,
    registry: CollectorRegistry | None = None,
    tracer_provider: Any = None,
) -> FastAPI:
    """The service, instrumented; with no URI (and no MONGODB_URI) it starts an embedded MongoDB."""
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            uri = mongo_uri or os.environ.get("MONGODB_URI")
            if not uri:
                from secantus import SecantusDBServer

                storage = stack.enter_context(tempfile.TemporaryDirectory())
                uri = stack.enter_context(SecantusDBServer(storage_path=storage)).uri
            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(uri)
            stack.push_async_callback(client.close)
            # Off the loop: building a MongoClient (its monitor threads, its pool) stalled it
            # at start-up now and then, a stall of no endpoint's.
            sync_client: MongoClient[dict[str, Any]] = await asyncio.to_thread(MongoClient, uri)
            # Closed off the loop too: it ends its sessions on the server, and a server gone
            # first (Ctrl-C stops the embedded one with the app) keeps it waiting for seconds.
            stack.push_async_callback(asyncio.to_thread, sync_client.close)
            state["db"] = client.registry
            state["sync_db"] = sync_client.registry
            await seed(state["db"])
            # What start-up built lives as long as the process: out of the collector's way, a
            # full collection during a request walks only what requests allocate.
            gc.freeze()
            yield

    app = FastAPI(title="service registry", lifespan=lifespan)
    server_cache = perfmw.watch_cache(
        TTLCache(maxsize=100, ttl=300), name="servers", registry=registry
    )

    def db() -> Any:
        return state["db"]

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # The servers in a status (indexed), the ones down unless asked.
    @app.get("/servers")
    async def list_servers(status: str = "down", limit: int = 50) -> list[dict[str, Any]]:
        cursor = db().servers.find({"status": status}, {"name": 1, "region": 1})
        return await cursor.limit(limit).to_list()

    # N+1: one query per server for its agents.
    @app.get("/servers-with-agents")
    async def servers_with_agents() -> list[dict[str, Any]]:
        servers = await db().servers.find({}, {"name": 1}).sort("_id").limit(20).to_list()
        for server in servers:
            agents = db().agents.find({"server_id": server["_id"]}, {"_id": 0})
            server["agents"] = await agents.to_list()
        return servers

    # Fixed: one query for all the agents ($in), joined in memory: the same agents, the same
    # answer, one round trip.
    @app.get("/servers-with-agents/batched")
    async def servers_with_agents_batched() -> list[dict[str, Any]]:
        servers = await db().servers.find({}, {"name": 1}).sort("_id").limit(20).to_list()
        ids = [server["_id"] for server in servers]
        agents = await db().agents.find({"server_id": {"$in": ids}}, {"_id": 0}).to_list()
        by_server: dict[int, list[dict[str, Any]]] = {}
        for agent in agents:
            by_server.setdefault(agent["server_id"], []).append(agent)
        for server in servers:
            server["agents"] = by_server.get(server["_id"], [])
        return servers

    # Sequential awaits of three independent reads. Indexed counts of a few documents each,
    # mostly a round trip, as on a MongoDB: the stand-in MongoDB runs one command at a time
    # and counts document by document, so a gather there overlaps the round trips only (the
    # 980 servers up would leave it little to overlap).
    @app.get("/dashboard")
    async def dashboard() -> dict[str, int]:
        servers = await db().servers.count_documents({"status": "down"})
        upgraded = await db().agents.count_documents({"version": ROLLOUT})
        incidents = await db().incidents.count_documents({"open": True})
        return {"servers_down": servers, "agents_upgraded": upgraded, "open_incidents": incidents}

    # Fixed: the same three reads run concurrently.
    @app.get("/dashboard/concurrent")
    async def dashboard_concurrent() -> dict[str, int]:
        servers, upgraded, incidents = await asyncio.gather(
            db().servers.count_documents({"status": "down"}),
            db().agents.count_documents({"version": ROLLOUT}),
            db().incidents.count_documents({"open": True}),
        )
        return {"servers_down": servers, "agents_upgraded": upgraded, "open_incidents": incidents}

    def render_report(seconds: float = 0.15) -> dict[str, str]:
        time.sleep(seconds)  # stands for a slow synchronous library call
        return {"report": "ready"}

    # Blocks the event loop: every other request waits.
    @app.get("/reports/blocking")
    async def report_blocking(seconds: float = 0.15) -> dict[str, str]:
        return render_report(min(seconds, 5.0))

    # Fixed: the blocking work runs in a worker thread.
    @app.get("/reports/threadpool")
    async def report_threadpool() -> dict[str, str]:
        return await run_in_threadpool(render_report)

    # A sync MongoClient inside async def: the loop waits for the network.
    @app.get("/servers/legacy")
    async def list_servers_legacy(status: str = "down", limit: int = 50) -> list[dict[str, Any]]:
        cursor = state["sync_db"].servers.find({"status": status}, {"name": 1, "region": 1})
        return list(cursor.limit(limit))

    # A filter on a field with no index: a collection scan.
    @app.get("/servers/by-owner")
    async def servers_by_owner(owner: str) -> list[dict[str, Any]]:
        return await db().servers.find({"owner": owner}, {"name": 1}).limit(100).to_list()

    @app.get("/servers/by-region")
    async def servers_by_region(region: str) -> list[dict[str, Any]]:
        return await db().servers.find({"region": region}, {"name": 1}).limit(100).to_list()

    # Reads every agent: no limit, no projection.
    @app.get("/agents/export")
    async def export_agents() -> list[dict[str, Any]]:
        return await db().agents.find({}, {"_id": 0}).to_list()

    # Fixed: a page at a time, from the name the client saw last (a range on the indexed sort
    # key: a skip would still walk every agent before the page).
    @app.get("/agents")
    async def list_agents(limit: int = 100, after: str = "") -> list[dict[str, Any]]:
        page = {"name": {"$gt": after}}
        cursor = db().agents.find(page, {"_id": 0, "name": 1, "server_id": 1})
        return await cursor.sort("name").limit(min(limit, 1000)).to_list()

    async def load_server(server_id: int) -> dict[str, Any]:
        server = await db().servers.find_one({"_id": server_id})
        if server is None:
            raise HTTPException(status_code=404, detail="no such server")
        return dict(server)

    @app.get("/servers/{server_id}")
    async def get_server(server_id: int) -> dict[str, Any]:
        if server_id in server_cache:
            return dict(server_cache[server_id])
        server = await load_server(server_id)
        server_cache[server_id] = server
        return server

    @app.get("/servers/{server_id}/uncached")
    async def get_server_uncached(server_id: int) -> dict[str, Any]:
        return await load_server(server_id)

    @app.put("/servers/{server_id}")
    async def update_server(server_id: int, changes: dict[str, Any]) -> dict[str, Any]:
        changes.pop("_id", None)
        result = await db().servers.update_one({"_id": server_id}, {"$set": changes})
        if result.matched_count == 0:
            raise HTTPException(status_code=404, detail="no such server")
        server_cache.pop(server_id, None)  # invalidate: the next read goes to MongoDB
        return await load_server(server_id)

    perfmw.instrument(app, settings=settings, registry=registry, tracer_provider=tracer_provider)
    return app


app = create_app(settings=perfmw.Settings.from_env())
