"""Event-loop monitor: stalls with the culprit's line, request and measured cause; loop lag; GC.

One monitor per running loop, started by `Perf.on_loop()` (asyncio and uvloop alike), shared by
every app served on it:

- `monitor.py`: the heartbeat on the loop and the watchdog thread that follows a stall;
- `causes.py`: why a stall happened, a pure function of what was measured of the loop thread;
- `kernel.py`: those measurements (schedstat, cgroup throttling) and the watchdog's timer;
- `gc_clock.py`: garbage collections timed process-wide;
- `requests.py`: which request's code a stack sample shows.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from .. import perf
from ..exporters.prometheus import PrometheusSink
from ..record import RequestRecord
from . import gc_clock
from .causes import CAUSES, CODE_CAUSES, MACHINE_CAUSES, Signals, classify
from .monitor import MIN_THRESHOLD_SECONDS, LoopMonitor, settle_record

_monitors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMonitor] = (
    weakref.WeakKeyDictionary()
)
_registry_lock = threading.RLock()


def monitor_for(loop: asyncio.AbstractEventLoop) -> LoopMonitor | None:
    """The running monitor of a loop, if any."""
    with _registry_lock:
        monitor = _monitors.get(loop)
    return None if monitor is None or monitor.stopped else monitor


def _running() -> list[LoopMonitor]:
    with _registry_lock:
        return [m for m in _monitors.values() if not m.stopped]


def start(owner: perf.Perf) -> None:
    """`Perf.on_loop` hook: monitor the running loop (one monitor per loop)."""
    if owner.closed:
        return
    loop = asyncio.get_running_loop()
    with _registry_lock:
        monitor = _monitors.get(loop)
        if monitor is not None and not monitor.stopped:
            if owner not in monitor.perfs:
                monitor.perfs.append(owner)
                monitor.threshold = min(
                    monitor.threshold,
                    max(owner.settings.stall_threshold_seconds, MIN_THRESHOLD_SECONDS),
                )
        else:
            monitor = LoopMonitor(loop, owner)
            _monitors[loop] = monitor
            monitor.start(loop)
    if monitor not in owner._loops:
        owner._loops.append(monitor)
    _refresh()


def stop(owner: perf.Perf) -> None:
    """`perf.shutdown()` hook: detach from its monitors; a monitor left alone stops."""
    monitors = [m for m in owner._loops if isinstance(m, LoopMonitor)]
    owner._loops[:] = [m for m in owner._loops if not isinstance(m, LoopMonitor)]
    for monitor in monitors:
        with _registry_lock:
            if owner in monitor.perfs:
                monitor.perfs.remove(owner)
            alone = not monitor.perfs
        if alone:
            monitor.stop()
    _refresh()


def forget(monitor: LoopMonitor, loop: asyncio.AbstractEventLoop | None) -> None:
    """A stopped monitor leaves the registry (called by `LoopMonitor.stop`)."""
    with _registry_lock:
        if loop is not None and _monitors.get(loop) is monitor:
            del _monitors[loop]
    _refresh()


def _refresh() -> None:
    """Point the GC clock and the lag gauges at the sinks of every running monitor."""
    monitors = _running()
    sinks: dict[int, PrometheusSink] = {}
    for monitor in monitors:
        for owner in monitor.perfs:
            sinks.setdefault(id(owner.sink), owner.sink)
    gc_clock.refresh(sinks.values(), min((m.threshold / 2 for m in monitors), default=float("inf")))
    with _registry_lock:
        for key, (sink, source) in list(_lag_sources.items()):
            if key not in sinks:
                sink.remove_source(source)
                del _lag_sources[key]
        for key, sink in sinks.items():
            if key not in _lag_sources:
                source = _lag_source(sink)
                sink.add_source(source)
                _lag_sources[key] = (sink, source)


# --- Queries that waited behind a stall ---


def stalled_queries(record: RequestRecord) -> None:
    """`Perf.finish` hook: how long of each query awaited on a loop that loop was stalled."""
    for query in record.queries:
        loop = query.on_loop
        if loop is None:
            continue
        monitor = monitor_for(loop)
        if monitor is not None and (monitor.recent or monitor._stall is not None):
            query.stall_seconds = monitor.overlap(query.started_at, query.finished_at)


# --- perfmw_event_loop_lag_seconds, read at scrape time ---

_lag_sources: dict[int, tuple[PrometheusSink, Any]] = {}


def _lag_source(sink: PrometheusSink) -> Any:
    def collect() -> Iterable[Metric]:
        lags = [m.lag for m in _running() if any(p.sink is sink for p in m.perfs)]
        gauge = GaugeMetricFamily(
            "perfmw_event_loop_lag_seconds",
            "How late the event loop ran its latest heartbeat (20 ms period).",
        )
        gauge.add_metric([], max(lags, default=0.0))
        return [gauge]

    return collect


def running_watchdogs() -> int:
    """Watchdog threads alive in this process (tests check that none leak)."""
    return sum(1 for t in threading.enumerate() if t.name == "perfmw-loop-watchdog")


perf._loop_hooks.append(start)
perf._shutdown_hooks.append(stop)
perf._stall_hooks.append(settle_record)
perf._query_hooks.append(stalled_queries)

__all__ = [
    "CAUSES",
    "CODE_CAUSES",
    "MACHINE_CAUSES",
    "LoopMonitor",
    "Signals",
    "classify",
    "monitor_for",
    "running_watchdogs",
]
