"""The monitor of one event loop: a heartbeat on the loop and a watchdog thread beside it.

- A heartbeat callback on the loop every 20 ms notes when it ran, snapshots the loop thread's
  scheduler counters (one `pread` of its schedstat, parsed only if a stall follows) and the
  process's CPU clock, and pushes back the watchdog's timer.
- The watchdog sleeps on that timer: while the loop is healthy it never wakes. When a beat is
  overdue by the stall threshold, the loop is stalled: the watchdog looks every 10 ms until the
  loop comes back (noting how long it waited for the GIL itself), and samples the loop thread's
  stack on a schedule that backs off as the stall grows (`_StallState.sample_due`), so a long
  stall is located where most of its time went at a bounded cost to the loop it takes the GIL
  from. The request whose code was running gets the stall in its record; no other request in
  flight does.
- When the loop comes back, the stall's whole duration is settled, and its cause is decided
  from the loop thread's counters over the stall (`causes.classify`), and from the process's
  other threads: their CPU time, and the busiest of them by name (read from /proc/self/task
  once the stall is in its request's record, and when it settles). A stall of the machine
  (`starved`, `throttled`) or of no single callback (`saturation`) is reported apart from any
  request, on `<background>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
import weakref
from collections import Counter, defaultdict, deque
from types import FrameType
from typing import TYPE_CHECKING, Any

from .. import _guard
from .._frames import NOWHERE, CallSite, call_site, format_stack, snapshot
from ..record import BACKGROUND, RequestRecord, Stall, _current
from . import gc_clock, requests, sockets
from .causes import CODE_CAUSES, BusyThread, Signals, classify
from .kernel import (
    CgroupCpu,
    KernelTimer,
    Tasks,
    ThreadStat,
    Throttling,
    available_cpus,
    delta,
    process_cpu,
    voluntary_switches,
)

if TYPE_CHECKING:
    from ..perf import Perf

HEARTBEAT_SECONDS = 0.02
SAMPLE_SECONDS = 0.01  # how often the watchdog looks at a stalled loop
#: Stack samples of one stall: the next is due after this share of the stall's age (at least
#: SAMPLE_SECONDS), and there are at most MAX_SAMPLES. A sample holds the GIL for about 0.1 ms
#: of a deep stack: 17 samples for a stall of a second, 0.2 % of its time, 50 for half a minute.
SAMPLE_BACKOFF = 0.125
MAX_SAMPLES = 50
#: After this many samples in no single callback, the loop is saturated with many short ones
#: rather than stuck in one: no culprit to find, so no more samples.
SATURATION_SAMPLES = 4
#: One callback blocked the loop when this share of a stall's samples, ONE_CALLBACK_SAMPLES
#: at least, was in it. A request that finishes inside such a stall ends its own part of it,
#: and the rest is a stall of its own (requests queued back to back), reported only if one
#: callback blocked it too: a loop saturated with short ones puts a sample in one by chance.
ONE_CALLBACK_SAMPLES = 2
ONE_CALLBACK_SHARE = 0.75
#: Stalls shorter than this are not detected, whatever the threshold: below it the heartbeat's
#: own jitter would be reported.
MIN_THRESHOLD_SECONDS = 0.05
MAX_SITES = 32  # distinct culprit call sites kept (with their stacks) during one stall
RECENT_STALLS = 64  # settled stall intervals kept per loop, for the queries that waited on them
BUSY_THREADS = 3  # the process's other threads named in a stall's evidence, busiest first
BUSY_SECONDS = 0.01  # a thread that computed less during the stall is not named
UNNAMED = "<unnamed>"  # CPU of threads that ended meanwhile, or computed before the first look

_GUARD = _guard.guard("loop")
_cgroup: CgroupCpu | None = None  # found at the first stall


def cgroup() -> CgroupCpu:
    global _cgroup
    if _cgroup is None:
        _cgroup = CgroupCpu.discover()
    return _cgroup


# --- One stall while it lasts ---


class _GcCulprit:
    __slots__ = ("at", "record", "seconds", "site", "stack")

    def __init__(
        self,
        at: float,
        seconds: float,
        record: RequestRecord | None,
        site: CallSite,
        stack: tuple[str, ...],
    ) -> None:
        self.at = at
        self.seconds = seconds
        self.record = record
        self.site = site
        self.stack = stack


class _StallState:
    """What was seen of one stall in progress, and the counters at the beat before it."""

    __slots__ = (
        "beat_at",
        "beat_gc",
        "beat_process",
        "beat_stat",
        "beat_switches",
        "busy_site",
        "busy_stack",
        "done",
        "follows",
        "last_sample",
        "next_sample",
        "record",
        "record_known",
        "roots",
        "samples",
        "sites",
        "sleep_started",
        "slept",
        "stacks",
        "stall",
        "start",
        "tasks",
        "throttling",
        "watch_base",
        "watched_from",
    )

    def __init__(
        self,
        start: float,
        beat_at: float,
        beat_stat: bytes | float,
        beat_gc: float,
        throttling: tuple[Throttling | None, ...],
        beat_process: float = 0.0,
        beat_switches: int = 0,
    ) -> None:
        self.start = start  # estimated moment the loop stopped answering
        self.beat_at = beat_at
        self.beat_stat = beat_stat
        self.beat_gc = beat_gc
        self.beat_process = beat_process
        self.beat_switches = beat_switches
        self.throttling = throttling
        # The other threads' CPU when the watchdog first read it (None: it never did), and the
        # application line the busiest Python one was at when the stall settled.
        self.tasks: dict[int, tuple[float, float]] | None = None
        self.busy_site = NOWHERE
        self.busy_stack: tuple[str, ...] = ()
        # The watchdog's own time from `watched_from` (when it was due to follow the stall) on:
        # its counters then, and the time it chose to sleep between samples. The rest of that
        # time it was neither on a CPU nor queued for one: it waited for the GIL.
        self.watched_from = float("inf")
        self.watch_base: tuple[float, float] | None = None
        self.slept = 0.0
        self.sleep_started: float | None = None
        self.samples = 0
        self.last_sample = self.next_sample = 0.0
        # Samples per loop callback; frames are kept (not their ids) so that an id is not
        # reused within the stall.
        self.roots: Counter[FrameType | None] = Counter()
        # Seconds of the stall per call site: each sample stands for the time since the last.
        self.sites: defaultdict[CallSite, float] = defaultdict(float)
        self.stacks: dict[CallSite, tuple[str, ...]] = {}
        self.record: RequestRecord | None = None
        self.record_known = False
        self.stall: Stall | None = None  # appended to `record` once the threshold is passed
        self.done = False
        # Opened where the request before it finished, the loop still blocked: `start` is
        # exact, and a request that began later began the stall itself.
        self.follows = False

    def sample_due(self, now: float) -> bool:
        """Whether the watchdog takes a stack sample now (see SAMPLE_BACKOFF)."""
        if self.samples >= MAX_SAMPLES or now < self.next_sample:
            return False
        return self.samples < SATURATION_SAMPLES or self.dominant_share() >= 0.5

    def sampled(self, now: float) -> float:
        """Count a sample taken at `now`; the seconds of the stall it stands for."""
        stands_for = SAMPLE_SECONDS if not self.samples else now - self.last_sample
        self.samples += 1
        self.last_sample = now
        self.next_sample = now + max(SAMPLE_SECONDS, (now - self.start) * SAMPLE_BACKOFF)
        return stands_for

    def placed(self) -> bool:
        """Whether the stall is where it will be reported: in its request's record, or known
        to have none (the loop ran no request, or the request finished before the threshold)."""
        if self.stall is not None:
            return True
        if self.record_known:
            return self.record is None or self.record.closed
        return self.samples >= SATURATION_SAMPLES  # the loop's own code, sample after sample

    def dominant_share(self) -> float:
        if not self.samples:
            return 1.0
        return self.roots.most_common(1)[0][1] / self.samples

    def one_callback(self) -> bool:
        """Whether the samples show one callback blocking the loop (ONE_CALLBACK_SHARE)."""
        if self.samples < ONE_CALLBACK_SAMPLES:
            return False
        root, count = self.roots.most_common(1)[0]
        return root is not None and count >= ONE_CALLBACK_SHARE * self.samples

    def site(self) -> CallSite:
        """The call site most samples were in: an application line if any sample had one."""
        located = [(n, site) for site, n in self.sites.items() if site.location is not None]
        if located:
            return max(located, key=lambda item: item[0])[1]
        return max(self.sites, key=self.sites.__getitem__) if self.sites else NOWHERE


# Provisional stalls appended to a record while they last: settled when the record finishes.
_pending: dict[Stall, tuple[LoopMonitor, _StallState]] = {}


def settle_record(record: RequestRecord) -> None:
    """`Perf.finish` hook: a record finishing with a stall still open settles it first."""
    for stall in list(record.stalls):
        entry = _pending.get(stall)
        if entry is not None:
            monitor, state = entry
            monitor._settle(state)


# --- The monitor of one loop ---


class LoopMonitor:
    """Heartbeat on one loop plus its watchdog thread.

    `clock`, `stat` (the loop thread's counters), `process` (the process's CPU clock) and
    `tasks` (the other threads' CPU, by native id) can be given, so that tests settle stalls on
    synthetic time and synthetic kernel readings.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        owner: Perf,
        clock: Any = time.perf_counter,
        stat: ThreadStat | None = None,
        process: Any = process_cpu,
        tasks: Any = Tasks.read,
        switches: Any = voluntary_switches,
        arrivals: Any = sockets.arrivals,
    ) -> None:
        self._loop_ref = weakref.ref(loop)
        self.perfs: list[Perf] = [owner]
        self.threshold = max(owner.settings.stall_threshold_seconds, MIN_THRESHOLD_SECONDS)
        self.interval = HEARTBEAT_SECONDS
        self.now = clock
        self.thread_id = threading.get_ident()
        self.stat = (
            stat if stat is not None else ThreadStat(threading.get_native_id(), self.thread_id)
        )
        self.process_cpu = process
        self.switches = switches  # the loop thread's voluntary context switches
        self.read_tasks = tasks
        self.arrivals = arrivals  # when each request unread in its connection arrived
        # Else the first look waits until the stall is in its request's record (`placed`).
        self._reads_holding_gil = tasks is Tasks.read and Tasks.holds_gil()
        self.cpus = available_cpus()
        self.lag = 0.0
        self.stopped = False
        self.recent: deque[tuple[float, float]] = deque(maxlen=RECENT_STALLS)
        self._lock = threading.Lock()
        self._wake = threading.Lock()  # released by stop(): the watchdog's sleep ends at once
        self._wake.acquire()
        self._timer = KernelTimer.create(self.threshold + HEARTBEAT_SECONDS / 2)
        self._seq = 0
        self._checked_seq = -1  # the last beat whose lateness the watchdog looked at
        self._stall: _StallState | None = None
        self._gc_culprit: _GcCulprit | None = None
        self._throttling: tuple[Throttling | None, ...] = ()
        self._root_depth = requests.callback_depth(sys._getframe())
        self._task_factory: Any = None
        self._handle: asyncio.TimerHandle | None = None
        # The watchdog's own counters, and their reading before it last slept on the timer.
        self._watch_stat: ThreadStat | None = None
        self._watch_base: tuple[float, float] | None = None
        self._own_threads: tuple[int, ...] = (threading.get_native_id(),)
        self._mark(self.now())
        self._due = self._beat_at + self.interval
        self._watchdog = threading.Thread(
            target=self._watch, name="perfmw-loop-watchdog", daemon=True
        )

    # Lifecycle (start on the loop thread; stop from anywhere)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if requests.needs_task_factory(loop):
            factory = requests.recording_task_factory(loop.get_task_factory())
            loop.set_task_factory(factory)
            self._task_factory = factory
        gc_clock.loop_threads[self.thread_id] = self
        self._throttling = cgroup().read()  # the baseline of the first stall
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
        if gc_clock.loop_threads.get(self.thread_id) is self:
            del gc_clock.loop_threads[self.thread_id]
        loop = self._loop_ref()
        if loop is not None and not loop.is_closed():
            if threading.get_ident() == self.thread_id:
                self._cancel_heartbeat(loop)
            else:
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    loop.call_soon_threadsafe(self._cancel_heartbeat, loop)
        from . import forget

        forget(self, loop)
        if threading.current_thread() is not self._watchdog and self._watchdog.is_alive():
            self._watchdog.join(timeout=2)

    def _cancel_heartbeat(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._handle is not None:
            self._handle.cancel()
        factory = self._task_factory
        if factory is not None and loop.get_task_factory() is factory:
            loop.set_task_factory(getattr(factory, "previous", None))

    # The heartbeat (on the loop thread)

    def _mark(self, now: float) -> None:
        self._beat_at = now
        self._beat_stat = self.stat.raw()
        self._beat_gc = gc_clock.clock.cpu
        self._beat_process = self.process_cpu()
        self._beat_switches = self.switches()

    def _beat(self) -> None:
        if self.stopped:
            return
        now = self.now()
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
        if gc_clock.pending():
            with _GUARD:
                gc_clock.flush()
        self._due = now + self.interval
        self._seq += 1
        loop = self._loop_ref()
        if loop is not None:
            self._handle = loop.call_at(self._due, self._beat)

    def _open(self) -> _StallState:
        """A stall that began after the last beat (under self._lock)."""
        return _StallState(
            self._beat_at + self.interval / 2,
            self._beat_at,
            self._beat_stat,
            self._beat_gc,
            self._throttling,
            self._beat_process,
            self._beat_switches,
        )

    def _loop_came_back(self, now: float) -> None:
        with self._lock:
            state, self._stall = self._stall, None
            culprit, self._gc_culprit = self._gc_culprit, None
            if culprit is not None and culprit.at < self._beat_at:
                culprit = None  # a collection before the last beat: not this stall
            if state is None:
                if culprit is not None:
                    # The collection held the GIL until the loop came back: the watchdog never
                    # saw the stall, the GC callback located it.
                    state = self._open()
                    state.record, state.record_known = culprit.record, True
                elif self._checked_seq != self._seq and now - self._deadline() > self.interval:
                    # The watchdog did not get to run either (another thread held the GIL, or
                    # the kernel ran other work): nothing was sampled, the counters tell what
                    # happened.
                    state = self._open()
                    state.record_known = True
                    self._watched(state, self._deadline())
                else:
                    return  # late, but not seen stalled: a loop stopped and run again
            if state.done:
                return
            report = self._finalize(state, now, culprit)
        if report is not None:
            self._report_background(*report)

    def _deadline(self) -> float:
        """When the watchdog's timer expires if no beat comes first."""
        return self._beat_at + self.interval / 2 + self.threshold

    def _watched(self, state: _StallState, deadline: float) -> None:
        """The watchdog has been due to follow this stall since `deadline` (under self._lock)."""
        if deadline < state.watched_from:
            state.watched_from, state.watch_base = deadline, self._watch_base

    def _gil_share(self, state: _StallState, end: float) -> float:
        """Of the watchdog's time since it was due, the share it waited for the GIL."""
        watched = end - state.watched_from
        stat = self._watch_stat
        if watched <= 0 or stat is None or state.watch_base is None or self.stopped:
            return 0.0
        cpu, runqueue = delta(state.watch_base, stat.now())
        slept = state.slept
        if state.sleep_started is not None:
            slept += min(SAMPLE_SECONDS, end - state.sleep_started)
        return min(1.0, max(0.0, watched - cpu - runqueue - slept) / watched)

    # Settling a stall (under self._lock, on the loop thread once the loop runs again)

    def _settle(self, state: _StallState) -> None:
        """The stall's record is finishing: its part of the stall is over.

        On the loop thread, the loop may still not answer: it goes on to the next callback
        (requests queued back to back behind a blocking one). The rest is a stall of its own,
        from now, for the watchdog to follow and place in the next request's record.
        """
        with _GUARD, self._lock:
            if state.done:
                return
            culprit, self._gc_culprit = self._gc_culprit, None
            now = self.now()
            report = self._finalize(state, now, culprit)
            if (
                self._stall is state
                and not self.stopped
                and self._on_loop_thread()
                and state.one_callback()
            ):
                self._stall = self._following(now)
        if report is not None:
            self._report_background(*report)

    def _following(self, now: float) -> _StallState:
        """A stall from `now` on, its counters read now (under self._lock, on the loop thread)."""
        state = _StallState(
            now,
            now,
            self.stat.raw(),
            gc_clock.clock.cpu,
            self._throttling,
            self.process_cpu(),
            self.switches(),
        )
        state.follows = True
        return state

    def signals(self, state: _StallState, end: float) -> Signals:
        """The loop thread's counters over the stall, from the beat before it to `end`."""
        duration = end - state.start
        raw = self.stat.raw()
        cpu, runqueue = delta(ThreadStat.times(state.beat_stat), ThreadStat.times(raw))
        watchdog = (0.0, 0.0)  # its own CPU is perfmw's; its run queue the machine's
        if self._watch_stat is not None and state.watch_base is not None:
            watchdog = delta(state.watch_base, self._watch_stat.now())
        tasks = None if state.tasks is None else self.read_tasks(self._own_threads)
        threads = self._threads_cpu(state, cpu + watchdog[0], tasks, duration)
        # Collections are timed process-wide: the loop thread's are on its own CPU, the rest
        # were the other threads' computing.
        collected = gc_clock.clock.cpu - state.beat_gc
        gc_seconds = min(collected, cpu, duration)
        threads = min(max(threads, collected - gc_seconds), self.cpus * max(0.0, duration))
        queued = None  # the other threads' run-queue time (the live ones, from the first look)
        if tasks is not None and state.tasks is not None:
            first = state.tasks
            queued = watchdog[1] + sum(Tasks.spent(first, tasks, tid)[1] for tid in tasks)
            queued = min(queued, self.cpus * max(0.0, duration))
        cpu, runqueue = min(cpu, duration), min(runqueue, duration)
        throttling = cgroup().read()
        throttled = min(runqueue, CgroupCpu.throttled(state.throttling, throttling))
        self._throttling = throttling
        # The share of its time the watchdog could not get the GIL, applied to the time the loop
        # thread was off the CPU: the part another thread held the GIL.
        off_cpu = max(0.0, duration - cpu - runqueue)
        return Signals(
            duration,
            cpu=cpu,
            runqueue=runqueue,
            throttled=throttled,
            gil=self._gil_share(state, end) * off_cpu,
            gc=gc_seconds,
            samples=state.samples,
            dominant_share=state.dominant_share(),
            threads=threads,
            cpus=float(self.cpus),
            busy=self._busy(state, tasks, threads),
            threads_queued=queued,
            # Read on the loop thread only (the watchdog settles a stopped loop's stall).
            waits=self.switches() - state.beat_switches if self._on_loop_thread() else 0,
            switch_interval=sys.getswitchinterval(),
        )

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self.thread_id

    def _threads_cpu(
        self,
        state: _StallState,
        ours: float,
        tasks: dict[int, tuple[float, float]] | None,
        duration: float,
    ) -> float:
        """CPU seconds of the process's other threads since the beat before the stall.

        The process's clock counts the threads that ended meanwhile (a C library's workers),
        but the kernel brings a running thread's share of it up to date only at its ticks,
        which a CPU busy with one thread can skip for up to a second: the live threads' own
        counters (read from the watchdog's first look on) are exact, and the larger is kept.
        """
        spent: float = self.process_cpu() - state.beat_process - ours  # the loop's, the watchdog's
        if tasks is not None and state.tasks is not None:
            before = state.tasks
            live = sum(Tasks.spent(before, tasks, tid)[0] for tid in tasks)
            spent = max(spent, live)
        return min(max(0.0, spent), self.cpus * max(0.0, duration))

    def _busy(
        self, state: _StallState, tasks: dict[int, tuple[float, float]] | None, threads: float
    ) -> tuple[BusyThread, ...]:
        """The threads that computed most since the watchdog first looked, named."""
        if state.tasks is None or tasks is None or threads < BUSY_SECONDS:
            return ()
        busiest = Tasks.busiest(state.tasks, tasks, BUSY_THREADS, BUSY_SECONDS)
        python = {t.native_id: t for t in threading.enumerate() if t.native_id is not None}
        frames = sys._current_frames() if any(tid in python for tid, _ in busiest) else {}
        found: list[BusyThread] = []
        for tid, seconds in busiest:
            thread = python.get(tid)
            frame = frames.get(thread.ident) if thread is not None and thread.ident else None
            if thread is None:
                found.append(BusyThread(Tasks.comm(tid), seconds))
                continue
            stack = format_stack(frame)
            found.append(BusyThread(thread.name, seconds, stack))
            if state.busy_site.location is None:
                state.busy_site, state.busy_stack = call_site(frame), stack
        unnamed = threads - sum(t.cpu_seconds for t in found)
        if unnamed >= BUSY_SECONDS and len(found) < BUSY_THREADS:
            found.append(BusyThread(UNNAMED, unnamed))
        return tuple(found)

    def _finalize(
        self, state: _StallState, end: float, culprit: _GcCulprit | None
    ) -> tuple[RequestRecord | None, Stall] | None:
        """Duration, cause and culprit of a stall that ended at `end`.

        Returns (closed record or None, stall) when the stall must be reported apart from a
        request (no request, a finished one, no single culprit, the machine's doing); None
        when it stays in the record it was appended to, or was too short after all.
        """
        state.done = True
        stall = state.stall
        if stall is not None:
            _pending.pop(stall, None)
        duration = end - state.start
        # What ran after a request that blocked the loop: a stall only if one callback blocked
        # it too, or a collection (which no sample sees) located itself.
        unseen = state.follows and culprit is None and not state.one_callback()
        if duration < self.threshold or unseen:
            if stall is not None and state.record is not None:
                with contextlib.suppress(ValueError):
                    state.record.stalls.remove(stall)
            return None
        signals = self.signals(state, end)
        cause = classify(signals, self.threshold)
        self.recent.append((state.start, end))
        record = state.record
        if cause == "gc" and culprit is not None:
            site, stack, record = culprit.site, culprit.stack, culprit.record
        else:
            site = state.site()
            stack = state.stacks.get(site, ())
            if site.location is None and state.busy_site.location is not None:
                # Nothing of the application's on the loop: the line the computing thread ran.
                site, stack = state.busy_site, state.busy_stack
        if cause not in CODE_CAUSES or cause == "saturation":
            record = None  # the machine's doing, or many callbacks: no request to blame
        if stall is None:
            stall = Stall(duration, site.location, stack, cause)
        stall.duration_seconds = duration
        stall.location, stall.via, stall.stack, stall.cause = site.location, site.via, stack, cause
        stall.gc_seconds = signals.gc
        stall.started_at = state.start
        stall.signals = signals
        # Who waited for the loop meanwhile: the app's other requests in flight and those read
        # but not started yet, each the whole stall, and those still unread in their
        # connections, since they arrived.
        waiting_for = state.record if record is None else record
        throughout = 0 if waiting_for is None else waiting_for.others_in_flight()
        loop = self._loop_ref()
        if loop is not None and self._on_loop_thread():
            throughout += requests.not_started(loop)
        unread = sockets.waits(self.arrivals(end), state.start, end)
        stall.requests_waiting = throughout + len(unread)
        stall.delayed_seconds = duration * throughout + sum(unread)
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

    def overlap(self, start: float, end: float) -> float:
        """Seconds of [start, end] during which this loop was stalled (settled or still open)."""
        total = 0.0
        for stall_start, stall_end in list(self.recent):
            total += max(0.0, min(end, stall_end) - max(start, stall_start))
        state = self._stall
        if state is not None and not state.done:
            total += max(0.0, end - max(start, state.start))
        return min(total, max(0.0, end - start))

    # GC on the loop thread (called from the GC callback)

    def gc_blocked(self, seconds: float, frame: FrameType | None) -> None:
        record = _current.get()
        self._gc_culprit = _GcCulprit(
            self.now(), seconds, record, call_site(frame), format_stack(frame)
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
                state = self._stall = self._open()
            if state is not None and not state.done:
                if not state.record_known:
                    # The watchdog gets the GIL at the first check after the collection, before
                    # this callback runs: it may have opened the stall without locating it yet.
                    state.record, state.record_known = record, True
                self._update(state)
        finally:
            self._lock.release()

    # The watchdog thread

    def _watch(self) -> None:
        own = self._watch_stat = ThreadStat(threading.get_native_id(), threading.get_ident())
        self._own_threads = (*self._own_threads[:1], threading.get_native_id())
        try:
            while not self.stopped:
                loop = self._loop_ref()
                if loop is None or loop.is_closed():
                    return
                seq = self._seq
                deadline = self._deadline()
                wait = deadline - self.now()
                del loop
                if gc_clock.pending():
                    with _GUARD:
                        gc_clock.flush()
                if wait > 0:
                    self._watch_base = own.now()
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
                state = None
                with _GUARD:
                    state = self._overdue_beat(loop, seq, deadline)
                    if state is not None:
                        self._follow_stall(loop, seq, state)
                idle = state is None and not loop.is_running()
                del loop, state
                # Stopped between two run_until_complete() calls, or a stall settled early
                # (its request finished): wait for the next beat.
                pause = self.threshold if idle else SAMPLE_SECONDS
                self._watch_base = own.now()
                if self._seq == seq and self._wake.acquire(timeout=pause):
                    return
        finally:
            with self._lock:
                self._watch_stat = None
            own.close()
            self._exited()
            timer, self._timer = self._timer, None
            if timer is not None:
                timer.close()

    def _overdue_beat(
        self, loop: asyncio.AbstractEventLoop, seq: int, deadline: float
    ) -> _StallState | None:
        """The watchdog woke past the deadline of beat `seq`: the stall to follow, if any."""
        with self._lock:
            self._checked_seq = seq
            if self._seq != seq or self.stopped or not loop.is_running():
                return None
            state = self._stall  # already opened by a long collection on the loop thread
            if state is None:
                state = self._stall = self._open()
            elif state.done:
                return None
            # A stall that follows a request's began after the deadline: watched from now.
            self._watched(state, self.now() if state.follows else deadline)
            return state

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

    def _follow_stall(self, loop: asyncio.AbstractEventLoop, seq: int, state: _StallState) -> None:
        """Look at the stalled loop until it is back, sampling its stack when one is due."""
        while True:
            due = state.sample_due(self.now())
            frame = sys._current_frames().get(self.thread_id) if due else None
            with self._lock:
                if state.done or self._seq != seq or self.stopped:
                    break
                if frame is not None:
                    self._sample(state, frame, loop)
                self._update(state)
            frame = None
            if state.tasks is None and (self._reads_holding_gil or state.placed()):
                self._first_look_at_threads(state)
            if not loop.is_running():
                # The callback returned and the loop stopped before the next beat; never seen
                # at all (no sample), it is the loop stopping, as a server shutting down does.
                with self._lock:
                    seen = not state.done and (state.samples > 0 or state.stall is not None)
                    report = self._finalize(state, self.now(), None) if seen else None
                    state.done = True
                    self._stall = None
                if report is not None:
                    self._report_background(*report)
                return
            with self._lock:
                state.sleep_started = self.now()
            if self._wake.acquire(timeout=SAMPLE_SECONDS):
                return
            woke = self.now()  # later than the timeout when the GIL was held meanwhile
            with self._lock:
                if state.sleep_started is not None:
                    state.slept += min(SAMPLE_SECONDS, woke - state.sleep_started)
                state.sleep_started = None

    def _first_look_at_threads(self, state: _StallState) -> None:
        """The other threads' counters now: the baseline of their CPU and run-queue time, and
        of the ones named when the stall settles.

        Taken as soon as the watchdog follows the stall where `Tasks.read` keeps the GIL held;
        else only once the stall is in its request's record (`placed`): a read that lets the
        GIL go lets the loop thread run on, and its request could finish meanwhile and lose its
        stall.
        """
        tasks = self.read_tasks(self._own_threads)
        with self._lock:
            if state.tasks is None:
                state.tasks = tasks

    def _sample(
        self, state: _StallState, frame: FrameType, loop: asyncio.AbstractEventLoop
    ) -> None:
        frames: list[FrameType] = []
        f: FrameType | None = frame
        while f is not None:
            frames.append(f)
            f = f.f_back
        still = snapshot(frames)  # before anything lets the GIL go and the loop thread move on
        frames.reverse()  # outermost first
        root = requests.callback_root(frames, self._root_depth)
        stands_for = state.sampled(self.now())
        state.roots[root] += 1
        if not state.record_known and root is not None:
            state.record = requests.record_for(frames, loop)
            state.record_known = True
            # Attached now: the request may finish as soon as this thread lets the GIL go.
            self._update(state)
        site = call_site(still)
        state.sites[site] += stands_for
        if site not in state.stacks and len(state.stacks) < MAX_SITES:
            state.stacks[site] = format_stack(still)

    def _update(self, state: _StallState) -> None:
        now = self.now()
        elapsed = now - state.start
        record = state.record
        if state.record_known and record is not None and record.started_at > state.beat_at:
            # The request began after the last beat: the stall began no earlier than it did.
            if state.follows:
                state.start = record.started_at
            else:
                state.start = (record.started_at + state.beat_at + self.interval) / 2
            elapsed = now - state.start
        if state.stall is None:
            if elapsed < self.threshold or record is None or record.closed:
                return
            site = state.site()
            state.stall = Stall(elapsed, site.location, state.stacks.get(site, ()), "blocking")
            state.stall.via = site.via
            _pending[state.stall] = (self, state)
            record.stalls.append(state.stall)
        else:
            stall = state.stall
            site = state.site()
            stall.duration_seconds = elapsed
            stall.location, stall.via = site.location, site.via
            stall.stack = state.stacks.get(site, ())
