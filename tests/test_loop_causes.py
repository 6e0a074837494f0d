"""The stall cause as a pure function of what was measured of the loop thread (synthetic)."""

from __future__ import annotations

import pytest

from perfmw.loop.causes import (
    CAUSES,
    CODE_CAUSES,
    MACHINE_CAUSES,
    BusyThread,
    Signals,
    classify,
)

T = 0.1  # the stall threshold


@pytest.mark.parametrize(
    ("signals", "cause"),
    [
        # Off the CPU, by its own doing: time.sleep, a socket, a lock, a C call's threads.
        (Signals(0.3, cpu=0.002, runqueue=0.001), "blocking"),
        # On the CPU in one callback.
        (Signals(0.3, cpu=0.29, samples=30, dominant_share=1.0), "cpu"),
        # On the CPU in many callbacks, none of them most of the time.
        (Signals(0.3, cpu=0.29, samples=30, dominant_share=0.1), "saturation"),
        # A single sample cannot tell callbacks apart: one culprit.
        (Signals(0.3, cpu=0.29, samples=1, dominant_share=1.0), "cpu"),
        # Collections computed most of it.
        (Signals(0.3, cpu=0.29, gc=0.25), "gc"),
        # Runnable but not run: the machine's, even with a collection inside.
        (Signals(0.15, cpu=0.02, runqueue=0.13, gc=0.02), "starved"),
        (Signals(0.144, cpu=0.06, runqueue=0.08, gc=0.06), "starved"),
        # Kept off by the cgroup's quota for most of the time it was kept off.
        (Signals(0.5, cpu=0.02, runqueue=0.45, throttled=0.4), "throttled"),
        (Signals(0.5, cpu=0.02, runqueue=0.45, throttled=0.1), "starved"),
        # Another thread of the process held the GIL (computing) while the loop thread waited
        # off the CPU: the code's, the process's own threads computed.
        (Signals(0.6, cpu=0.001, runqueue=0.0, gil=0.59, threads=0.59), "cpu"),
        # Nobody else computed: the loop thread held the GIL itself, in C code that blocks.
        (Signals(0.6, cpu=0.001, runqueue=0.0, gil=0.59), "blocking"),
        # The watchdog's GIL waits while the loop thread itself computes do not make it starved.
        (Signals(0.3, cpu=0.29, gil=0.1), "cpu"),
    ],
)
def test_each_cause_from_its_signals(signals: Signals, cause: str) -> None:
    assert classify(signals, T) == cause


def test_a_stall_is_the_machines_only_when_its_own_part_would_not_have_been_one() -> None:
    # 300 ms of the loop thread's own computing stretched to 900 ms by the kernel: still the
    # code's, a 300 ms stall on an idle machine.
    assert classify(Signals(0.9, cpu=0.3, runqueue=0.6), T) == "cpu"
    # The same stall with 85 ms of its own: under the threshold alone, so the machine's.
    assert classify(Signals(0.9, cpu=0.085, runqueue=0.815), T) == "starved"
    # Within the duration's precision (half a heartbeat) of the threshold: the code's.
    assert classify(Signals(0.104, cpu=0.1, runqueue=0.012), T) == "cpu"
    assert classify(Signals(0.104, cpu=0.09, runqueue=0.015), T) == "starved"


def test_kept_off_counts_the_gil_only_while_the_thread_was_off_the_cpu() -> None:
    signals = Signals(0.5, cpu=0.2, runqueue=0.1, gil=0.4, threads=0.5, cpus=4)
    # GIL capped by the off-CPU 0.2 s; the others' quarter of the 4 CPUs, of the run queue.
    assert signals.by_threads == pytest.approx(0.2 + 0.1 * 0.25)
    assert signals.by_machine == pytest.approx(0.1 * 0.75)
    assert signals.kept_off == pytest.approx(0.1 + 0.2)
    assert signals.own == pytest.approx(0.2)
    # The GIL is held elsewhere no longer than the other threads computed.
    assert Signals(0.5, cpu=0.2, runqueue=0.1, gil=0.4, threads=0.05).kept_off == pytest.approx(
        0.1 + 0.05
    )
    assert Signals(0.2, runqueue=0.5).kept_off == 0.2  # never more than the stall


