"""The loop monitor settling stalls on an injected clock and synthetic kernel readings.

No thread and no real time here: each test drives the monitor's heartbeat and settling by hand,
so durations, causes and attributions are exact whatever the machine is doing.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import perfmw
from perfmw import loop as loop_package
from perfmw import perf as perf_module
from perfmw.loop import monitor as monitor_module
from perfmw.loop.kernel import CgroupCpu, ThreadStat
from perfmw.loop.monitor import (
    HEARTBEAT_SECONDS,
    MAX_SAMPLES,
    ONE_CALLBACK_SAMPLES,
    RECENT_STALLS,
    SAMPLE_SECONDS,
    SATURATION_SAMPLES,
    LoopMonitor,
)
from perfmw.record import BACKGROUND, Query, RequestRecord
from support import line_of

T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class Stat:
    """A thread's schedstat, set by the test."""

    def __init__(self) -> None:
        self.cpu = 0.0
        self.queued = 0.0

    def raw(self) -> bytes:
        return f"{round(self.cpu * 1e9)} {round(self.queued * 1e9)} 1\n".encode()

    def now(self) -> tuple[float, float] | None:
        return ThreadStat.times(self.raw())

    def close(self) -> None:
        pass


class Rig:
    def __init__(self, cgroup_file: Path, threshold: float = 0.1) -> None:
        self.loop = asyncio.new_event_loop()
        self.perf = perfmw.Perf(
            perfmw.Settings(stall_threshold_seconds=threshold), registry=CollectorRegistry()
        )
        self.clock, self.stat = Clock(), Stat()
        self.process = Clock()  # the process's CPU clock: the loop thread's plus the others'
        self.process.t = 0.0
        self.tasks: dict[int, tuple[float, float]] = {}  # the other threads' (CPU, run queue)
        self.switches = Clock()  # the loop thread's voluntary context switches
        self.switches.t = 0
        self.cgroup_file = cgroup_file
        # When each request unread in a server connection arrived, as the kernel would say.
        self.arrived: list[float] = []
        self.throttle(0, 0.0)
        monitor_module._cgroup = CgroupCpu([str(cgroup_file)])
        self.monitor = LoopMonitor(
            self.loop,
            self.perf,
            self.clock,
            self.stat,  # type: ignore[arg-type]
            self.process,
            lambda exclude: dict(self.tasks),
            self.switches,
            lambda now: list(self.arrived),
        )
        self.monitor._throttling = monitor_module.cgroup().read()  # as start() does

    def throttle(self, periods: int, seconds: float) -> None:
        self.cgroup_file.write_text(
            f"nr_periods 9\nnr_throttled {periods}\nthrottled_usec {round(seconds * 1e6)}\n"
        )

    def beat(self) -> None:
        self.monitor._mark(self.clock())

    def stall(self, record: RequestRecord | None = None, frame: Any = None) -> Any:
        """A stall that begins after the latest beat, as the watchdog opens it."""
        monitor = self.monitor
        with monitor._lock:
            state = monitor._stall = monitor._open()
            if record is not None:
                state.record, state.record_known = record, True
            if frame is not None:
                monitor._sample(state, frame, self.loop)
            monitor._update(state)
        return state

    def settle(
        self, state: Any, after: float, cpu: float = 0.0, queued: float = 0.0, others: float = 0.0
    ) -> Any:
        """The stall ends `after` seconds on; the loop thread and the `others` computed."""
        self.clock.t += after
        self.stat.cpu += cpu
        self.stat.queued += queued
        self.process.t += cpu + others
        with self.monitor._lock:
            report = self.monitor._finalize(state, self.clock(), None)
            self.monitor._stall = None
        return report

    def close(self) -> None:
        if self.monitor._timer is not None:
            self.monitor._timer.close()
        self.loop.close()
        self.perf.shutdown()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    found = Rig(tmp_path / "cpu.stat")
    yield found
    found.close()
    monitor_module._cgroup = None


def sampled_here() -> Any:
    return sys._getframe(1)


def test_a_stall_lasts_from_half_a_beat_after_the_last_one_to_its_end(rig: Rig) -> None:
    record = RequestRecord("/r", "GET", owner=rig.perf)
    record.started_at = T0 - 1.0
    rig.beat()
    state = rig.stall(record, sampled_here())  # the culprit's line
    rig.clock.t += 0.2
    rig.monitor._update(state)  # the watchdog, 200 ms in: past the threshold, provisional
    assert [(s.cause, round(s.duration_seconds, 9)) for s in record.stalls] == [("blocking", 0.19)]
    assert rig.settle(state, 0.21, cpu=0.39) is None  # stays in its request's record
    (stall,) = record.stalls
    assert stall.duration_seconds == pytest.approx(0.41 - HEARTBEAT_SECONDS / 2, abs=1e-9)
    assert (stall.cause, stall.location) == ("cpu", line_of(__file__, "# the culprit's line"))
    assert stall.started_at == pytest.approx(T0 + HEARTBEAT_SECONDS / 2)
    assert stall.signals is not None and stall.signals.cpu == pytest.approx(0.39)


