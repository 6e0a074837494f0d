"""Kernel readings: schedstat and cgroup cpu.stat, parsed from real and synthetic text."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from perfmw.loop.kernel import (
    CgroupCpu,
    ThreadStat,
    Throttling,
    cpu_stat_paths,
    delta,
    parse_cpu_stat,
    parse_schedstat,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux kernel files")


def burn_cpu(seconds: float) -> None:
    """Compute for `seconds` of this thread's CPU time, however long that takes."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_schedstat_is_nanoseconds_on_cpu_then_waiting() -> None:
    assert parse_schedstat(b"533198144 124330 23\n") == (0.533198144, 0.00012433)
    assert parse_schedstat(b"") is None
    assert parse_schedstat(b"garbage here\n") is None
    assert delta((1.0, 0.5), (1.25, 0.75)) == (0.25, 0.25)
    assert delta(None, (1.0, 1.0)) == (0.0, 0.0)


@linux
def test_a_threads_cpu_time_is_what_its_own_clock_says() -> None:
    stat = ThreadStat(threading.get_native_id(), threading.get_ident())
    try:
        before, clock = stat.now(), time.thread_time()
        burn_cpu(0.2)
        after, spent = stat.now(), time.thread_time() - clock
    finally:
        stat.close()
    cpu, _queued = delta(before, after)
    assert abs(cpu - spent) < 0.005, (cpu, spent)


@linux
def test_a_thread_sharing_its_cpu_with_a_busy_process_waits_in_the_run_queue() -> None:
    cpu = min(os.sched_getaffinity(0))
    hog = subprocess.Popen(
        [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"]
    )
    mask = os.sched_getaffinity(0)
    try:
        time.sleep(0.1)  # the hog runs
        os.sched_setaffinity(0, {cpu})  # this thread only (Linux affinity is per thread)
        stat = ThreadStat(threading.get_native_id(), threading.get_ident())
        before, started = stat.now(), time.perf_counter()
        burn_cpu(0.1)
        (on_cpu, queued), wall = delta(before, stat.now()), time.perf_counter() - started
        stat.close()
    finally:
        os.sched_setaffinity(0, mask)
        hog.kill()
        hog.wait()
    # Two busy tasks on one CPU share it: while one runs the other waits, runnable.
    assert on_cpu >= 0.1
    assert queued >= 0.25 * wall, (on_cpu, queued, wall)
    assert abs(wall - on_cpu - queued) < 0.02  # a busy thread is on the CPU or queued for it


def test_without_schedstat_the_cpu_clock_alone() -> None:
    stat = ThreadStat(-1, threading.get_ident())  # no such task: the thread's CPU clock
    before = stat.now()
    burn_cpu(0.05)
    cpu, queued = delta(before, stat.now())
    assert cpu >= 0.05 and queued == 0.0


V1 = "nr_periods 120\nnr_throttled 7\nthrottled_time 2500000000\nnr_bursts 0\nburst_time 0\n"
V2 = (
    "usage_usec 9000000\nuser_usec 6000000\nsystem_usec 3000000\nnr_periods 50\n"
    "nr_throttled 3\nthrottled_usec 1500000\nnr_bursts 0\nburst_usec 0\n"
)


def test_cpu_stat_of_cgroup_v1_and_v2() -> None:
    assert parse_cpu_stat(V1) == Throttling(7, 2.5)
    assert parse_cpu_stat(V2) == Throttling(3, 1.5)
    assert parse_cpu_stat("usage_usec 10\n") is None  # no cpu controller in this cgroup
    assert parse_cpu_stat("") is None


def test_throttling_between_two_readings_is_the_worst_cgroup_of_the_chain() -> None:
    before = (Throttling(3, 1.0), Throttling(10, 5.0), None)
    after = (Throttling(4, 1.3), Throttling(10, 5.0), Throttling(1, 9.0))
    assert CgroupCpu.throttled(before, after) == pytest.approx(0.3)
    assert CgroupCpu.throttled(before, before) == 0.0
    assert CgroupCpu.throttled((), after) == 0.0


HYBRID_CGROUP = "4:memory:/jobs/7\n2:cpuacct:/\n1:cpu:/jobs/7\n0::/\n"
HYBRID_MOUNTS = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
)
V2_CGROUP = "0::/kubepods/pod1/c1\n"
V2_MOUNTS = "29 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
# A container sees its own cgroup as the root of its mount.
CONTAINER_CGROUP = "0::/\n"
CONTAINER_MOUNTS = "30 25 0:27 /kubepods/pod1/c1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n"
V1_COMBINED = "3:cpu,cpuacct:/docker/abc\n"
V1_COMBINED_MOUNTS = (
    "35 30 0:31 /docker/abc /sys/fs/cgroup/cpu,cpuacct ro - cgroup cgroup rw,cpu,cpuacct\n"
)