def test_a_gil_wait_is_the_threads_computing_then_their_preemption_then_the_loops_own() -> None:
    signals = Signals(0.5, cpu=0.05, gil=0.4, threads=0.1, threads_queued=0.2)
    assert signals.by_threads == pytest.approx(0.1)
    assert signals.by_machine == pytest.approx(0.2)
    assert signals.own == pytest.approx(0.2)  # 100 ms of the GIL wait, and its own 50 ms CPU
    # Queued longer than the GIL wait left: the machine's part stops at the wait.
    assert Signals(0.5, gil=0.4, threads=0.1, threads_queued=0.9).by_machine == pytest.approx(0.3)


def test_evidence_names_every_measurement_in_seconds() -> None:
    signals = Signals(0.3, cpu=0.1, runqueue=0.05, throttled=0.01, gil=0.02, gc=0.03)
    assert signals.evidence() == {
        "cpu_seconds": 0.1,
        "runqueue_seconds": 0.05,
        "throttled_seconds": 0.01,
        "gil_seconds": 0.02,
        "gc_seconds": 0.03,
        "threads_seconds": 0.0,
        "threads_queued_seconds": 0.0,
        "waits": 0,
        "cpus": 1.0,
        "threads": [],
    }
    busy = Signals(0.3, threads=0.25, cpus=2, busy=(BusyThread("hasher", 0.2, ("a.py:3 in h",)),))
    assert busy.evidence()["threads"] == [
        {"name": "hasher", "cpu_seconds": 0.2, "stack": ["a.py:3 in h"]}
    ]
    assert (busy.evidence()["threads_seconds"], busy.evidence()["cpus"]) == (0.25, 2)


def test_every_cause_is_the_codes_or_the_machines() -> None:
    assert set(CODE_CAUSES) | set(MACHINE_CAUSES) == set(CAUSES)
    assert not set(CODE_CAUSES) & set(MACHINE_CAUSES)
    assert set(MACHINE_CAUSES) == {"starved", "throttled"}


# --- Starvation split by who took the CPU: the process's own threads, or the machine ---


@pytest.mark.parametrize(
    ("signals", "cause"),
    [
        # Queued 150 ms of 180 while the process's other threads used both CPUs: the code's.
        (Signals(0.18, cpu=0.02, runqueue=0.15, threads=0.36, cpus=2), "cpu"),
        # The same wait while they computed nothing: other processes took the CPUs.
        (Signals(0.18, cpu=0.02, runqueue=0.15, threads=0.0, cpus=2), "starved"),
        # The same wait, the cgroup's quota out for most of it: throttled, whoever used it.
        (Signals(0.18, cpu=0.02, runqueue=0.15, throttled=0.12, threads=0.36, cpus=2), "throttled"),
        # A Python thread held the GIL 280 ms while computing 250 ms of it (queued the rest).
        (Signals(0.3, cpu=0.001, runqueue=0.01, gil=0.28, threads=0.25, cpus=2), "cpu"),
        # The threads computed 10 ms only: the loop thread held the GIL itself, off the CPU.
        (Signals(0.3, cpu=0.001, runqueue=0.01, gil=0.28, threads=0.01, cpus=2), "blocking"),
        # They computed 10 ms and were queued 270 ms: the kernel had preempted the thread that
        # held the GIL, the machine's doing.
        (
            Signals(0.3, cpu=0.001, runqueue=0.01, gil=0.28, threads=0.01, threads_queued=0.27),
            "starved",
        ),
        # Queued 100 ms only: the other 170 ms of the GIL wait the loop thread held it itself.
        (
            Signals(0.3, cpu=0.001, runqueue=0.01, gil=0.28, threads=0.01, threads_queued=0.1),
            "blocking",
        ),
    ],
)
def test_the_loop_kept_off_is_the_codes_when_its_own_threads_took_the_cpu(
    signals: Signals, cause: str
) -> None:
    assert classify(signals, T) == cause