def test_a_request_that_began_after_the_last_beat_narrows_the_start(rig: Rig) -> None:
    rig.beat()
    record = RequestRecord("/r", "GET", owner=rig.perf)
    record.started_at = T0 + 0.006
    state = rig.stall(record)
    rig.settle(state, 0.3)
    (stall,) = record.stalls
    start = (T0 + 0.006 + T0 + HEARTBEAT_SECONDS) / 2  # between the request and the next beat
    assert stall.duration_seconds == pytest.approx(T0 + 0.3 - start, abs=1e-9)
    assert stall.cause == "blocking"


def test_a_stall_shorter_than_the_threshold_is_dropped(rig: Rig) -> None:
    record = RequestRecord("/r", "GET", owner=rig.perf)
    record.started_at = T0 - 1.0
    rig.beat()
    state = rig.stall(record)
    assert rig.settle(state, 0.1) is None  # 90 ms after the estimated start
    assert record.stalls == []


def test_a_stall_the_kernel_made_is_starved_and_blamed_on_no_request(rig: Rig) -> None:
    record = RequestRecord("/r", "GET", owner=rig.perf)
    record.started_at = T0 - 1.0
    rig.beat()
    state = rig.stall(record, sampled_here())
    closed, stall = rig.settle(state, 0.31, cpu=0.02, queued=0.26)
    assert (closed, stall.cause) == (None, "starved")
    assert record.stalls == []
    assert stall.signals.runqueue == pytest.approx(0.26)


def test_a_stall_the_cgroup_quota_made_is_throttled(rig: Rig) -> None:
    rig.beat()
    state = rig.stall()
    rig.throttle(2, 0.25)
    _closed, stall = rig.settle(state, 0.31, cpu=0.02, queued=0.27)
    assert stall.cause == "throttled"
    assert stall.signals.throttled == pytest.approx(0.25)
    # The next stall is measured from this one's reading: no new throttling, so starved.
    rig.beat()
    state = rig.stall()
    _closed, stall = rig.settle(state, 0.31, cpu=0.02, queued=0.27)
    assert (stall.cause, stall.signals.throttled) == ("starved", 0.0)


def watchdog_of(rig: Rig) -> Stat:
    """The watchdog's own counters, synthetic too."""
    watchdog = Stat()
    rig.monitor._watch_stat = watchdog  # type: ignore[assignment]
    rig.monitor._watch_base = watchdog.now()
    return watchdog


def gil_waited_stall(rig: Rig) -> Any:
    """A stall the watchdog has been due to follow since its deadline, waiting for the GIL."""
    watchdog_of(rig)
    rig.beat()
    state = rig.stall()
    with rig.monitor._lock:
        rig.monitor._watched(state, rig.monitor._deadline())
    return state


def test_the_gil_held_by_another_thread_is_what_the_watchdog_waited_for(rig: Rig) -> None:
    watchdog = watchdog_of(rig)
    rig.beat()
    state = rig.stall()
    deadline = rig.monitor._deadline()
    with rig.monitor._lock:
        rig.monitor._watched(state, deadline)
    watchdog.cpu += 0.002  # it ran 2 ms; off the CPU and not queued for the rest
    rig.process.t += 0.002
    _closed, stall = rig.settle(state, 0.5, cpu=0.001, others=0.45)
    watched = T0 + 0.5 - deadline
    off_cpu = 0.5 - HEARTBEAT_SECONDS / 2 - 0.001
    assert stall.signals.gil == pytest.approx((watched - 0.002) / watched * off_cpu)
    # The process's other threads computed 450 ms (the watchdog's 2 ms are not theirs): the
    # GIL was theirs, the code's doing.
    assert stall.signals.threads == pytest.approx(0.45)
    assert stall.cause == "cpu"


def test_a_gil_nobody_else_computed_with_was_held_by_the_loop_thread_itself(rig: Rig) -> None:
    # C code on the loop that blocks without releasing the GIL (a ctypes.PyDLL call): the
    # watchdog waits for the GIL all along, and no other thread computed.
    state = gil_waited_stall(rig)
    _closed, stall = rig.settle(state, 0.5, cpu=0.001, others=0.003)
    assert stall.signals.gil > 0.3
    assert (stall.cause, stall.signals.threads) == ("blocking", pytest.approx(0.003))


