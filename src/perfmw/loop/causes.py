"""Why the loop stalled: a pure function of what was measured of its thread during the stall.

Over a stall the loop thread was, by the kernel's and the interpreter's own counters:
- on a CPU (`cpu`, its schedstat run time), garbage collections included (`gc`);
- runnable but not run (`runqueue`, its schedstat run delay): the kernel ran other work, or the
  cgroup's CPU quota ran out (`throttled`, from `cpu.stat`);
- off the CPU: waiting for the GIL while another thread held it (`gil`, the watchdog's own wait
  for the GIL), or waiting for what the code called (sleep, I/O, a lock, a C call's threads).
Beside it the process's other threads computed `threads` seconds on its `cpus` CPUs, and were
runnable but not run for `threads_queued` seconds (None: they could not be read during the stall).

Who kept the loop thread from running decides whose stall it is:
- the process's own threads (`by_threads`): the GIL is only ever held by a thread of this
  process, so a GIL wait is theirs as far as they computed; and of its run-queue time, the
  share of the CPUs they used;
- the machine (`by_machine`): the rest of the run-queue time, other processes' or the quota's,
  and the rest of the GIL wait as far as the other threads were queued (the kernel had
  preempted the thread that held it). What is left of the GIL wait, the loop thread held the
  GIL itself, in C code that blocks without releasing it: its own doing.
  The GIL wait is the larger of the watchdog's and the loop thread's own: a thread waiting for
  the GIL goes back to sleep every switch interval (measured, idle or under two CPU hogs: 56 to
  58 times in 300 ms), one blocked in a call, holding the GIL or not, hardly ever (3 times), so
  each of its `waits` (voluntary context switches) stands for a switch interval of waiting,
  when the watchdog waited for the GIL too (`GIL_SEEN`: a C call waiting for its own worker
  threads, argon2's lanes, also goes to sleep again and again, and lets the GIL go).
  The loop thread's own wait beyond what the other threads computed was behind a thread that
  did not run: the kernel kept it off a CPU (the other threads are read only from the
  watchdog's first look on, if ever).

Taking the machine's part away leaves what the stall would have lasted on an idle machine.
When that would not have been a stall (under the threshold, by more than the duration's
precision), the stall is the machine's: `throttled` when the cgroup's quota did most of the
keeping off, else `starved`. Otherwise it is the code's, whatever the machine added to it:
`cpu` when the process's own threads did most of it (computing beside the loop is computing on
it: the advice is the same process pool), else by the loop thread's own part: `gc` when
collections computed most of it, `cpu` when the thread did (`saturation` when no single
callback did), else `blocking`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from ..record import CAUSES, CODE_CAUSES, MACHINE_CAUSES

__all__ = [
    "CAUSES",
    "CODE_CAUSES",
    "MACHINE_CAUSES",
    "PRECISION_SECONDS",
    "BusyThread",
    "Signals",
    "classify",
]
#: A stall's duration is known within half a heartbeat: an own part this close to the threshold
#: is not told apart from it.
PRECISION_SECONDS = 0.01
#: The share of the loop thread's time off the CPU the watchdog must have waited for the GIL
#: for the loop thread's own waits to count as GIL waits.
GIL_SEEN = 0.1


class BusyThread(NamedTuple):
    """One of the process's other threads that computed during a stall (evidence only)."""

    name: str  # the Python thread's name, else the kernel's (`comm`) for a C thread
    cpu_seconds: float
    stack: tuple[str, ...] = ()  # a Python thread's stack as the stall ended