def test_a_shared_run_queue_is_split_at_the_threshold() -> None:
    # 200 ms stall, 150 ms queued; the rest (50 ms) is the loop thread's own. The others used
    # `threads` of 2 CPUs: the machine's part is the rest of the 150 ms.
    def at(threads: float) -> str:
        return classify(Signals(0.2, cpu=0.05, runqueue=0.15, threads=threads, cpus=2), T)

    # Machine's part 150 * (1 - share); the code's 200 - that must reach 90 ms (100 - 10).
    # share 0.2 (threads 0.08): machine 120, code 80: starved.
    assert at(0.08) == "starved"
    # share 0.27 (threads 0.108): machine 109.5, code 90.5: the code's; of it 40.5 ms by the
    # threads, under half: the loop thread's own 50 ms decide (on the CPU: cpu).
    assert at(0.108) == "cpu"
    # share 0.7: machine 45, code 155, 105 by the threads: the threads' (cpu).
    assert at(0.28) == "cpu"
    # Without its own CPU, the loop thread's own part is blocking until the threads dominate.
    assert classify(Signals(0.2, runqueue=0.15, threads=0.108, cpus=2), T) == "blocking"
    assert classify(Signals(0.2, runqueue=0.15, threads=0.4, cpus=2), T) == "cpu"


def test_throttling_and_other_processes_split_at_half_of_the_machines_part() -> None:
    # Queued 150 ms, the other threads used a third of the one CPU: of the run queue, the quota
    # took `throttled` and other processes two thirds of the rest.
    def signals(throttled: float) -> Signals:
        return Signals(0.18, cpu=0.02, runqueue=0.15, throttled=throttled, threads=0.06, cpus=1)

    assert signals(0.05).by_machine == pytest.approx(0.05 + 0.10 * 2 / 3)
    assert classify(signals(0.05), T) == "starved"  # 50 of 117 ms: under half
    assert classify(signals(0.07), T) == "throttled"  # 70 of 123 ms: over half


def test_unread_threads_leave_the_loop_threads_wakes_to_tell_who_held_the_gil() -> None:
    # The watchdog never got the GIL: the other threads' run queue is unknown. A loop thread
    # that woke every switch interval was waiting for the GIL, held by a thread that did not
    # compute: one the kernel kept off a CPU.
    waited = Signals(0.3, cpu=0.001, gil=0.29, threads=0.002, threads_queued=None, waits=58)
    assert classify(waited, 0.1) == "starved"
    assert waited.by_machine == pytest.approx(0.288)
    assert waited.evidence()["threads_queued_seconds"] is None
    # Woken a few times only: it held the GIL itself, blocked in C code.
    held = Signals(0.3, cpu=0.001, gil=0.29, threads=0.002, threads_queued=None, waits=6)
    assert classify(held, 0.1) == "blocking"
    assert held.by_machine == pytest.approx(6 * 0.005 - 0.002)  # its 6 wakes, at most
    # Read from the watchdog's first look on only, the others' queue is a part: the wakes win.
    read = Signals(0.3, cpu=0.001, gil=0.29, threads=0.002, threads_queued=0.02, waits=58)
    assert classify(read, 0.1) == "starved"


def test_the_loop_threads_own_wakes_count_as_gil_waits_the_watchdog_missed() -> None:
    # Measured under four CPU hogs: the watchdog, itself queued, saw a third of it; the loop
    # thread woke 31 times in its 155 ms off the CPU. The thread it waited for (the watchdog,
    # preempted) was queued 111 ms: the machine's, not a blocking call of the code's.
    signals = Signals(
        0.2289,
        cpu=0.0007,
        runqueue=0.0734,
        gil=0.069,
        threads=0.0082,
        threads_queued=0.1112,
        waits=31,
    )
    assert classify(signals, 0.1) == "starved"
    # Asleep in a call for 290 ms (time.sleep), woken 4 times: blocking.
    asleep = Signals(0.2962, cpu=0.0011, runqueue=0.0042, threads=0.0011, waits=4)
    assert classify(asleep, 0.1) == "blocking"
    # The watchdog had the GIL: its waits were not for it. Its own part: all but its run queue.
    assert asleep.own == pytest.approx(0.2962 - 0.0042, abs=2e-3)
    # Waiting 60 times for argon2's lanes, which computed 0.5 s, with the GIL let go: blocking.
    lanes = Signals(0.3, cpu=0.01, gil=0.002, threads=0.5, cpus=2, waits=60)
    assert classify(lanes, 0.1) == "blocking"
