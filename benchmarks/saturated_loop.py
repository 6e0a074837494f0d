"""What perfmw costs while the loop is already in trouble: requests back to back, never yielding.

A burst can keep a loop busy for a second and more without it ever getting back to its event
queue. perfmw's loop monitor sees that as a stall and follows it, and its watchdog takes the GIL
from the late loop to sample its stack: an instrument must not make the incident worse.

In-process (the ASGI app called directly): rounds of 20,000 requests awaited back to back (over
a second each, bare), each round on a loop of its own so that perfmw's monitor watches its own
rounds only; interleaved, medians. Timed on the process's CPU clock, so that the watchdog
thread's CPU counts with the requests'. Budgets (issue 19): perfmw adds at most 6 µs per request
there too and at most a fifth of what prometheus-fastapi-instrumentator adds; its watchdog's
CPU is at most 2 % of the stalled time.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

import perfmw
from benchmarks._asgi import items_app, run_requests, table
from perfmw.loop.kernel import ThreadStat

REQUESTS = 20_000
ROUNDS = 7


def variants() -> dict[str, Any]:
    from prometheus_fastapi_instrumentator import Instrumentator

    with_perfmw = items_app()
    perfmw.instrument(
        with_perfmw, settings=perfmw.Settings(trace=False), registry=CollectorRegistry()
    )
    instrumentator = items_app()
    Instrumentator(registry=CollectorRegistry()).instrument(instrumentator)
    return {
        "bare FastAPI": items_app(),
        "perfmw": with_perfmw,
        "prometheus-fastapi-instrumentator": instrumentator,
    }


def watchdog_cpu() -> float:
    """CPU seconds of this process's loop watchdog so far (0 when there is none)."""
    for thread in threading.enumerate():
        if thread.name == "perfmw-loop-watchdog" and thread.native_id is not None:
            times = ThreadStat(thread.native_id, thread.ident or 0).now()
            return times[0] if times is not None else 0.0
    return 0.0


async def saturated_round(app: Any) -> tuple[float, float, float]:
    """CPU seconds of the process, wall seconds, and the watchdog's CPU seconds of one round."""
    await run_requests(app, 1, None)  # perfmw's monitor starts with the loop's first request
    cpu, wall, watchdog = time.process_time(), time.perf_counter(), watchdog_cpu()
    await run_requests(app, REQUESTS, None)
    return (
        time.process_time() - cpu,
        time.perf_counter() - wall,
        watchdog_cpu() - watchdog,  # read before the loop (and its watchdog) ends
    )


def main() -> None:
    apps = variants()
    cpu: dict[str, list[float]] = {name: [] for name in apps}
    stalled = watched = 0.0
    for app in apps.values():
        asyncio.run(run_requests(app, 200))  # warm up: middleware stacks, caches
    for _ in range(ROUNDS):
        for name, app in apps.items():
            spent, wall, watchdog = asyncio.run(saturated_round(app))
            cpu[name].append(spent / REQUESTS * 1e6)
            if name == "perfmw":
                stalled, watched = stalled + wall, watched + watchdog
    medians = {name: statistics.median(values) for name, values in cpu.items()}
    print(table(medians, "bare FastAPI"))
    base = medians["bare FastAPI"]
    ours = medians["perfmw"] - base
    instrumentator = medians["prometheus-fastapi-instrumentator"] - base
    print(
        f"\nsaturated loop: perfmw adds {ours:.1f} µs/request (budget 6.0); "
        f"{ours / instrumentator:.2f} of prometheus-fastapi-instrumentator's "
        f"{instrumentator:.1f} µs (budget 0.20); its watchdog's CPU was "
        f"{watched / stalled:.2%} of the stalled time (budget 2%)"
    )


if __name__ == "__main__":
    main()
