"""The stall cause as a pure function of what was measured of the loop thread (synthetic)."""

from __future__ import annotations

import pytest

from perfmw.loop.causes import CAUSES, CODE_CAUSES, MACHINE_CAUSES, Signals, classify

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
        # Another thread held the GIL while the loop thread waited off the CPU.
        (Signals(0.6, cpu=0.001, runqueue=0.0, gil=0.59), "starved"),
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
    signals = Signals(0.5, cpu=0.2, runqueue=0.1, gil=0.4)
    assert signals.kept_off == pytest.approx(0.1 + 0.2)  # GIL capped by the off-CPU 0.2 s
    assert signals.own == pytest.approx(0.2)
    assert Signals(0.2, runqueue=0.5).kept_off == 0.2  # never more than the stall


def test_evidence_names_every_measurement_in_seconds() -> None:
    signals = Signals(0.3, cpu=0.1, runqueue=0.05, throttled=0.01, gil=0.02, gc=0.03)
    assert signals.evidence() == {
        "cpu_seconds": 0.1,
        "runqueue_seconds": 0.05,
        "throttled_seconds": 0.01,
        "gil_seconds": 0.02,
        "gc_seconds": 0.03,
    }


def test_every_cause_is_the_codes_or_the_machines() -> None:
    assert set(CODE_CAUSES) | set(MACHINE_CAUSES) == set(CAUSES)
    assert not set(CODE_CAUSES) & set(MACHINE_CAUSES)
    assert set(MACHINE_CAUSES) == {"starved", "throttled"}
