"""Garbage collections, timed process-wide: one `gc.callbacks` entry while any monitor runs.

Each collection's wall time feeds `perfmw_gc_pause_seconds`; its time on a CPU feeds the stall
causes (a collection preempted by the kernel is not a long collection). Full collections are
timed on the thread's CPU clock too; young ones are short enough to take their wall time.
A collection long enough to matter on a loop thread is handed to that loop's monitor, which
locates it: the watchdog cannot sample while a collection holds the GIL.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, Protocol

from .. import _guard
from ..exporters.prometheus import PrometheusSink

_GUARD = _guard.guard("loop")


class Blocked(Protocol):
    def gc_blocked(self, seconds: float, frame: Any) -> None: ...


class Clock:
    __slots__ = ("cpu", "cpu_started", "culprit_seconds", "installed", "sinks", "started", "total")

    def __init__(self) -> None:
        self.started = 0.0
        self.cpu_started = 0.0
        self.total = 0.0  # seconds spent collecting since the first monitor started
        self.cpu = 0.0  # of which on a CPU
        self.sinks: tuple[PrometheusSink, ...] = ()
        self.culprit_seconds = float("inf")  # a collection this long on a loop thread is located
        self.installed = False


clock = Clock()
loop_threads: dict[int, Blocked] = {}  # loop thread ident -> its monitor
_pauses: deque[tuple[int, float]] = deque(maxlen=10_000)  # (generation, seconds)


def _on_gc(
    phase: str,
    info: dict[str, Any],
    _clock: Clock = clock,
    _now: Any = time.perf_counter,
    _cpu: Any = time.thread_time,
    _pauses: deque[tuple[int, float]] = _pauses,
) -> None:
    # Called twice per collection, young ones included: no guard, no lookups on the way.
    if phase == "start":
        _clock.started = _now()
        if info["generation"] == 2:
            _clock.cpu_started = _cpu()
        return
    seconds = _now() - _clock.started
    generation = info["generation"]
    _clock.total += seconds
    _clock.cpu += _cpu() - _clock.cpu_started if generation == 2 else seconds
    # Observed later by a watchdog: the collection may have interrupted code of this thread
    # that holds a sink's lock.
    _pauses.append((generation, seconds))
    if seconds >= _clock.culprit_seconds:
        with _GUARD:
            monitor = loop_threads.get(threading.get_ident())
            if monitor is not None and not sys.is_finalizing():
                # The collection ran on a loop thread and blocked it: locate it from here.
                # The frame below this one is None, not an error, for a collection that C code
                # started with no Python frame on the thread (sys._getframe(1) raises "call
                # stack is not deep enough" there). At interpreter shutdown a stall would never
                # be reported: nothing is located.
                monitor.gc_blocked(seconds, sys._getframe(0).f_back)


def flush() -> None:
    """Hand the collections timed since the last flush to the sinks (watchdog threads)."""
    sinks = clock.sinks
    while True:
        try:
            generation, seconds = _pauses.popleft()
        except IndexError:
            return
        for sink in sinks:
            sink.observe_gc(generation, seconds)


def pending() -> bool:
    return bool(_pauses)


def refresh(sinks: Iterable[PrometheusSink], culprit_seconds: float) -> None:
    """Point the callback at these sinks (none: remove it)."""
    flush()
    clock.sinks = tuple(sinks)
    clock.culprit_seconds = culprit_seconds
    if clock.sinks and not clock.installed:
        gc.callbacks.append(_on_gc)
        clock.installed = True
    elif not clock.sinks and clock.installed:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(_on_gc)
        clock.installed = False