def test_a_gil_held_by_a_thread_the_kernel_preempted_is_the_machines(rig: Rig) -> None:
    # The thread that held the GIL barely computed: it was runnable but not run (two other
    # processes took the CPUs), by its own counters since the watchdog first read them.
    state = gil_waited_stall(rig)
    rig.tasks = {4242: (1.0, 2.0), 4243: (3.0, 0.5)}
    state.tasks = dict(rig.tasks)  # as the watchdog reads them when it first looks
    rig.tasks = {4242: (1.002, 2.4), 4243: (3.001, 0.55), 4244: (0.0, 0.01)}
    _closed, stall = rig.settle(state, 0.5, cpu=0.001, others=0.003)
    assert stall.signals.threads_queued == pytest.approx(0.46)
    assert (stall.cause, stall.signals.threads) == ("starved", pytest.approx(0.003))


@pytest.mark.parametrize(("waits", "cause"), [(60, "starved"), (6, "blocking")])
def test_a_stall_the_watchdog_never_saw_is_told_by_the_loop_threads_wakes(
    rig: Rig, waits: int, cause: str
) -> None:
    # Another thread held the GIL all along: the watchdog never ran, nor read the threads.
    # Waiting for the GIL, the loop thread woke every switch interval (60 times in 300 ms);
    # holding it itself, blocked in C code, hardly ever.
    found: list[RequestRecord] = []
    perf_module._finish_hooks.append(lambda perf, record: found.append(record))
    try:
        watchdog_of(rig)
        rig.monitor._due = T0 + HEARTBEAT_SECONDS
        rig.beat()
        rig.clock.t += 0.3
        rig.stat.cpu += 0.002
        rig.switches.t += waits
        rig.process.t += 0.004
        rig.monitor._beat()
    finally:
        perf_module._finish_hooks.pop()
    (record,) = found
    (stall,) = record.stalls
    assert (record.route, stall.cause) == (BACKGROUND, cause)
    assert stall.signals is not None
    assert (stall.signals.waits, stall.signals.threads_queued) == (waits, None)
    assert stall.signals.gil == pytest.approx(0.3 - HEARTBEAT_SECONDS / 2 - 0.002)


def test_the_watchdogs_own_sleeps_between_samples_are_not_gil_waits(rig: Rig) -> None:
    watchdog_of(rig)
    rig.beat()
    state = rig.stall()
    with rig.monitor._lock:
        rig.monitor._watched(state, T0 + 0.1)
    state.slept = 0.19  # it slept between its samples for all but 10 ms of its 200 ms
    _closed, stall = rig.settle(state, 0.3)
    assert stall.cause == "blocking"
    assert stall.signals.gil == pytest.approx(0.01 / 0.2 * (0.3 - HEARTBEAT_SECONDS / 2))


def test_a_stall_the_watchdog_never_saw_is_settled_from_the_counters(rig: Rig) -> None:
    found: list[RequestRecord] = []

    def hook(perf: Any, record: RequestRecord) -> None:
        found.append(record)

    perf_module._finish_hooks.append(hook)
    try:
        watchdog_of(rig)
        rig.monitor._due = T0 + HEARTBEAT_SECONDS
        rig.beat()
        rig.clock.t += 0.6  # no beat, and the watchdog never ran: it waited for the GIL
        rig.stat.cpu += 0.001
        rig.process.t += 0.001 + 0.55  # held by another thread, computing
        rig.monitor._beat()
        # The watchdog did look at this beat's lateness (and found the loop stopped): nothing.
        rig.monitor._checked_seq = rig.monitor._seq
        rig.clock.t += 0.6
        rig.monitor._beat()
    finally:
        perf_module._finish_hooks.remove(hook)
    assert [(r.route, r.kind, [s.cause for s in r.stalls]) for r in found] == [
        (BACKGROUND, "background", ["cpu"])
    ]
    assert found[0].stalls[0].duration_seconds == pytest.approx(
        0.6 - HEARTBEAT_SECONDS / 2, abs=1e-9
    )


def test_the_lag_is_how_late_the_beat_ran(rig: Rig) -> None:
    rig.monitor._due = T0 + HEARTBEAT_SECONDS
    rig.clock.t = T0 + HEARTBEAT_SECONDS + 0.03
    rig.monitor._beat()
    assert rig.monitor.lag == pytest.approx(0.03)
    rig.clock.t = rig.monitor._due - 0.001  # early
    rig.monitor._beat()
    assert rig.monitor.lag == 0.0


