"""Event-loop monitor: stalls with the culprit's stack and request, loop lag, GC pauses.

One monitor per running loop, started by `Perf.on_loop()` (asyncio and uvloop alike):

- a heartbeat callback on the loop every 20 ms notes when it ran;
- a daemon watchdog thread sleeps until a beat is overdue by the stall threshold. While the
  loop is healthy it wakes about once per threshold (10 times a second by default) and touches
  the GIL for a few microseconds; it never polls and never walks stacks then.
- When a beat is overdue the loop is stalled: the watchdog samples the loop thread's stack
  (`sys._current_frames()`) every 10 ms until the loop comes back, so a long stall is located
  where most of its time went. The request whose code was running gets the stall in its
  record (its route label, finding and log line), no other request in flight does.
- When the loop comes back, the stall's whole duration and cause are settled: `gc` (collections
  took most of it), `cpu` (the loop thread computed), `saturation` (it computed in many
  callbacks, no single culprit), `starved` (off CPU while other threads ran or the process was
  descheduled), `blocking` (off CPU: sleep, synchronous I/O, a lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import sys
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Iterable
from types import CodeType, FrameType
from typing import Any

from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from . import _guard, perf
from ._frames import format_location, format_stack, is_app_code
from .exporters.prometheus import PrometheusSink
from .record import BACKGROUND, RequestRecord, Stall, _current

HEARTBEAT_SECONDS = 0.02
SAMPLE_SECONDS = 0.01
#: Stalls shorter than this are not detected, whatever the threshold: below it the heartbeat's
#: own jitter would be reported.
MIN_THRESHOLD_SECONDS = 0.05
_MAX_LOCATIONS = 32  # distinct culprit locations kept (with their stacks) during one stall

_monotonic = time.monotonic
_GUARD = _guard.guard("loop")
_HANDLE_RUN: CodeType = asyncio.events.Handle._run.__code__
_COROUTINE_FLAGS = 0x80 | 0x100 | 0x200  # CO_COROUTINE | CO_ITERABLE_COROUTINE | CO_ASYNC_GENERATOR
# Task.get_context() (3.12+) lets the watchdog read a task's request from another thread.
_TASK_HAS_CONTEXT = hasattr(asyncio.Task, "get_context")


def _middleware_code() -> CodeType:
    from .middleware import PerfMiddleware

    return PerfMiddleware.__call__.__code__


# --- GC timing (process-wide: one gc.callbacks entry while any monitor runs) ---


class _GcClock:
    __slots__ = ("culprit_seconds", "installed", "sinks", "started", "total")

    def __init__(self) -> None:
        self.started = 0.0
        self.total = 0.0  # seconds spent collecting since the first monitor started
        self.sinks: tuple[PrometheusSink, ...] = ()
        self.culprit_seconds = float("inf")  # a collection this long on a loop thread is located
        self.installed = False


_gc = _GcClock()
_loop_threads: dict[int, LoopMonitor] = {}  # loop thread ident -> its monitor
_gc_pauses: deque[tuple[int, float]] = deque(maxlen=10_000)  # (generation, seconds)


def _on_gc(
    phase: str,
    info: dict[str, Any],
    _clock: _GcClock = _gc,
    _now: Any = time.perf_counter,
    _pauses: deque[tuple[int, float]] = _gc_pauses,
) -> None:
    # Called twice per collection, young ones included: no guard, no lookups on the way.
    if phase == "start":
        _clock.started = _now()
        return
    seconds = _now() - _clock.started
    _clock.total += seconds
    # Observed later by a watchdog: the collection may have interrupted code of this thread
    # that holds a sink's lock.
    _pauses.append((info["generation"], seconds))
    if seconds >= _clock.culprit_seconds:
        with _GUARD:
            monitor = _loop_threads.get(threading.get_ident())
            if monitor is not None:
                # The collection ran on a loop thread and blocked it: the watchdog could not
                # sample during it (a collection holds the GIL), so locate it from here.
                monitor._gc_blocked(seconds, sys._getframe(1))


def _flush_gc_pauses() -> None:
    """Hand the collections timed since the last flush to the sinks (watchdog threads)."""
    sinks = _gc.sinks
    while True:
        try:
            generation, seconds = _gc_pauses.popleft()
        except IndexError:
            return
        for sink in sinks:
            sink.observe_gc(generation, seconds)


def _refresh_gc() -> None:
    """Point the GC callback at the sinks of every running monitor (or remove it)."""
    _flush_gc_pauses()
    with _registry_lock:
        monitors = [m for m in _monitors.values() if not m.stopped]
    sinks: dict[int, PrometheusSink] = {}
    for monitor in monitors:
        for owner in monitor.perfs:
            sinks.setdefault(id(owner.sink), owner.sink)
    _gc.sinks = tuple(sinks.values())
    _gc.culprit_seconds = min((m.threshold / 2 for m in monitors), default=float("inf"))
    if monitors and not _gc.installed:
        gc.callbacks.append(_on_gc)
        _gc.installed = True
    elif not monitors and _gc.installed:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(_on_gc)
        _gc.installed = False


# --- One stall while it lasts ---


class _GcCulprit:
    __slots__ = ("at", "location", "record", "seconds", "stack")

    def __init__(
        self,
        at: float,
        seconds: float,
        record: RequestRecord | None,
        location: str | None,
        stack: tuple[str, ...],
    ) -> None:
        self.at = at
        self.seconds = seconds
        self.record = record
        self.location = location
        self.stack = stack


class _StallState:
    """What the watchdog saw of one stall in progress."""

    __slots__ = (
        "done",
        "gil_wait",
        "locations",
        "record",
        "record_known",
        "registered_at",
        "roots",
        "runqueue",
        "samples",
        "stacks",
        "stall",
        "start",
    )

    def __init__(self, start: float, registered_at: float, runqueue: float) -> None:
        self.start = start  # estimated moment the loop stopped answering
        self.registered_at = registered_at
        # How long the watchdog, ready to run, waited for the GIL: another thread held it.
        self.gil_wait = 0.0
        self.runqueue = runqueue
        self.samples = 0
        # Frames are kept (not their ids) so that an id is not reused within the stall.
        self.roots: Counter[FrameType | None] = Counter()
        self.locations: Counter[str | None] = Counter()
        self.stacks: dict[str | None, tuple[str, ...]] = {}
        self.record: RequestRecord | None = None
        self.record_known = False
        self.stall: Stall | None = None  # appended to `record` once the threshold is passed
        self.done = False

    def dominant_root(self) -> tuple[FrameType | None, float]:
        if not self.samples:
            return None, 0.0
        root, count = self.roots.most_common(1)[0]
        return root, count / self.samples

    def location(self) -> str | None:
        if not self.locations:
            return None
        located = [(n, loc) for loc, n in self.locations.items() if loc is not None]
        if located:
            return max(located, key=lambda item: item[0])[1]
        return None


# Provisional stalls appended to a record while they last: settled when the record finishes.
_pending: dict[Stall, tuple[LoopMonitor, _StallState]] = {}


def _settle_record(record: RequestRecord) -> None:
    """`Perf.finish` hook: a record finishing with a stall still open settles it first."""
    for stall in list(record.stalls):
        entry = _pending.get(stall)
        if entry is not None:
            monitor, state = entry
            monitor._settle(state, record)


# --- The monitor of one loop ---


class LoopMonitor:
    """Heartbeat on one loop plus its watchdog thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: perf.Perf) -> None:
        self._loop_ref = weakref.ref(loop)
        self.perfs: list[perf.Perf] = [owner]
        self.threshold = max(owner.settings.stall_threshold_seconds, MIN_THRESHOLD_SECONDS)
        self.interval = HEARTBEAT_SECONDS
        self.thread_id = threading.get_ident()
        self.native_id = threading.get_native_id()
        self.cpu_clock = time.pthread_getcpuclockid(self.thread_id)
        self.lag = 0.0
        self.stopped = False
        self._lock = threading.Lock()
        self._wake = threading.Lock()  # released by stop(): the watchdog's sleep ends at once
        self._wake.acquire()
        self._timer = _KernelTimer.create(self.threshold + HEARTBEAT_SECONDS / 2)
        self._seq = 0
        self._stall: _StallState | None = None
        self._gc_culprit: _GcCulprit | None = None
        self._root_depth = _callback_depth(sys._getframe())
        self._task_factory: Any = None
        self._handle: asyncio.TimerHandle | None = None
        self._mark(_monotonic())
        self._due = self._beat_at + self.interval
        self._watchdog = threading.Thread(
            target=self._watch, name="perfmw-loop-watchdog", daemon=True
        )

    # Lifecycle (start on the loop thread; stop from anywhere)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not _TASK_HAS_CONTEXT and not isinstance(loop, asyncio.BaseEventLoop):
            self._install_task_factory(loop)
        _loop_threads[self.thread_id] = self
        if self._timer is not None:
            self._timer.arm_beat()
        self._handle = loop.call_at(self._due, self._beat)
        self._watchdog.start()

    def stop(self) -> None:
        """Stop the heartbeat and the watchdog (idempotent)."""
        with self._lock:
            if self.stopped:
                return
            self.stopped = True
        self._wake.release()
        if self._timer is not None:
            with contextlib.suppress(OSError):
                self._timer.arm(1e-9)  # the watchdog's read() returns now
        if _loop_threads.get(self.thread_id) is self:
            del _loop_threads[self.thread_id]
        loop = self._loop_ref()
        if loop is not None and not loop.is_closed():
            if threading.get_ident() == self.thread_id:
                self._cancel_heartbeat(loop)
            else:
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    loop.call_soon_threadsafe(self._cancel_heartbeat, loop)
        with _registry_lock:
            if loop is not None and _monitors.get(loop) is self:
                del _monitors[loop]
        _refresh_gc()
        _refresh_lag_sources()
        if threading.current_thread() is not self._watchdog and self._watchdog.is_alive():
            self._watchdog.join(timeout=2)

    def _cancel_heartbeat(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is not None:
            self._handle.cancel()
        factory = self._task_factory
        if factory is not None and loop.get_task_factory() is factory:
            loop.set_task_factory(self._task_factory.previous)

    # The heartbeat (on the loop thread)

    def _mark(self, now: float) -> None:
        self._beat_at = now
        self._beat_cpu = time.clock_gettime(self.cpu_clock)
        self._beat_process = time.process_time()
        self._beat_gc = _gc.total

    def _beat(self) -> None:
        if self.stopped:
            return
        now = _monotonic()
        late = now - self._due
        self.lag = late if late > 0.0 else 0.0
        if (
            self._stall is not None
            or self._gc_culprit is not None
            or late + self.interval / 2 >= self.threshold
        ):
            with _GUARD:
                self._loop_came_back(now)
        self._mark(now)
        timer = self._timer
        if timer is not None:
            timer.arm_beat()
        if _gc_pauses:
            with _GUARD:
                _flush_gc_pauses()
        self._due = now + self.interval
        self._seq += 1
        loop = self._loop_ref()
        if loop is not None:
            self._handle = loop.call_at(self._due, self._beat)

    def _loop_came_back(self, now: float) -> None:
        with self._lock:
            state, self._stall = self._stall, None
            culprit, self._gc_culprit = self._gc_culprit, None
            if culprit is not None and culprit.at < self._beat_at:
                culprit = None  # a collection before the last beat: not this stall
            if state is None:
                start = self._beat_at + self.interval / 2
                if culprit is not None:
                    # The collection held the GIL until the loop came back: the watchdog never
                    # saw the stall, the GC callback located it.
                    state = _StallState(start, now, 0.0)
                    state.record, state.record_known = culprit.record, True
                elif self._starved(now - start):
                    # Other threads held the GIL so long that the watchdog, too, never ran:
                    # nothing to sample, but the loop thread's clock tells what happened.
                    state = _StallState(start, now, 0.0)
                    state.record_known = True
                else:
                    return  # late, but not seen stalled: a loop stopped and run again
            if state.done:
                return
            report = self._finalize(state, now, culprit)
        if report is not None:
            self._report_background(*report)

    def _starved(self, duration: float) -> bool:
        if duration < self.threshold:
            return False
        cpu = time.clock_gettime(self.cpu_clock) - self._beat_cpu
        others = time.process_time() - self._beat_process - cpu
        return cpu < 0.25 * duration and others >= 0.5 * duration

    # Settling a stall (under self._lock, on the loop thread once the loop runs again)

    def _settle(self, state: _StallState, record: RequestRecord) -> None:
        """The stall's record is finishing: the loop runs again, so the stall is over."""
        with _GUARD, self._lock:
            if state.done:
                return
            culprit, self._gc_culprit = self._gc_culprit, None
            report = self._finalize(state, _monotonic(), culprit)
        if report is not None:
            self._report_background(*report)

    def _finalize(
        self, state: _StallState, end: float, culprit: _GcCulprit | None
    ) -> tuple[RequestRecord | None, Stall] | None:
        """Duration, cause and culprit of a stall that ended at `end`.

        Returns (closed record or None, stall) when the stall must be reported apart from a
        request (no request, a finished one, or no single culprit); None when it stays in the
        record it was appended to, or was too short after all.
        """
        state.done = True
        stall = state.stall
        if stall is not None:
            _pending.pop(stall, None)
        duration = end - state.start
        if duration < self.threshold:
            if stall is not None and state.record is not None:
                with contextlib.suppress(ValueError):
                    state.record.stalls.remove(stall)
            return None
        cpu = time.clock_gettime(self.cpu_clock) - self._beat_cpu
        others = time.process_time() - self._beat_process - cpu
        gc_seconds = _gc.total - self._beat_gc
        waited = end - state.registered_at
        runqueue = _runqueue_seconds(self.native_id) - state.runqueue if waited > 0 else 0.0
        root, share = state.dominant_root()
        scattered = state.samples >= 2 and share < 0.5
        # The share of the stall the loop thread could have run: not waiting for a CPU.
        descheduled = min(runqueue / waited, 1.0) if waited > 0 else 0.0
        runnable = duration * (1.0 - descheduled)
        if gc_seconds >= 0.5 * duration:
            cause = "gc"
        elif cpu >= 0.5 * runnable and cpu >= 0.25 * duration:
            cause = "saturation" if scattered else "cpu"
        elif (
            others >= 0.5 * duration
            or descheduled >= 0.5
            or (waited > 0 and state.gil_wait >= 0.5 * waited)
            or (state.samples and root is None and share >= 0.5)
        ):
            cause = "starved"
        else:
            cause = "blocking"
        record = state.record
        if cause == "gc" and culprit is not None:
            location, stack, record = culprit.location, culprit.stack, culprit.record
        else:
            location = state.location()
            stack = state.stacks.get(location, ())
        if cause == "saturation":
            record = None  # many callbacks, no single request to blame
        if stall is None:
            stall = Stall(duration, location, stack, cause)
        stall.duration_seconds = duration
        stall.location, stall.stack, stall.cause = location, stack, cause
        stall.gc_seconds = gc_seconds
        if state.stall is not None and state.record is not None:
            if state.record is record:
                return None  # stays in its request's record
            with contextlib.suppress(ValueError):
                state.record.stalls.remove(state.stall)
        if record is not None and not record.closed:
            record.stalls.append(stall)
            return None
        return record, stall

    def _report_background(self, closed: RequestRecord | None, stall: Stall) -> None:
        """A stall outside any open request: its own record, finished like any other."""
        owner: Any = closed.owner if closed is not None else None
        if owner is None or getattr(owner, "closed", True):
            owner = next((p for p in self.perfs if not p.closed), None)
        if owner is None:
            return
        route = closed.route if closed is not None else BACKGROUND
        record = RequestRecord(route, "", "", "background", owner)
        record.duration_seconds = stall.duration_seconds
        record.stalls.append(stall)
        owner.finish(record)

    # GC on the loop thread (called from the GC callback)

    def _gc_blocked(self, seconds: float, frame: FrameType | None) -> None:
        from ._frames import app_location

        record = _current.get()
        self._gc_culprit = _GcCulprit(
            _monotonic(), seconds, record, app_location(frame), format_stack(frame)
        )
        if record is None or record.closed:
            return
        # The request may finish before the watchdog samples again: attach the stall to it
        # now, from its own thread. The watchdog may hold the lock (it can run while a
        # collection calls finalizers); this thread might too, so never wait long.
        if not self._lock.acquire(timeout=0.05):
            return
        try:
            state = self._stall
            if state is None and not self.stopped:
                runqueue = _runqueue_seconds(self.native_id)
                state = _StallState(self._beat_at + self.interval / 2, _monotonic(), runqueue)
                state.record, state.record_known = record, True
                self._stall = state
            if state is not None and not state.done:
                self._update(state)
        finally:
            self._lock.release()

    # The watchdog thread

    def _watch(self) -> None:
        own = _SchedStat(threading.get_native_id())
        queued = -1.0  # own run-queue time before the latest sleep until a deadline
        try:
            while not self.stopped:
                loop = self._loop_ref()
                if loop is None or loop.is_closed():
                    return
                seq = self._seq
                deadline = self._beat_at + self.interval / 2 + self.threshold
                wait = deadline - _monotonic()
                del loop
                if _gc_pauses:
                    with _GUARD:
                        _flush_gc_pauses()
                if wait > 0:
                    queued = own.runqueue()
                    timer = self._timer
                    if timer is not None:
                        # Each beat pushes the timer back: it expires only if beats stop.
                        timer.arm(wait)
                        timer.wait()
                        continue
                    if self._wake.acquire(timeout=wait):
                        return
                    continue
                loop = self._loop_ref()
                if loop is None or loop.is_closed():
                    return
                if not loop.is_running():
                    # Stopped between two run_until_complete() calls: nothing is late.
                    del loop
                    queued = -1.0
                    if self._wake.acquire(timeout=self.threshold):
                        return
                    continue
                pending = self._stall
                if self._seq == seq and (pending is None or not pending.done):
                    # Woken late, and not because the OS ran this thread late: the GIL was held.
                    gil_wait = own.gil_wait(_monotonic() - deadline, queued)
                    with _GUARD:
                        self._follow_stall(loop, seq, deadline, own, gil_wait)
                del loop
                queued = -1.0
                if self._seq == seq and self._wake.acquire(timeout=SAMPLE_SECONDS):
                    # A stall settled early (its request finished): wait for the next beat.
                    return
        finally:
            own.close()
            self._exited()
            timer, self._timer = self._timer, None
            if timer is not None:
                timer.close()

    def _exited(self) -> None:
        """The watchdog ends with its loop: forget the monitor so a new loop gets its own."""
        with _GUARD:
            if not self.stopped:
                self.stop()
            for owner in self.perfs:
                if self in owner._loops:
                    owner._loops.remove(self)
                if not owner.closed:
                    # This app's next request on a new loop starts a new monitor.
                    owner.loop_started = False

    def _follow_stall(
        self,
        loop: asyncio.AbstractEventLoop,
        seq: int,
        deadline: float,
        own: _SchedStat,
        gil_wait: float,
    ) -> None:
        start = self._beat_at + self.interval / 2
        with self._lock:
            if self._seq != seq or self.stopped:
                return
            state = self._stall  # already opened by a long collection on the loop thread
            if state is None:
                runqueue = _runqueue_seconds(self.native_id)
                state = self._stall = _StallState(start, min(deadline, _monotonic()), runqueue)
            elif state.done:
                return
            state.gil_wait += gil_wait
        while True:
            frame = sys._current_frames().get(self.thread_id)
            with self._lock:
                if state.done or self._seq != seq or self.stopped:
                    break
                if frame is not None:
                    self._sample(state, frame, loop)
                self._update(state)
            frame = None
            if not loop.is_running():
                # The callback returned and the loop stopped before the next beat.
                with self._lock:
                    report = None if state.done else self._finalize(state, _monotonic(), None)
                    self._stall = None
                if report is not None:
                    self._report_background(*report)
                return
            queued, slept = own.runqueue(), _monotonic()
            if self._wake.acquire(timeout=SAMPLE_SECONDS):
                return
            state.gil_wait += own.gil_wait(_monotonic() - slept - SAMPLE_SECONDS, queued)

    def _sample(
        self, state: _StallState, frame: FrameType, loop: asyncio.AbstractEventLoop
    ) -> None:
        frames: list[FrameType] = []
        f: FrameType | None = frame
        while f is not None:
            frames.append(f)
            f = f.f_back
        frames.reverse()  # outermost first
        root = self._root(frames)
        state.samples += 1
        state.roots[root] += 1
        app = next((f for f in reversed(frames) if is_app_code(f.f_code)), None)
        location = None if app is None else format_location(app.f_code.co_filename, app.f_lineno)
        state.locations[location] += 1
        if location not in state.stacks and len(state.stacks) < _MAX_LOCATIONS:
            state.stacks[location] = format_stack(frame)
        if not state.record_known and root is not None:
            state.record = self._record_for(frames, loop)
            state.record_known = True

    def _update(self, state: _StallState) -> None:
        elapsed = _monotonic() - state.start
        record = state.record
        if state.record_known and record is not None and record.started_at > self._beat_at:
            # The request began after the last beat: the stall began no earlier than it did.
            state.start = (record.started_at + self._beat_at + self.interval) / 2
            elapsed = _monotonic() - state.start
        if state.stall is None:
            if elapsed < self.threshold or record is None or record.closed:
                return
            location = state.location()
            state.stall = Stall(elapsed, location, state.stacks.get(location, ()), "blocking")
            _pending[state.stall] = (self, state)
            record.stalls.append(state.stall)
        else:
            stall = state.stall
            stall.duration_seconds = elapsed
            stall.location = state.location()
            stall.stack = state.stacks.get(stall.location, ())

    def _root(self, frames: list[FrameType]) -> FrameType | None:
        """The frame of the loop callback running in this sample (None: the loop itself)."""
        depth = self._root_depth
        if depth is not None:
            return frames[depth] if len(frames) > depth else None
        return next((f for f in frames if f.f_code.co_flags & _COROUTINE_FLAGS), None)

    def _record_for(
        self, frames: list[FrameType], loop: asyncio.AbstractEventLoop
    ) -> RequestRecord | None:
        """The record in the context of the running callback, read from this thread."""
        for f in reversed(frames):
            if f.f_code is _HANDLE_RUN:  # asyncio: the handle holds the callback's context
                context = getattr(f.f_locals.get("self"), "_context", None)
                if context is not None:
                    return context.get(_current)  # type: ignore[no-any-return]
                break
        task = asyncio.current_task(loop)
        if task is not None:
            if _TASK_HAS_CONTEXT:
                return task.get_context().get(_current)  # type: ignore[attr-defined,no-any-return]
            record = _task_records.get(task)
            if record is not None:
                return record
        code = _middleware_code()
        for f in reversed(frames):
            if f.f_code is code:
                found = f.f_locals.get("record")
                return found if isinstance(found, RequestRecord) else None
        return None

    # Python < 3.12 on loops whose handles are not Python objects (uvloop)

    def _install_task_factory(self, loop: asyncio.AbstractEventLoop) -> None:
        factory = _recording_task_factory(loop.get_task_factory())
        loop.set_task_factory(factory)
        self._task_factory = factory


# Tasks created while a request's record was current (only kept where Task.get_context()
# does not exist and the loop's handles are C objects: uvloop on Python 3.10/3.11).
_task_records: weakref.WeakKeyDictionary[asyncio.Task[Any], RequestRecord] = (
    weakref.WeakKeyDictionary()
)


def _recording_task_factory(previous: Any) -> Any:
    """A task factory that remembers which record each new task's context carries.

    A plain function with the loop's own signature: a task costs one call and a ContextVar read
    more (0.3 % of a tiny task's life on uvloop; `**kwargs` would cost 8 %).
    """
    Task: Any = asyncio.Task  # context= exists from Python 3.11, as the loop passes it
    current = _current
    records = _task_records

    if previous is None:

        def factory(loop: Any, coro: Any, context: Any = None) -> Any:
            if context is None:
                task = Task(coro, loop=loop)
                record = current.get()
            else:
                task = Task(coro, loop=loop, context=context)
                record = context.get(current)
            if record is not None:
                records[task] = record
            return task

    else:

        def factory(loop: Any, coro: Any, context: Any = None) -> Any:
            if context is None:
                task = previous(loop, coro)
                record = current.get()
            else:
                task = previous(loop, coro, context=context)
                record = context.get(current)
            if record is not None:
                records[task] = record
            return task

    factory.previous = previous  # type: ignore[attr-defined]
    return factory


def _callback_depth(frame: FrameType | None) -> int | None:
    """How deep (from the thread's outermost frame) the loop's callbacks run."""
    try:
        task = asyncio.current_task()
    except RuntimeError:
        task = None
    coro = task.get_coro() if task is not None else None
    root = getattr(coro, "cr_frame", None)
    frames: list[FrameType] = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    frames.reverse()
    for depth, f in enumerate(frames):
        if f is root:
            return depth
    return None


class _SchedStat:
    """The calling thread's own run-queue time, read through one open file (Linux)."""

    __slots__ = ("fd",)

    def __init__(self, native_id: int) -> None:
        try:
            self.fd: int | None = os.open(f"/proc/self/task/{native_id}/schedstat", os.O_RDONLY)
        except OSError:
            self.fd = None

    def runqueue(self) -> float:
        if self.fd is None:
            return -1.0
        try:
            return int(os.pread(self.fd, 128, 0).split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return -1.0

    def gil_wait(self, late: float, queued_before: float) -> float:
        """Of `late` seconds past a wake-up, those not spent waiting for a CPU (0 if unknown)."""
        if queued_before < 0 or late <= 0:
            return 0.0
        now = self.runqueue()
        return max(0.0, late - (now - queued_before)) if now >= 0 else 0.0

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _runqueue_seconds(native_id: int) -> float:
    """Time the thread spent runnable but waiting for a CPU (Linux schedstat), else 0."""
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", "rb") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


# --- A kernel timer the heartbeat re-arms: the watchdog sleeps in read() without the GIL ---


class _KernelTimer:
    """A Linux timerfd: `read()` blocks (GIL released) until the armed time passes.

    The heartbeat re-arms it at every beat, so while the loop is healthy it never expires and the
    watchdog thread never wakes: it takes the GIL only when a stall begins. (A timed lock wait
    instead wakes ten times a second, and each wake-up waits for the GIL behind a busy loop.)
    """

    __slots__ = ("_beat_address", "_beat_spec", "_settime", "_spec", "fd")

    @classmethod
    def create(cls, beat_seconds: float) -> _KernelTimer | None:
        if not sys.platform.startswith("linux"):
            return None
        try:
            return cls(beat_seconds)
        except (OSError, AttributeError, ImportError):
            return None

    def __init__(self, beat_seconds: float) -> None:
        import ctypes

        class Timespec(ctypes.Structure):
            _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))

        class Itimerspec(ctypes.Structure):
            _fields_ = (("it_interval", Timespec), ("it_value", Timespec))

        libc = ctypes.CDLL(None, use_errno=True)
        create = libc.timerfd_create
        create.argtypes = (ctypes.c_int, ctypes.c_int)
        create.restype = ctypes.c_int
        settime = libc.timerfd_settime
        settime.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
        settime.restype = ctypes.c_int
        fd = create(time.CLOCK_MONOTONIC, os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self.fd = fd
        self._settime = settime
        self._spec = Itimerspec
        # The heartbeat arms the same delay every time: built once, passed by address.
        self._beat_spec = self._build(beat_seconds)
        self._beat_address = ctypes.addressof(self._beat_spec)

    def _build(self, seconds: float) -> Any:
        spec = self._spec()
        nanoseconds = max(int(seconds * 1e9), 1)  # 0 would disarm it
        spec.it_value.tv_sec, spec.it_value.tv_nsec = divmod(nanoseconds, 1_000_000_000)
        return spec

    def arm_beat(self) -> None:
        self._settime(self.fd, 0, self._beat_address, None)

    def arm(self, seconds: float) -> None:
        import ctypes

        spec = self._build(seconds)
        self._settime(self.fd, 0, ctypes.addressof(spec), None)

    def wait(self) -> None:
        os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


# --- Registry of monitors, hooks into Perf ---

_monitors: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMonitor] = (
    weakref.WeakKeyDictionary()
)
_registry_lock = threading.RLock()


