"""prometheus-client's per-process files, with their disk space allocated before it is used.

In multiprocess mode every metric value of a worker lives in a memory-mapped file of the
directory (`counter_<pid>.db`, `histogram_<pid>.db`...), which prometheus-client grows with
`truncate`: that reserves nothing. On a filesystem with no space left, the first store into a
page the filesystem cannot allocate kills the process with SIGBUS ("Fatal Python error: Bus
error"), from whichever line wrote a metric: perfmw's flusher or the application's own
`Counter.inc()` in the middle of a request.

`install()` makes prometheus-client open its files as `ReservedFile`: space is allocated
(`os.posix_fallocate`) when a file is opened and before each new series is stored into it, so a
full disk is an `OSError` here, and it costs only the series that found no room: each is
counted in `perfmw_internal_errors_total{component="multiprocess"}` (a file that could not be
opened at all, once), and logged once. Their values
stay in the process (the application's metric objects hold them). The scrape does not see them.
Series that had their space go on counting as before. When the disk has room again, new series
are stored again.

A directory removed while the workers serve is `ScrapeError` for whoever reads it: the metrics
and findings endpoints answer 500 and log it at each scrape, the application answers as before.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, cast

from prometheus_client import mmap_dict, values
from prometheus_client.mmap_dict import _pack_two_doubles, _unpack_two_doubles

from .. import _guard

COMPONENT = "multiprocess"
#: Bytes a series takes in a file at most, beyond its key: prometheus-client's entry is the
#: key's length (4), the key padded to 8 bytes (up to 7 more, plus 1) and two doubles (16).
ENTRY_OVERHEAD = 28
#: Series remembered as lost, so that each costs one failed allocation; past this many, a lost
#: series tries (and is counted) again at each store.
MAX_LOST = 100_000
_INITIAL_SIZE: int = getattr(mmap_dict, "_INITIAL_MMAP_SIZE", 1 << 16)


class ReservedFile(mmap_dict.MmapedDict):
    """prometheus-client's `MmapedDict`, storing a series only where its space is allocated.

    A file that cannot be opened at all (its directory removed, no space for a first page) keeps
    every series in the process.
    """

    def __init__(self, filename: str, read_mode: bool = False) -> None:
        self._lost: set[str] = set()
        if read_mode:
            super().__init__(filename, read_mode)  # type: ignore[no-untyped-call]
            return
        size = 0
        try:
            with open(filename, "a+b") as handle:
                size = os.fstat(handle.fileno()).st_size
                os.posix_fallocate(handle.fileno(), 0, size or _INITIAL_SIZE)
            super().__init__(filename)  # type: ignore[no-untyped-call]
        except OSError as exc:
            if size == 0:  # not left empty, which the scrape could not read
                with contextlib.suppress(OSError):
                    os.unlink(filename)
            _report(exc, f"cannot open {filename}: {exc.strerror or exc}")
            if getattr(self, "_f", None) is not None:
                self._f.close()
            # Every series lost; close() has nothing to close.
            self._f = None  # type: ignore[assignment]
            self._fname = filename
            self._positions = {}

    def _init_value(self, key: str) -> None:
        if self._f is not None:
            try:
                entry = len(key.encode("utf-8")) + ENTRY_OVERHEAD
                os.posix_fallocate(self._f.fileno(), self._used, entry)
            except OSError as exc:
                _report(exc, f"no space for a new series in {self._fname}: {exc.strerror or exc}")
            else:
                super()._init_value(key)  # type: ignore[no-untyped-call]
                return
        if len(self._lost) < MAX_LOST:
            self._lost.add(key)

    def read_value(self, key: str) -> tuple[float, float]:
        position = self._position(key)
        return (0.0, 0.0) if position is None else _unpack_two_doubles(self._m, position)

    def write_value(self, key: str, value: float, timestamp: float) -> None:
        # The application's own `Counter.inc()` comes here: as short as the method it replaces.
        position = self._positions.get(key)
        if position is None:
            position = self._position(key)
            if position is None:
                return
        _pack_two_doubles(self._m, position, value, timestamp)  # type: ignore[no-untyped-call]

    def _position(self, key: str) -> int | None:
        """Where the series is stored, made room for the first time; None if it is lost."""
        position: int | None = self._positions.get(key)
        if position is None and key not in self._lost:
            self._init_value(key)
            position = self._positions.get(key)
        return position


class ScrapeError(Exception):
    """The workers' files cannot be read at all: the endpoint answers 500 and logs it."""


def readable_directory() -> str:
    """`PROMETHEUS_MULTIPROC_DIR`, if it is still a directory; ScrapeError if not."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")
    if not os.path.isdir(directory):
        raise ScrapeError(
            f"PROMETHEUS_MULTIPROC_DIR={directory!r} is gone: the workers' metrics cannot be "
            "read (recreate it and restart the workers)"
        )
    return directory


def _report(exc: OSError, message: str) -> None:
    _guard.report_internal_error(
        COMPONENT,
        exc,
        f"{message}; series that find no space are kept in this process only (the scrape "
        f'misses them), counted in perfmw_internal_errors_total{{component="{COMPONENT}"}}',
    )


def install() -> None:
    """Make prometheus-client open its files as `ReservedFile`, those already open included.

    A no-op where the OS has no `posix_fallocate` (macOS): files grow there as they always did.
    """
    if not hasattr(os, "posix_fallocate") or getattr(values, "MmapedDict", None) is ReservedFile:
        return
    setattr(values, "MmapedDict", ReservedFile)  # noqa: B010 (not exported by name)
    for file in _open_files():
        if type(file) is mmap_dict.MmapedDict:
            file.__class__ = ReservedFile
            cast(ReservedFile, file)._lost = set()


def _open_files() -> list[Any]:
    """The files prometheus-client has open: held by its value class's closure (none if that
    is not where this version keeps them)."""
    reset = getattr(values.ValueClass, "_MmapedValue__reset", None)
    code, cells = getattr(reset, "__code__", None), getattr(reset, "__closure__", None)
    if code is None or cells is None or "files" not in code.co_freevars:
        return []
    files = cells[code.co_freevars.index("files")].cell_contents
    return list(files.values()) if isinstance(files, dict) else []