@dataclass(frozen=True, slots=True)
class Signals:
    """What was measured of the loop thread during one stall, in seconds."""

    duration: float  # the loop did not answer for this long
    cpu: float = 0.0  # the loop thread ran on a CPU
    runqueue: float = 0.0  # it was runnable, but not run
    throttled: float = 0.0  # of the run-queue time, the cgroup's quota was out
    gil: float = 0.0  # the watchdog, ready to run, waited this long for the GIL
    gc: float = 0.0  # garbage collections computed (on a CPU)
    samples: int = 0  # stack samples the watchdog took
    dominant_share: float = 1.0  # share of the samples in the most frequent loop callback
    threads: float = 0.0  # the process's other threads computed (CPU seconds, all CPUs)
    cpus: float = 1.0  # CPUs the process may run on
    busy: tuple[BusyThread, ...] = ()  # the busiest of those threads, named
    threads_queued: float | None = 0.0  # those threads were runnable but not run (summed)
    waits: int = 0  # times the loop thread went to sleep (its voluntary context switches)
    switch_interval: float = 0.005  # sys.getswitchinterval(): how often a GIL waiter wakes

    @property
    def threads_share(self) -> float:
        """Of the CPUs the process may use over the stall, the share its other threads used."""
        if self.duration <= 0.0 or self.cpus <= 0.0:
            return 0.0
        return min(1.0, self.threads / (self.cpus * self.duration))

    def _parts(self) -> tuple[float, float]:
        duration = self.duration
        runqueue = min(self.runqueue, duration)
        throttled = min(self.throttled, runqueue)
        off_cpu = max(0.0, duration - self.cpu - runqueue)
        queued = runqueue - throttled  # behind other runnable threads, this process's or not
        share = self.threads_share
        # Waiting for the GIL, the loop thread wakes every switch interval to ask for it again;
        # its waits count so when the watchdog waited for the GIL too (else it was waiting for
        # something else again and again: a C call's worker threads, as argon2's lanes).
        gil = min(self.gil, off_cpu)
        waited = 0.0
        if gil >= GIL_SEEN * off_cpu:
            waited = min(off_cpu, self.waits * self.switch_interval)
            gil = max(gil, waited)
        gil_by_threads = min(gil, self.threads)
        left = gil - gil_by_threads
        # Held by a thread that neither computed nor ran: one the kernel kept off a CPU, as far
        # as the other threads were queued (read from the watchdog's first look on only) or the
        # loop thread itself waited.
        preempted = min(left, max(self.threads_queued or 0.0, waited - gil_by_threads))
        by_threads = gil_by_threads + queued * share
        by_machine = throttled + queued * (1.0 - share) + preempted
        return min(duration, by_threads), min(duration, by_machine)

    @property
    def by_threads(self) -> float:
        """Time the process's other threads kept the loop thread off: GIL, CPUs it queued for."""
        return self._parts()[0]

    @property
    def by_machine(self) -> float:
        """Time other processes or the cgroup's quota kept the loop thread off a CPU."""
        return self._parts()[1]

    @property
    def kept_off(self) -> float:
        """Time the loop thread could have run but was not let, by anyone."""
        return min(self.duration, sum(self._parts()))

    @property
    def own(self) -> float:
        """The loop thread's own part: what it would have lasted had nothing kept it off."""
        return self.duration - self.kept_off

    def evidence(self) -> dict[str, Any]:
        """The measurements, named for a finding's detail (`runqueue_seconds`, ...)."""
        seconds = {
            "cpu": self.cpu,
            "runqueue": self.runqueue,
            "throttled": self.throttled,
            "gil": self.gil,
            "gc": self.gc,
            "threads": self.threads,
        }
        found: dict[str, Any] = {f"{name}_seconds": round(v, 6) for name, v in seconds.items()}
        queued = self.threads_queued
        found["threads_queued_seconds"] = None if queued is None else round(queued, 6)
        found["waits"] = self.waits
        found["cpus"] = self.cpus
        found["threads"] = [
            {"name": t.name, "cpu_seconds": round(t.cpu_seconds, 6), "stack": list(t.stack)}
            for t in self.busy
        ]
        return found


def classify(signals: Signals, threshold: float) -> str:
    """The stall's cause, one of CAUSES."""
    duration = signals.duration
    if duration <= 0.0:
        return "blocking"
    by_threads, by_machine = signals._parts()
    code = duration - by_machine  # the stall on an idle machine: the process's own doing
    if code + PRECISION_SECONDS < threshold:
        throttled = min(signals.throttled, signals.runqueue)
        return "throttled" if by_machine > 0 and throttled >= 0.5 * by_machine else "starved"
    if by_threads >= 0.5 * code:
        return "cpu"
    own = code - by_threads
    if signals.gc >= 0.5 * own:
        return "gc"
    if signals.cpu >= 0.5 * own:
        if signals.samples >= 2 and signals.dominant_share < 0.5:
            return "saturation"
        return "cpu"
    return "blocking"