def test_the_cpu_stat_files_of_the_process_cgroup_and_its_ancestors() -> None:
    assert cpu_stat_paths(HYBRID_CGROUP, HYBRID_MOUNTS) == [
        "/sys/fs/cgroup/cpu/jobs/7/cpu.stat",
        "/sys/fs/cgroup/cpu/jobs/cpu.stat",
        "/sys/fs/cgroup/cpu/cpu.stat",
    ]
    assert cpu_stat_paths(V2_CGROUP, V2_MOUNTS) == [
        "/sys/fs/cgroup/kubepods/pod1/c1/cpu.stat",
        "/sys/fs/cgroup/kubepods/pod1/cpu.stat",
        "/sys/fs/cgroup/kubepods/cpu.stat",
        "/sys/fs/cgroup/cpu.stat",
    ]
    assert cpu_stat_paths(CONTAINER_CGROUP, CONTAINER_MOUNTS) == ["/sys/fs/cgroup/cpu.stat"]
    assert cpu_stat_paths(V1_COMBINED, V1_COMBINED_MOUNTS) == [
        "/sys/fs/cgroup/cpu,cpuacct/cpu.stat"
    ]
    assert cpu_stat_paths("", "") == []


def test_cgroup_readings_come_from_the_files_found(tmp_path: Path) -> None:
    inner, outer = tmp_path / "inner.stat", tmp_path / "outer.stat"
    inner.write_text(V2)
    outer.write_text(V1)
    reader = CgroupCpu([str(inner), str(outer), str(tmp_path / "gone.stat")])
    assert reader.read() == (Throttling(3, 1.5), Throttling(7, 2.5), None)


@linux
def test_this_machines_cgroup_is_found_and_read() -> None:
    reader = CgroupCpu.discover()
    assert reader.paths, "no cpu.stat found for this process"
    assert all(path.endswith("cpu.stat") and os.path.exists(path) for path in reader.paths)
    readings = reader.read()
    assert readings and all(isinstance(r, Throttling) for r in readings)


@linux
def test_the_process_clock_counts_every_thread_and_tasks_are_read_up_to_a_cap() -> None:
    from perfmw.loop.kernel import Tasks, process_cpu

    stop = threading.Event()
    idle = [threading.Thread(target=stop.wait) for _ in range(6)]
    for thread in idle:
        thread.start()
    busy = threading.Thread(target=burn_cpu, args=(0.15,))
    try:
        before, clock = Tasks.read(), process_cpu()
        busy.start()
        busy.join()
        # The kernel reaps a joined thread's task a moment after Python's join returns.
        deadline = time.monotonic() + 10
        while busy.native_id in Tasks.read() and time.monotonic() < deadline:
            time.sleep(0.001)
        after, spent = Tasks.read(), process_cpu() - clock
        assert len(Tasks.read(limit=3)) == 3  # a process with more threads is read in part
        assert threading.get_native_id() not in Tasks.read((threading.get_native_id(),))
    finally:
        stop.set()
        for thread in idle:
            thread.join()
    assert spent >= 0.15  # the dead thread's time included
    # Born and gone between the readings: not seen; the idle ones computed nothing.
    assert Tasks.busiest(before, after, 3, 0.01) == []
    assert len(after) >= 7


@linux
def test_the_threads_are_read_without_letting_the_gil_go() -> None:
    # A stalled loop thread waiting for the GIL must not run on while the watchdog reads: the
    # counting thread never counts during a read. Switches are forced only after 0.5 s, far
    # longer than any read, so that the count stays still only if no call lets the GIL go.
    from perfmw.loop.kernel import Tasks

    counted, stop = [0], threading.Event()

    def count() -> None:
        while not stop.is_set():
            counted[0] += 1

    switch_interval = sys.getswitchinterval()
    counter = threading.Thread(target=count)
    sys.setswitchinterval(0.5)
    try:
        counter.start()
        time.sleep(0.01)  # the counter takes the GIL; this thread gets it back by a forced switch
        before = counted[0]
        readings = [Tasks.read() for _ in range(20)]
        after = counted[0]
    finally:
        sys.setswitchinterval(switch_interval)
        stop.set()
        counter.join()
    assert Tasks.holds_gil()
    assert after == before
    assert counter.native_id in readings[0] and threading.get_native_id() in readings[0]
    cpu, queued = readings[-1][threading.get_native_id()]
    own = ThreadStat(threading.get_native_id()).now()
    assert own is not None and 0.0 < cpu <= own[0] and 0.0 <= queued <= own[1]