def test_recent_stalls_are_capped_and_tell_how_long_a_query_waited(rig: Rig) -> None:
    for _ in range(RECENT_STALLS + 36):
        rig.beat()
        rig.settle(rig.stall(), 0.21)
        rig.clock.t += 1.0
    assert len(rig.monitor.recent) == RECENT_STALLS
    (start, end), (next_start, _next_end) = list(rig.monitor.recent)[-2:]
    assert end - start == pytest.approx(0.2)
    assert rig.monitor.overlap(start - 1, start + 0.05) == pytest.approx(0.05)
    assert rig.monitor.overlap(start + 0.1, next_start + 0.1) == pytest.approx(0.1 + 0.1)
    assert rig.monitor.overlap(end, next_start) == 0.0
    rig.beat()
    state = rig.stall()  # still open: counts up to now
    rig.clock.t += 0.3
    assert rig.monitor.overlap(state.start, rig.clock()) == pytest.approx(0.3 - 0.01)
    rig.settle(state, 0.0)


def test_a_query_is_slow_only_for_what_its_loop_did_not_add(rig: Rig) -> None:
    rig.beat()
    rig.settle(rig.stall(), 0.31)  # the loop stalled from T0 + 0.01 to T0 + 0.31
    loop_package._monitors[rig.loop] = rig.monitor
    try:
        behind, slow = (
            Query("find", "c", "db", f"find db.c {{{name}: ?}}", seconds, location="app.py:1")
            for name, seconds in (("a", 0.32), ("b", 0.42))
        )
        for query in (behind, slow):
            query.started_at, query.on_loop = T0, rig.loop
            query.finished_at = T0 + query.duration_seconds
        record = RequestRecord("/r", "GET", owner=rig.perf)
        record.queries.extend([behind, slow])
        rig.perf.finish(record)
    finally:
        del loop_package._monitors[rig.loop]
    assert behind.stall_seconds == pytest.approx(0.3)
    found = [(f.kind, f.detail["shape"], f.total_seconds, f.detail) for f in record.findings]
    assert [(kind, shape) for kind, shape, _, _ in found] == [("slow_query", slow.shape)]
    (_kind, _shape, seconds, detail) = found[0]
    assert seconds == pytest.approx(0.12)  # the query's own time
    assert detail["duration_seconds"] == 0.42
    assert detail["loop_stall_seconds"] == pytest.approx(0.3)


def follow(rig: Rig, state: Any, seconds: float, frame: Any) -> int:
    """The watchdog looking at the stalled loop every SAMPLE_SECONDS for `seconds`, sampling
    `frame()` when a sample is due; the samples it took."""
    taken = 0
    for _ in range(round(seconds / SAMPLE_SECONDS)):
        rig.clock.t += SAMPLE_SECONDS
        if state.sample_due(rig.clock()):
            with rig.monitor._lock:
                rig.monitor._sample(state, frame(), rig.loop)
            taken += 1
    return taken


def test_samples_back_off_as_a_stall_grows_up_to_a_bound(rig: Rig) -> None:
    rig.beat()
    state = rig.stall()
    # Every 10 ms while the stall is young, then every eighth of its age: a sample stands for
    # an ever longer stretch, and the loop gives the watchdog the GIL ever less often.
    ages = []
    for _ in range(round(1.0 / SAMPLE_SECONDS)):
        rig.clock.t += SAMPLE_SECONDS
        if state.sample_due(rig.clock()):
            with rig.monitor._lock:
                rig.monitor._sample(state, sampled_here(), rig.loop)
            ages.append(round(rig.clock() - state.start, 3))
    assert ages[:10] == [0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09]
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(ages)]
    for age, gap in zip(ages, gaps, strict=False):
        due = max(SAMPLE_SECONDS, age / 8)
        assert due <= gap < due + SAMPLE_SECONDS  # the first look after it is due
    assert len(ages) == 27  # in the first second
    assert follow(rig, state, 59.0, sampled_here) == MAX_SAMPLES - 27  # in the next minute
    assert follow(rig, state, 60.0, sampled_here) == 0
    _closed, stall = rig.settle(state, 0.0, cpu=120.0)
    assert stall.signals.samples == MAX_SAMPLES


async def callback_a() -> Any:
    return sys._getframe(0)


async def callback_b() -> Any:
    return sys._getframe(0)


async def callback_c() -> Any:
    return sys._getframe(0)


async def callback_d() -> Any:
    return sys._getframe(0)


def frame_of(callback: Any) -> Any:
    """The frame of a loop callback (a coroutine) as the watchdog would find it running."""
    coroutine = callback()
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise AssertionError("the coroutine did not finish")


def test_a_loop_saturated_with_short_callbacks_is_sampled_no_more(rig: Rig) -> None:
    rig.beat()
    state = rig.stall()
    callbacks = iter([callback_a, callback_b, callback_c, callback_d])
    taken = follow(rig, state, 0.04, lambda: frame_of(next(callbacks)))
    assert taken == SATURATION_SAMPLES == 4
    assert follow(rig, state, 2.0, sampled_here) == 0  # no callback dominates: none is stuck
    _closed, stall = rig.settle(state, 0.0, cpu=2.0)
    assert stall.cause == "saturation"
    assert stall.signals.samples == 4


