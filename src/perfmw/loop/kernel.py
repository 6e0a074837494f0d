"""What the kernel says about a thread and the process's cgroup (Linux), and the watchdog's timer.

- `ThreadStat`: a thread's time on a CPU and its time runnable but not run (run-queue delay),
  from `/proc/self/task/<tid>/schedstat`, read through one open file. Elsewhere (or without
  schedstat) the thread's CPU clock alone, with the run-queue delay unknown (0).
- `CgroupCpu`: CPU throttling of the process's cgroup and its ancestors (`cpu.stat`:
  `nr_throttled` with `throttled_usec` on cgroup v2, `throttled_time` in nanoseconds on v1).
- `process_cpu()`: the CPU time of all the process's threads (one clock read, under 1 µs), and
  `Tasks`: the process's threads by their CPU time (`/proc/self/task`), read only while a stall
  is followed, to name the threads that computed beside the loop.
- `KernelTimer`: a timerfd the watchdog sleeps on without the GIL.

Readings are cheap to take and parsed only when a stall is being settled.
"""

from __future__ import annotations

import os
import sys

try:
    import resource

    _RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)
except ImportError:  # not POSIX
    _RUSAGE_THREAD = None
import time
from typing import Any, NamedTuple

# --- One thread's CPU and run-queue time ---


class ThreadStat:
    """A thread's scheduler counters; `raw()` snapshots them, `times()` parses a snapshot."""

    __slots__ = ("clock", "fd")

    def __init__(self, native_id: int, thread_ident: int | None = None) -> None:
        self.fd: int | None = None
        self.clock: int | None = None
        try:
            self.fd = os.open(f"/proc/self/task/{native_id}/schedstat", os.O_RDONLY)
            if not os.pread(self.fd, 64, 0).split()[0].isdigit():
                raise OSError("schedstat unreadable")
        except (OSError, IndexError):
            self.close()
            if thread_ident is not None and hasattr(time, "pthread_getcpuclockid"):
                self.clock = time.pthread_getcpuclockid(thread_ident)

    def raw(self) -> bytes | float:
        """The counters now, unparsed (one pread; a CPU clock read where schedstat is missing)."""
        fd = self.fd
        if fd is not None:
            try:
                return os.pread(fd, 64, 0)
            except OSError:
                return b""
        if self.clock is not None:
            return time.clock_gettime(self.clock)
        return b""

    @staticmethod
    def times(raw: bytes | float) -> tuple[float, float] | None:
        """(seconds on a CPU, seconds runnable but not run) of a snapshot; None if unreadable."""
        if isinstance(raw, float):
            return raw, 0.0
        return parse_schedstat(raw)

    def now(self) -> tuple[float, float] | None:
        return self.times(self.raw())

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def parse_schedstat(text: bytes) -> tuple[float, float] | None:
    """`/proc/<pid>/task/<tid>/schedstat`: "<ns on cpu> <ns waiting on a run queue> <slices>"."""
    fields = text.split()
    if len(fields) < 2 or not (fields[0].isdigit() and fields[1].isdigit()):
        return None
    return int(fields[0]) / 1e9, int(fields[1]) / 1e9


