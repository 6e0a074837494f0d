"""Drive an ASGI app in-process: the per-request cost of the app and its middleware alone."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "GET",
    "scheme": "http",
    "path": "/items/42",
    "raw_path": b"/items/42",
    "root_path": "",
    "query_string": b"",
    "headers": [(b"host", b"127.0.0.1:8000"), (b"user-agent", b"bench")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
    "state": {},
}


def items_app() -> Any:
    """The FastAPI app every per-request benchmark measures: one route with a path parameter."""
    from fastapi import FastAPI  # imported late: multiprocess runs set their environment first

    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    return app


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: dict[str, Any]) -> None:
    return None


async def run_requests(app: Any, requests: int, yield_every: int | None = 100) -> None:
    """`requests` requests awaited in turn, back to the loop every `yield_every` of them, as a
    server's loop is between requests. Without that (None) the run is one long event-loop
    stall, which the loop monitor follows: benchmarks/saturated_loop.py measures that case."""
    for i in range(requests):
        await app(dict(SCOPE), _receive, _send)
        if yield_every is not None and i % yield_every == yield_every - 1:
            await asyncio.sleep(0)


def per_request_us(
    variants: dict[str, Any], requests: int = 2000, rounds: int = 15
) -> dict[str, float]:
    """Median CPU µs per request of each variant, in interleaved rounds on one loop.

    CPU time of this thread: what the requests cost, not what other processes on a shared
    machine took from us while they ran.
    """
    timings: dict[str, list[float]] = {name: [] for name in variants}

    async def main() -> None:
        for app in variants.values():  # warm up: build middleware stacks, fill caches
            await run_requests(app, 200)
        for _ in range(rounds):
            for name, app in variants.items():
                started = time.thread_time()
                await run_requests(app, requests)
                timings[name].append((time.thread_time() - started) / requests * 1e6)

    asyncio.run(main())
    return {name: statistics.median(values) for name, values in timings.items()}


def table(
    medians: dict[str, float], baseline: str, notes: Callable[[str], str] = lambda name: ""
) -> str:
    """A Markdown table: µs/request, added µs, ratio to the baseline."""
    base = medians[baseline]
    lines = [
        "| variant | µs/request | added µs | ratio to bare | |",
        "|---|---:|---:|---:|---|",
    ]
    for name, value in medians.items():
        lines.append(
            f"| {name} | {value:.1f} | {value - base:+.1f} | {value / base:.2f}x | {notes(name)} |"
        )
    return "\n".join(lines)