def monitor_for(loop: asyncio.AbstractEventLoop) -> LoopMonitor | None:
    """The running monitor of a loop, if any."""
    with _registry_lock:
        monitor = _monitors.get(loop)
    return None if monitor is None or monitor.stopped else monitor


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
    _refresh_gc()
    _refresh_lag_sources()


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
    _refresh_gc()
    _refresh_lag_sources()


# --- perfmw_event_loop_lag_seconds, read at scrape time ---

_lag_sources: dict[int, tuple[PrometheusSink, Any]] = {}


def _refresh_lag_sources() -> None:
    with _registry_lock:
        monitors = [m for m in _monitors.values() if not m.stopped]
        wanted: dict[int, PrometheusSink] = {}
        for monitor in monitors:
            for owner in monitor.perfs:
                wanted.setdefault(id(owner.sink), owner.sink)
        for key, (sink, source) in list(_lag_sources.items()):
            if key not in wanted:
                sink.remove_source(source)
                del _lag_sources[key]
        for key, sink in wanted.items():
            if key not in _lag_sources:
                source = _lag_source(sink)
                sink.add_source(source)
                _lag_sources[key] = (sink, source)


def _lag_source(sink: PrometheusSink) -> Any:
    def collect() -> Iterable[Metric]:
        with _registry_lock:
            lags = [
                m.lag
                for m in _monitors.values()
                if not m.stopped and any(p.sink is sink for p in m.perfs)
            ]
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
perf._stall_hooks.append(_settle_record)

__all__ = ["LoopMonitor", "monitor_for", "running_watchdogs"]