def test_a_stall_is_located_where_most_of_its_time_went_not_most_samples(rig: Rig) -> None:
    rig.beat()
    state = rig.stall()
    first = follow(rig, state, 0.5, lambda: early())
    later = follow(rig, state, 1.5, lambda: late())
    assert first > later  # the young stall was sampled more often...
    _closed, stall = rig.settle(state, 0.0, cpu=2.0)
    assert stall.location == line_of(__file__, "# the stall's last 1.5 s")  # ...but was short


def early() -> Any:
    return sys._getframe(0)  # the stall's first 0.5 s


def late() -> Any:
    return sys._getframe(0)  # the stall's last 1.5 s


def test_a_collection_with_no_python_frame_below_the_gc_callback_is_located_nowhere(
    rig: Rig,
) -> None:
    # C code starting a collection on a thread with no Python frame (a thread's bootstrap,
    # the interpreter's shutdown): here a thread whose whole Python stack is the callback.
    import _thread
    import threading

    from perfmw._frames import NOWHERE
    from perfmw.loop import gc_clock

    info = {"generation": 2, "collected": 0, "uncollectable": 0}
    done = threading.Lock()
    done.acquire()

    class Threads(dict[int, Any]):
        def get(self, ident: int, default: Any = None) -> Any:
            return rig.monitor  # whichever thread the collection runs on

    saved = (gc_clock.loop_threads, gc_clock.clock.culprit_seconds, gc_clock.clock.sinks)
    gc_clock.loop_threads, gc_clock.clock.culprit_seconds = Threads(), 0.0
    gc_clock.clock.sinks = ()  # this made-up collection is not exported
    try:
        # Only C calls the callback, once per phase as the collector does: list() runs the
        # map, then releases `done` (iter() calls release until it returns None, once).
        calls = map(gc_clock._on_gc, ["start", "stop"], [info, info])
        _thread.start_new_thread(list, (itertools.chain(calls, iter(done.release, None)),))
        assert done.acquire(timeout=10)
        gc_clock.flush()
    finally:
        gc_clock.loop_threads, gc_clock.clock.culprit_seconds, gc_clock.clock.sinks = saved
    culprit = rig.monitor._gc_culprit
    assert culprit is not None
    assert (culprit.record, culprit.site, culprit.stack) == (None, NOWHERE, ())


def hasher_waits(ready: threading.Event, done: threading.Event) -> None:
    ready.set()
    done.wait()  # the hasher's line


def test_a_loop_queued_behind_its_own_threads_is_the_codes_with_the_threads_named(
    rig: Rig,
) -> None:
    ready, done = threading.Event(), threading.Event()
    hasher = threading.Thread(target=hasher_waits, args=(ready, done), name="hasher")
    hasher.start()
    ready.wait()
    try:
        assert hasher.native_id is not None
        rig.monitor.cpus = 2
        rig.beat()
        state = rig.stall()
        rig.tasks = {hasher.native_id: (5.0, 1.0), 4242: (1.0, 1.0)}
        state.tasks = dict(rig.tasks)  # as the watchdog reads them when it first looks
        rig.tasks = {hasher.native_id: (5.4, 1.0), 4242: (1.15, 1.0), 4243: (0.005, 0.0)}
        # Queued 250 ms while the process's threads used both CPUs (600 ms in 300 ms).
        closed, stall = rig.settle(state, 0.31, cpu=0.02, queued=0.25, others=0.6)
    finally:
        done.set()
        hasher.join()
    assert (closed, stall.cause) == (None, "cpu")
    busy = [(t.name, round(t.cpu_seconds, 6)) for t in stall.signals.busy]
    # The Python thread by its name, a C thread by the kernel's, the rest unnamed; the one that
    # computed 5 ms is not named.
    assert busy[0] == ("hasher", 0.4)
    assert busy[1][1] == 0.15 and busy[1][0] in ("4242", monitor_module.Tasks.comm(4242))
    assert busy[2] == (monitor_module.UNNAMED, 0.05)
    # Nothing of the application's was on the loop: located at the computing thread's line.
    assert stall.location == line_of(__file__, "# the hasher's line")
    assert line_of(__file__, "# the hasher's line") + " in hasher_waits" in stall.stack
    assert stall.signals.busy[0].stack == stall.stack


# --- The race between a stall's placing and its request's end ---