def delta(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> tuple[float, float]:
    """(CPU, run-queue) seconds between two readings; zeros when either is missing."""
    if before is None or after is None:
        return 0.0, 0.0
    return max(0.0, after[0] - before[0]), max(0.0, after[1] - before[1])


# --- The process's other threads ---

#: Threads read from /proc/self/task while a stall is followed: a process with more is read
#: for the first ones only (the process's CPU clock still counts them all).
MAX_TASKS = 256


def voluntary_switches() -> int:
    """Times the calling thread went to sleep (getrusage, under 1 µs); 0 where unknown."""
    if _RUSAGE_THREAD is None:
        return 0
    return resource.getrusage(_RUSAGE_THREAD).ru_nvcsw


def process_cpu() -> float:
    """Seconds on a CPU of all the process's threads, the dead ones included."""
    return time.clock_gettime(time.CLOCK_PROCESS_CPUTIME_ID)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity where the platform tells it)."""
    if hasattr(os, "sched_getaffinity"):
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except OSError:
            pass
    return max(1, os.cpu_count() or 1)


class _HeldReader:
    """open/pread/close and getdents64 called through `ctypes.PyDLL`, which keeps the GIL held.

    Python's own file calls let the GIL go at each system call, and a loop thread that computes
    takes a switch interval (5 ms) to give it back each time: a read of a few dozen threads'
    files through `os` took 60-500 ms of a computing loop, that through this under 1 ms.
    """

    __slots__ = ("_buffer", "_close", "_entries", "_getdents", "_open", "_pread")

    def __init__(self) -> None:
        import ctypes

        libc = ctypes.PyDLL(None, use_errno=True)
        self._open = libc.open
        self._open.argtypes = (ctypes.c_char_p, ctypes.c_int)
        self._open.restype = ctypes.c_int
        self._pread = libc.pread
        self._pread.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_long)
        self._pread.restype = ctypes.c_ssize_t
        self._close = libc.close
        self._close.argtypes = (ctypes.c_int,)
        self._close.restype = ctypes.c_int
        self._getdents = libc.getdents64  # glibc 2.30+; AttributeError elsewhere
        self._getdents.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t)
        self._getdents.restype = ctypes.c_ssize_t
        self._buffer = ctypes.create_string_buffer(64)
        self._entries = ctypes.create_string_buffer(32768)

    def names(self, directory: bytes) -> list[bytes]:
        """The entries of a directory (linux_dirent64 records: name at 19, length at 16)."""
        fd = self._open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        if fd < 0:
            raise OSError("cannot open " + os.fsdecode(directory))
        found: list[bytes] = []
        try:
            while (n := self._getdents(fd, self._entries, len(self._entries))) > 0:
                raw = self._entries.raw
                pos = 0
                while pos < n:
                    length = int.from_bytes(raw[pos + 16 : pos + 18], sys.byteorder)
                    found.append(raw[pos + 19 : pos + length].split(b"\0", 1)[0])
                    pos += length
        finally:
            self._close(fd)
        return found

    def read(self, path: bytes) -> bytes | None:
        """The first 64 bytes of a file; None if it cannot be opened (a thread that ended)."""
        fd = self._open(path, os.O_RDONLY | os.O_CLOEXEC)
        if fd < 0:
            return None
        n = self._pread(fd, self._buffer, 64, 0)
        self._close(fd)
        return self._buffer.raw[:n] if n > 0 else None


_held: _HeldReader | None = None
_held_known = False


def _held_reader() -> _HeldReader | None:
    global _held, _held_known
    if not _held_known:
        _held_known = True
        if sys.platform.startswith("linux"):
            try:
                _held = _HeldReader()
            except (OSError, AttributeError, ImportError):
                _held = None
    return _held


class Tasks:
    """The process's threads' CPU and run-queue seconds by native id, from /proc/self/task."""

    __slots__ = ()

    @staticmethod
    def read(
        exclude: tuple[int, ...] = (), limit: int = MAX_TASKS
    ) -> dict[int, tuple[float, float]]:
        """{native id: (seconds on a CPU, seconds runnable but not run)} of at most `limit`
        threads; {} where there is none.

        Read without letting the GIL go where the C library allows (`_HeldReader`), so that a
        stalled loop does not run on meanwhile; else through `os`.
        """
        held = _held_reader()
        try:
            names = held.names(b"/proc/self/task") if held else os.listdir(b"/proc/self/task")
        except OSError:
            return {}
        found: dict[int, tuple[float, float]] = {}
        for name in names:
            if len(found) >= limit:
                break
            if not name.isdigit() or int(name) in exclude:
                continue
            path = b"/proc/self/task/" + name + b"/schedstat"
            if held is not None:
                text = held.read(path)
            else:
                try:
                    with open(path, "rb") as f:
                        text = f.read(64)
                except OSError:  # the thread ended meanwhile
                    text = None
            times = parse_schedstat(text) if text else None
            if times is not None:
                found[int(name)] = times
        return found

    @staticmethod
    def holds_gil() -> bool:
        """Whether `read` keeps the GIL held throughout (see `_HeldReader`)."""
        return _held_reader() is not None

    @staticmethod
    def busiest(
        before: dict[int, tuple[float, float]],
        after: dict[int, tuple[float, float]],
        n: int,
        at_least: float,
    ) -> list[tuple[int, float]]:
        """The `n` threads that computed most between two readings (at least `at_least` s).

        A thread born in between counts all its time; one that ended in between is not seen.
        """
        spent = [(tid, Tasks.spent(before, after, tid)[0]) for tid in after]
        spent = [item for item in spent if item[1] >= at_least]
        spent.sort(key=lambda item: item[1], reverse=True)
        return spent[:n]

    @staticmethod
    def spent(
        before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]], tid: int
    ) -> tuple[float, float]:
        """(CPU, run-queue) seconds of thread `tid` between two readings (all, if born since)."""
        return delta(before.get(tid, (0.0, 0.0)), after[tid])

    @staticmethod
    def comm(native_id: int) -> str:
        """The kernel's name of a thread (`comm`), or its id."""
        try:
            with open(f"/proc/self/task/{native_id}/comm", encoding="utf-8") as f:
                return f.read().strip() or str(native_id)
        except OSError:
            return str(native_id)


