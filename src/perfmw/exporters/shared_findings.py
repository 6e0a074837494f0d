"""Findings of every worker of a multiprocess directory (`PROMETHEUS_MULTIPROC_DIR`).

Each worker writes its application's findings to a small file of its own beside
prometheus-client's, `perfmw_findings_<app>_<pid>.json`, off the request path: within a second
of a change (the multiprocess flusher's beat), before its findings endpoint answers, at lifespan
shutdown and at exit. Any worker's endpoint answers with every such file of the directory merged
as one process would merge them (`findings.merge`): counts and time summed, the latest example
kept, at most `max_findings` sites. A dead worker's file stays, as its counters do.

A file is replaced whole (written aside, then renamed), so a reader sees the old file or the new
one. A file that is no perfmw findings file (torn by a crash mid-write, too large, written by
something else) is skipped and logged once, never a failure of the endpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import _guard
from ..findings import merge
from .multiprocess_files import COMPONENT, readable_directory

if TYPE_CHECKING:
    from ..perf import Perf

FORMAT = 1
PREFIX = "perfmw_findings_"
#: A worker's file never grows past this: the least recently seen findings are left out first.
MAX_FILE_BYTES = 4 * 1024 * 1024

logger = logging.getLogger("perfmw")
_apps: weakref.WeakKeyDictionary[Perf, int] = weakref.WeakKeyDictionary()
_written: weakref.WeakKeyDictionary[Perf, tuple[int, int]] = weakref.WeakKeyDictionary()
_joined = 0  # Perfs joined so far in this process
_skipped: set[str] = set()  # files already logged as unreadable
_lock = threading.Lock()


def directory() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def join(perf: Perf) -> None:
    """A Perf of this process shares its findings with the other workers (multiprocess mode).

    Applications are told apart by the order they are instrumented in, which every worker of a
    service repeats: the first app of each worker shares one set of files, and so on.
    """
    global _joined
    with _lock:
        if perf not in _apps:
            _apps[perf] = _joined
            _joined += 1


def _path(folder: str, app: int, pid: int) -> str:
    return os.path.join(folder, f"{PREFIX}{app}_{pid}.json")


def write(perf: Perf, force: bool = False) -> None:
    """This worker's findings of `perf` to its file, if they changed since the last write."""
    folder, app = directory(), _apps.get(perf)
    if folder is None or app is None:
        return
    pid, version = os.getpid(), perf.findings.version
    with _lock:
        if not force and _written.get(perf) == (pid, version):
            return
        _written[perf] = (pid, version)
    findings = [f.to_dict() for f in perf.findings.snapshot()]
    findings.sort(key=lambda f: -float(f["last_seen"]))  # the most recently seen kept first
    body = _encode(pid, findings)
    while len(body) > MAX_FILE_BYTES and findings:
        del findings[len(findings) // 2 :]
        body = _encode(pid, findings)
    path = _path(folder, app, pid)
    aside = f"{path}.{threading.get_ident()}.tmp"
    try:
        with open(aside, "wb") as handle:
            handle.write(body)
        os.replace(aside, path)
    except OSError as exc:  # a full disk, the directory removed
        with contextlib.suppress(OSError):
            os.unlink(aside)
        _guard.report_internal_error(
            COMPONENT,
            exc,
            f"cannot write {path}: {exc.strerror or exc}; the workers' findings endpoints miss "
            "this worker's latest findings",
        )


def write_all() -> None:
    """Every joined Perf's findings (the multiprocess flusher, at exit)."""
    for perf in list(_apps):
        if not perf.closed:
            write(perf)


def _encode(pid: int, findings: list[dict[str, Any]]) -> bytes:
    document = {"perfmw_findings": FORMAT, "pid": pid, "findings": findings}
    return json.dumps(document, separators=(",", ":")).encode()


def read(perf: Perf) -> tuple[list[dict[str, Any]], list[int]] | None:
    """Every worker's findings of `perf`'s application, merged, and the workers' pids; None
    outside multiprocess mode; ScrapeError when the directory is gone."""
    folder, app = directory(), _apps.get(perf)
    if folder is None or app is None:
        return None
    write(perf)  # this worker's latest too
    prefix = f"{PREFIX}{app}_"
    per_worker: list[list[dict[str, Any]]] = []
    pids: list[int] = []
    names = sorted(
        n for n in os.listdir(readable_directory()) if n.startswith(prefix) and n.endswith(".json")
    )
    for name in names:
        found = _load(os.path.join(folder, name))
        if found is not None:
            pid, findings = found
            pids.append(pid)
            per_worker.append(findings)
    return merge(per_worker, perf.settings.max_findings), sorted(pids)


def _load(path: str) -> tuple[int, list[dict[str, Any]]] | None:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:  # gone meanwhile (a worker replacing it), or unreadable
        if not isinstance(exc, FileNotFoundError):
            _skip(path, str(exc))
        return None
    if len(raw) > MAX_FILE_BYTES:
        _skip(path, f"larger than {MAX_FILE_BYTES} bytes")
        return None
    try:
        document = json.loads(raw)
    except ValueError:
        _skip(path, "not JSON (a worker stopped while writing it?)")
        return None
    if not (
        isinstance(document, Mapping)
        and document.get("perfmw_findings") == FORMAT
        and isinstance(document.get("pid"), int)
        and isinstance(document.get("findings"), list)
        and all(_is_finding(f) for f in document["findings"])
    ):
        _skip(path, "not a perfmw findings file")
        return None
    return document["pid"], document["findings"]


def _is_finding(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("kind"), str)
        and isinstance(value.get("route"), str)
        and isinstance(value.get("count"), (int, float))
        and isinstance(value.get("total_seconds"), (int, float))
        and isinstance(value.get("detail"), Mapping)
    )


def _skip(path: str, why: str) -> None:
    if path not in _skipped and len(_skipped) < 1000:
        _skipped.add(path)
        logger.warning("perfmw: skipped the findings file %s: %s", path, why)