def test_a_request_that_ends_while_the_watchdog_reads_the_threads_keeps_its_stall(
    rig: Rig,
) -> None:
    # Reading the process's threads lets the GIL go at each thread's file, and the loop thread,
    # which had to give the GIL up to the watchdog, takes it back at once and may finish its
    # request meanwhile: the watchdog puts the stall in the request's record before it reads.
    found: list[RequestRecord] = []
    record = RequestRecord("/r", "GET", owner=rig.perf)
    record.started_at = T0 - 1.0
    blocked, release, finished = threading.Event(), threading.Event(), threading.Event()

    async def handler() -> None:
        perfmw.record._current.set(record)
        # One line: wherever the watchdog samples from `set()` on, the request is on it.
        blocked.set() or release.wait(timeout=10)  # the request's blocking line
        rig.perf.finish(record)  # its response is sent: the loop runs again
        finished.set()

    def reading_while_the_request_ends(exclude: Any) -> dict[int, tuple[float, float]]:
        if not release.is_set():
            release.set()
            assert finished.wait(timeout=10)
        return {}

    def watchdog() -> None:
        assert blocked.wait(timeout=10)
        rig.monitor._watch()  # its loop, from waking past the deadline until stopped

    def hook(perf: Any, finished_record: RequestRecord) -> None:
        found.append(finished_record)

    rig.monitor.read_tasks = reading_while_the_request_ends
    rig.beat()
    rig.clock.t += 0.2  # the watchdog wakes 200 ms on, past the threshold
    follower = threading.Thread(target=watchdog)
    perf_module._finish_hooks.append(hook)
    try:
        follower.start()
        rig.loop.run_until_complete(handler())
    finally:
        rig.monitor.stop()
        follower.join(timeout=10)
        perf_module._finish_hooks.remove(hook)
    assert [(r.route, r.kind) for r in found] == [("/r", "http")]
    assert [(s.cause, round(s.duration_seconds, 9), s.location) for s in record.stalls] == [
        ("blocking", 0.19, line_of(__file__, "# the request's blocking line"))
    ]