# --- The cgroup's CPU quota ---


class Throttling(NamedTuple):
    periods: int  # nr_throttled: enforcement periods in which the quota ran out
    seconds: float  # time the cgroup's run queues spent throttled (summed over CPUs)


def parse_cpu_stat(text: str) -> Throttling | None:
    """A cgroup's `cpu.stat` (v2: throttled_usec; v1: throttled_time in ns); None without them."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[name] = int(value)
    if "nr_throttled" not in values:
        return None
    if "throttled_usec" in values:
        return Throttling(values["nr_throttled"], values["throttled_usec"] / 1e6)
    if "throttled_time" in values:
        return Throttling(values["nr_throttled"], values["throttled_time"] / 1e9)
    return None


def cpu_stat_paths(proc_cgroup: str, mountinfo: str) -> list[str]:
    """The `cpu.stat` files of this process's CPU cgroup and its ancestors, innermost first.

    `proc_cgroup` is /proc/self/cgroup, `mountinfo` /proc/self/mountinfo. On cgroup v1 the
    hierarchy that has the `cpu` controller; on v2 the unified one.
    """
    v1: str | None = None
    v2: str | None = None
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    mounts: list[tuple[str, str, str, str]] = []  # (fstype, mount root, mount point, options)
    for line in mountinfo.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        after = line.split(" - ", 1)[1].split()
        if len(after) >= 3 and after[0] in ("cgroup", "cgroup2"):
            mounts.append((after[0], fields[3], fields[4], after[2]))
    found: list[str] = []
    for fstype, root, point, options in mounts:
        if fstype == "cgroup" and v1 is not None and "cpu" in options.split(","):
            found = _ancestors(point, root, v1)
            break
    if not found and v2 is not None:
        for fstype, root, point, _options in mounts:
            if fstype == "cgroup2":
                found = _ancestors(point, root, v2)
                break
    return found


def _ancestors(mount_point: str, mount_root: str, path: str) -> list[str]:
    if mount_root != "/" and path.startswith(mount_root):
        path = path[len(mount_root) :]
    parts = [p for p in path.split("/") if p and p != ".."]
    return [
        os.path.join(mount_point, *parts[:depth], "cpu.stat") for depth in range(len(parts), -1, -1)
    ]


class CgroupCpu:
    """Throttling of the process's cgroup chain, read only when a stall is settled."""

    __slots__ = ("paths",)

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths

    @classmethod
    def discover(cls) -> CgroupCpu:
        try:
            with open("/proc/self/cgroup", encoding="utf-8") as f:
                proc_cgroup = f.read()
            with open("/proc/self/mountinfo", encoding="utf-8") as f:
                mountinfo = f.read()
        except OSError:
            return cls([])
        return cls([p for p in cpu_stat_paths(proc_cgroup, mountinfo) if os.path.exists(p)])

    def read(self) -> tuple[Throttling | None, ...]:
        found: list[Throttling | None] = []
        for path in self.paths:
            try:
                with open(path, encoding="utf-8") as f:
                    found.append(parse_cpu_stat(f.read()))
            except OSError:
                found.append(None)
        return tuple(found)

    @staticmethod
    def throttled(
        before: tuple[Throttling | None, ...], after: tuple[Throttling | None, ...]
    ) -> float:
        """Seconds throttled between two readings, by the cgroup in the chain that was most."""
        worst = 0.0
        for old, new in zip(before, after, strict=False):
            if old is not None and new is not None and new.periods > old.periods:
                worst = max(worst, new.seconds - old.seconds)
        return worst


# --- A kernel timer the heartbeat re-arms: the watchdog sleeps in read() without the GIL ---


class KernelTimer:
    """A Linux timerfd: `wait()` blocks (GIL released) until the armed time passes.

    The heartbeat re-arms it at every beat, so while the loop is healthy it never expires and the
    watchdog thread never wakes: it takes the GIL only when a stall begins. (A timed lock wait
    instead wakes ten times a second, and each wake-up waits for the GIL behind a busy loop.)
    """

    __slots__ = ("_beat_address", "_beat_spec", "_settime", "_spec", "fd")

    @classmethod
    def create(cls, beat_seconds: float) -> KernelTimer | None:
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
