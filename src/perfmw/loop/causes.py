"""Why the loop stalled: a pure function of what was measured of its thread during the stall.

Over a stall the loop thread was, by the kernel's and the interpreter's own counters:
- on a CPU (`cpu`, its schedstat run time), garbage collections included (`gc`);
- runnable but not run (`runqueue`, its schedstat run delay): the kernel ran other work, or the
  cgroup's CPU quota ran out (`throttled`, from `cpu.stat`);
- off the CPU: waiting for the GIL while another thread held it (`gil`, the watchdog's own wait
  for the GIL), or waiting for what the code called (sleep, I/O, a lock, a C call's threads).

The time the thread was kept from running (run queue, GIL held elsewhere) is not the code's. What
is left is the stall's own part: what it would have lasted on an idle machine. When that alone
would not have been a stall (under the threshold, by more than the duration's precision), the
stall is the machine's: `throttled` when the cgroup's quota did most of the keeping off, else
`starved`. Otherwise it is the code's, whatever the machine added to it: `gc` when collections
computed most of its own part, `cpu` when the thread did (`saturation` when no single callback
did), else `blocking`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..record import CAUSES, CODE_CAUSES, MACHINE_CAUSES

__all__ = ["CAUSES", "CODE_CAUSES", "MACHINE_CAUSES", "PRECISION_SECONDS", "Signals", "classify"]
#: A stall's duration is known within half a heartbeat: an own part this close to the threshold
#: is not told apart from it.
PRECISION_SECONDS = 0.01


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

    @property
    def kept_off(self) -> float:
        """Time the loop thread could have run but was not let: run queue, GIL held elsewhere."""
        off_cpu = max(0.0, self.duration - self.cpu - self.runqueue)
        return min(self.duration, self.runqueue + min(self.gil, off_cpu))

    @property
    def own(self) -> float:
        """The stall's own part: what it would have lasted had nothing kept the thread off."""
        return self.duration - self.kept_off

    def evidence(self) -> dict[str, float]:
        """The measurements, named for a finding's detail (`runqueue_seconds`, ...)."""
        found = asdict(self)
        del found["duration"], found["samples"], found["dominant_share"]
        return {f"{name}_seconds": round(value, 6) for name, value in found.items()}


def classify(signals: Signals, threshold: float) -> str:
    """The stall's cause, one of CAUSES."""
    duration = signals.duration
    if duration <= 0.0:
        return "blocking"
    kept_off = signals.kept_off
    own = duration - kept_off
    if own + PRECISION_SECONDS < threshold:
        return "throttled" if kept_off > 0 and signals.throttled >= 0.5 * kept_off else "starved"
    if signals.gc >= 0.5 * own:
        return "gc"
    if signals.cpu >= 0.5 * own:
        if signals.samples >= 2 and signals.dominant_share < 0.5:
            return "saturation"
        return "cpu"
    return "blocking"