def test_a_collection_attaches_its_stall_to_the_request_when_the_watchdog_opened_it(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A collection holds the GIL: the watchdog gets it as the collection ends, at the first
    # check before the GC callback runs, and opens the stall without having located it.
    from perfmw.loop import gc_clock

    record = RequestRecord("/gc", "GET", owner=rig.perf)
    record.started_at = T0 - 1.0
    rig.beat()
    state = rig.stall()  # opened by the watchdog, no sample yet
    assert not state.record_known
    rig.clock.t += 0.25
    rig.stat.cpu += 0.24
    monkeypatch.setattr(gc_clock.clock, "cpu", state.beat_gc + 0.24)
    token = perfmw.record._current.set(record)
    try:
        rig.monitor.gc_blocked(0.24, sampled_here())  # the collecting line
    finally:
        perfmw.record._current.reset(token)
    assert [s.cause for s in record.stalls] == ["blocking"]  # provisional, in its record
    rig.perf.finish(record)
    assert [(s.cause, round(s.duration_seconds, 9), s.location) for s in record.stalls] == [
        ("gc", 0.24, line_of(__file__, "# the collecting line"))
    ]


def test_a_loop_whose_thread_ended_before_any_sample_reports_no_stall(rig: Rig) -> None:
    # A server shutting down: its loop stops and its thread ends between two looks, after the
    # last beat. Nothing was seen stalled: no stall, no <background> record.
    found: list[RequestRecord] = []
    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    assert ended.ident is not None
    rig.monitor.thread_id = ended.ident
    perf_module._finish_hooks.append(lambda perf, record: found.append(record))
    try:
        rig.beat()
        state = rig.stall()
        rig.clock.t += 0.3
        rig.monitor._follow_stall(rig.loop, rig.monitor._seq, state)
    finally:
        perf_module._finish_hooks.pop()
    assert (found, state.done, rig.monitor._stall) == ([], True, None)


class Callbacks:
    """Loop callbacks to sample: each `await` below is a suspended coroutine of its own, the
    root of its samples, as a request's task is."""

    def __init__(self) -> None:
        self.coroutines: list[Any] = []

    async def first(self) -> None:
        await asyncio.sleep(0)  # the first request's blocking line

    async def second(self) -> None:
        await asyncio.sleep(0)  # the second request's line

    def frame(self, code: Any) -> Any:
        coroutine = code()
        coroutine.send(None)  # suspended at its line
        self.coroutines.append(coroutine)
        return coroutine.cr_frame

    def close(self) -> None:
        for coroutine in self.coroutines:
            coroutine.close()


@pytest.fixture
def callbacks() -> Iterator[Callbacks]:
    made = Callbacks()
    yield made
    made.close()


def sample_for(rig: Rig, state: Any, frames: list[Any], seconds: float = 0.03) -> None:
    """The watchdog samples `frames` in turn, `seconds` of the loop's computing apart."""
    for frame in frames:
        rig.clock.t += seconds
        rig.stat.cpu += seconds
        with rig.monitor._lock:
            rig.monitor._sample(state, frame, rig.loop)
            rig.monitor._update(state)


def blocked_then_finished(
    rig: Rig, callbacks: Callbacks, next_route: str
) -> tuple[RequestRecord, RequestRecord, Any]:
    """A request blocks the loop for 0.2 s, every sample in its callback, and finishes with the
    loop still blocked: it, the request queued behind it, and the stall that follows."""
    first = RequestRecord("/blocking", "GET", owner=rig.perf)
    second = RequestRecord(next_route, "GET", owner=rig.perf)
    first.started_at = second.started_at = T0 - 0.01
    rig.beat()
    state = rig.stall(first)
    sample_for(rig, state, [callbacks.frame(callbacks.first)] * ONE_CALLBACK_SAMPLES, 0.1)
    rig.perf.finish(first)  # its response is sent; the loop goes on to the next at once
    following = rig.monitor._stall
    assert following is not None and following is not state and following.follows
    assert following.start == pytest.approx(T0 + 0.2, abs=1e-9)
    return first, second, following


def test_requests_that_block_the_loop_back_to_back_each_get_their_own_stall(
    rig: Rig, callbacks: Callbacks
) -> None:
    # Requests queued behind a blocking one run one after the other with no beat between them:
    # when the first finishes, the loop is still blocked, by the next. Each gets its own part.
    first, second, following = blocked_then_finished(rig, callbacks, "/blocking")
    with rig.monitor._lock:
        following.record, following.record_known = second, True
    sample_for(rig, following, [callbacks.frame(callbacks.second)] * 5)
    rig.perf.finish(second)
    after = rig.monitor._stall
    assert after is not None and after is not following
    rig.clock.t += 0.001  # the loop answers the beat: what followed the second is no stall
    rig.monitor._loop_came_back(rig.clock())
    assert rig.monitor._stall is None
    found = [
        (s.cause, round(s.duration_seconds, 9), s.location)
        for record in (first, second)
        for s in record.stalls
    ]
    assert found == [
        (
            "cpu",
            round(0.2 - HEARTBEAT_SECONDS / 2, 9),
            line_of(__file__, "# the first request's blocking line"),
        ),
        ("cpu", 0.15, line_of(__file__, "# the second request's line")),
    ]


@pytest.mark.parametrize("seen", ["spread over callbacks", "once", "outside any callback"])
def test_a_request_finishing_in_a_stall_not_one_callbacks_ends_it_for_no_other(
    rig: Rig, callbacks: Callbacks, seen: str
) -> None:
    # Half the samples in one callback and the rest in others (the loop ran several), a single
    # sample (chance, on a saturated loop), or samples in the loop's own code: nothing says
    # what the loop runs next blocks it. The request that finishes is followed by nothing.
    record = RequestRecord("/r", "GET", owner=rig.perf)
    record.started_at = T0 - 0.01
    rig.beat()
    state = rig.stall(record)
    spread = [callbacks.frame(callbacks.first) for _ in range(3)]
    samples = {
        "spread over callbacks": [spread[0], spread[1], spread[0], spread[2]],
        "once": spread[:1],
        "outside any callback": [sampled_here()] * 4,
    }[seen]
    sample_for(rig, state, samples, 0.2 / len(samples))
    rig.perf.finish(record)
    assert (state.done, rig.monitor._stall) == (True, state)
    assert [s.cause for s in record.stalls] == ["cpu"]


@pytest.mark.parametrize("seen", ["once", "in two callbacks"])
def test_what_follows_a_blocking_request_is_no_stall_unless_one_callback_blocked(
    rig: Rig, callbacks: Callbacks, seen: str
) -> None:
    # The first request blocked; what the loop ran after it was sampled once, or in two
    # callbacks: nothing says one of them blocked it, and nothing is reported for it.
    found: list[RequestRecord] = []
    perf_module._finish_hooks.append(lambda perf, record: found.append(record))
    try:
        first, second, following = blocked_then_finished(rig, callbacks, "/next")
        with rig.monitor._lock:
            following.record, following.record_known = second, True
        frames = [callbacks.frame(callbacks.second) for _ in range(2)]
        samples = frames[:1] if seen == "once" else frames
        sample_for(rig, following, samples, 0.16 / len(samples))
        assert [s.cause for s in second.stalls] == ["blocking"]  # provisional, 0.16 s in
        rig.perf.finish(second)
    finally:
        perf_module._finish_hooks.pop()
    assert [s.cause for s in first.stalls] == ["cpu"]
    assert [s.cause for s in second.stalls] == []
    assert [r.route for r in found] == ["/blocking", "/next"]  # no <background> record


def test_a_collection_after_a_blocking_request_is_the_next_request_s_stall(
    rig: Rig, callbacks: Callbacks, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A collection holds the GIL, so no sample sees it: it locates itself, and the part of the
    # stall after the blocking request is the next request's, caused by gc.
    from perfmw.loop import gc_clock

    _first, second, following = blocked_then_finished(rig, callbacks, "/gc")
    rig.clock.t += 0.25
    rig.stat.cpu += 0.25
    monkeypatch.setattr(gc_clock.clock, "cpu", following.beat_gc + 0.24)
    token = perfmw.record._current.set(second)
    try:
        rig.monitor.gc_blocked(0.24, sampled_here())  # the collection after the blocking request
    finally:
        perfmw.record._current.reset(token)
    rig.perf.finish(second)
    assert [(s.cause, round(s.duration_seconds, 9), s.location) for s in second.stalls] == [
        ("gc", 0.25, line_of(__file__, "# the collection after the blocking request"))
    ]


@pytest.mark.parametrize(
    ("in_flight", "sent_at", "delayed"),
    [
        (4, [], 0.191 * 3),  # it and three others: each of the three waited the whole stall
        # it and one other; two sent 50 and 150 ms into the stall, waiting unread in their
        # connections (the kernel dates their data) from then on
        (2, [0.05, 0.15], 0.191 + (0.191 - 0.05) + (0.191 - 0.15)),
    ],
    ids=["in flight", "sent meanwhile"],
)
def test_a_stall_counts_the_other_requests_that_waited_for_it(
    rig: Rig, callbacks: Callbacks, in_flight: int, sent_at: list[float], delayed: float
) -> None:
    # The loop answers again while the request still runs; the finding's delayed_seconds is
    # the others' wait, what a fix gives back.
    record = RequestRecord("/blocking", "GET", owner=rig.perf)
    record.started_at = T0 - 0.01
    rig.perf.sink.active("GET").value = in_flight  # as the middleware counts them
    rig.beat()
    state = rig.stall(record)
    rig.arrived = [state.start + seconds for seconds in sent_at]
    sample_for(rig, state, [callbacks.frame(callbacks.first)] * 2, 0.1)
    rig.clock.t += 0.001
    rig.monitor._loop_came_back(rig.clock())
    (stall,) = record.stalls
    assert (stall.requests_waiting, round(stall.duration_seconds, 9)) == (3, 0.191)
    assert round(stall.delayed_seconds, 9) == round(delayed, 9)
    rig.perf.finish(record)
    (finding,) = [f for f in rig.perf.findings.snapshot() if f.kind == "loop_stall"]
    assert finding.detail["requests_waiting"] == 3
    assert round(finding.detail["delayed_seconds"], 9) == round(delayed, 9)


def test_a_request_sent_during_stalls_back_to_back_waits_through_each_part(
    rig: Rig, callbacks: Callbacks
) -> None:
    # Sent 100 ms into the first request's part, unread until the loop answers again: it waits
    # the rest of that part and the whole of the next request's.
    rig.arrived = [T0 + 0.1]
    first, second, following = blocked_then_finished(rig, callbacks, "/blocking")
    with rig.monitor._lock:
        following.record, following.record_known = second, True
    sample_for(rig, following, [callbacks.frame(callbacks.second)] * 5)
    rig.perf.finish(second)
    rig.clock.t += 0.001
    rig.monitor._loop_came_back(rig.clock())
    found = [
        (round(s.duration_seconds, 9), s.requests_waiting, round(s.delayed_seconds, 9))
        for record in (first, second)
        for s in record.stalls
    ]
    assert found == [(round(0.2 - HEARTBEAT_SECONDS / 2, 9), 1, 0.1), (0.15, 1, 0.15)]


def test_two_stalls_at_one_line_of_a_request_add_up_the_wait_they_caused() -> None:
    # One finding per line and request: its wait is each stall's duration times the requests
    # then waiting, summed (0.2 s x 2 + 0.1 s x 1); the latest count is the evidence.
    from perfmw.detectors import loop as loop_detector
    from perfmw.record import Stall

    record = RequestRecord("/r", "GET")
    for seconds, waiting in ((0.2, 2), (0.1, 1)):
        stall = Stall(seconds, "app.py:3", ("app.py:3 in r",), "blocking")
        stall.requests_waiting, stall.delayed_seconds = waiting, seconds * waiting
        record.stalls.append(stall)
    (finding,) = loop_detector.detect(record, perfmw.Settings())
    assert (finding.count, round(finding.total_seconds, 9)) == (2, 0.3)
    assert finding.detail["requests_waiting"] == 1
    assert round(finding.detail["delayed_seconds"], 9) == 0.5
