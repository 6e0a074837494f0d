"""Known blocking calls, patched (with wrapt) to raise when made on a running event loop's thread.

Used by `perfmw.testing.forbid_blocking()`; the patches exist only while one is active.
A call is on the loop's thread when that thread is running an event loop right now, so work
handed to a thread (run_in_executor, run_in_threadpool, a `def` endpoint) is allowed.
"""

from __future__ import annotations

import asyncio
import builtins
import importlib
import io
import os
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

import wrapt

from ._frames import app_location, is_app_code

_get_running_loop = asyncio.events._get_running_loop
_STDLIB = tuple({sysconfig.get_paths()[name] for name in ("stdlib", "platstdlib")})

_SOCKET_METHODS = (
    "accept",
    "connect",
    "connect_ex",
    "recv",
    "recv_into",
    "recvfrom",
    "recvfrom_into",
    "send",
    "sendall",
    "sendto",
    "sendfile",
)
_ADVICE = {
    "time.sleep": "await asyncio.sleep() instead",
    "pymongo-sync": "use pymongo's AsyncMongoClient (or motor), or run it in a thread",
    "requests": "use an async HTTP client (httpx.AsyncClient), or run it in a thread",
}


class BlockingCallError(AssertionError):
    """A known blocking call was made on the event loop's thread inside `forbid_blocking()`."""

    def __init__(self, kind: str, location: str | None) -> None:
        self.kind = kind
        self.location = location
        advice = _ADVICE.get(kind, "await its async equivalent or asyncio.to_thread() it")
        super().__init__(
            f"{kind} called on the event loop's thread at {location or 'unknown location'}: "
            f"it blocks every request in flight; {advice}"
        )


class _Guards:
    """The active forbid_blocking() blocks, and the patches they share."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: list[list[BlockingCallError]] = []  # each block's violations
        self.undo: list[Callable[[], None]] = []


_guards = _Guards()


def _violation(kind: str, caller: FrameType | None, library: str = "") -> BlockingCallError:
    if library:  # the call site is where the application called that library
        while caller is not None and caller.f_code.co_filename.startswith(library):
            caller = caller.f_back
    error = BlockingCallError(kind, app_location(caller))
    for violations in list(_guards.active):
        violations.append(error)
    return error


def _on_loop() -> bool:
    return bool(_guards.active) and _get_running_loop() is not None


def _always(kind: str, library: str = "") -> Callable[..., Any]:
    """A wrapper that raises on the loop's thread whoever calls."""

    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if _on_loop():
            raise _violation(kind, sys._getframe(1), library)
        return wrapped(*args, **kwargs)

    return wrapper


def _from_app(kind: str) -> Callable[..., Any]:
    """A wrapper that raises on the loop's thread when application code calls it, directly or
    through the standard library (pathlib): frameworks open files on the loop's thread for
    one-time loads (mimetypes), and those are not what the application's test can fix."""

    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if _on_loop():
            caller: FrameType | None = sys._getframe(1)
            while caller is not None and caller.f_code.co_filename.startswith(_STDLIB):
                caller = caller.f_back
            if caller is not None and is_app_code(caller.f_code):
                raise _violation(kind, caller)
        return wrapped(*args, **kwargs)

    return wrapper


def _blocking_socket(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    # asyncio's sockets are non-blocking (timeout 0.0): only blocking ones are forbidden.
    if _on_loop() and instance is not None and instance.gettimeout() != 0.0:
        raise _violation(f"socket.{wrapped.__name__}", sys._getframe(1))
    return wrapped(*args, **kwargs)


def _no_timeout(kind: str, position: int) -> Callable[..., Any]:
    """A wrapper that raises on the loop's thread when the call has no timeout."""

    def wrapper(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if _on_loop():
            timeout = kwargs.get("timeout", args[position] if len(args) > position else None)
            if timeout is None:
                raise _violation(kind, sys._getframe(1))
        return wrapped(*args, **kwargs)

    return wrapper


if TYPE_CHECKING:
    _Proxy = wrapt.ObjectProxy[Any]
else:
    _Proxy = wrapt.ObjectProxy  # not subscriptable before wrapt 2


class _CheckedLock(_Proxy):
    """A threading.Lock made inside forbid_blocking(): acquiring it without a timeout on the
    loop's thread, from application code, raises."""

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking and timeout < 0 and _on_loop():
            caller = sys._getframe(1)
            if is_app_code(caller.f_code):
                raise _violation("threading.Lock.acquire", caller)
        return bool(self.__wrapped__.acquire(blocking, timeout))

    def __enter__(self) -> bool:
        if _on_loop():
            caller = sys._getframe(1)
            if is_app_code(caller.f_code):
                raise _violation("threading.Lock.acquire", caller)
        return bool(self.__wrapped__.acquire())

    def __exit__(self, *exc: object) -> None:
        self.__wrapped__.release()


def _new_lock(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
    return _CheckedLock(wrapped(*args, **kwargs))


def _patch(owner: Any, name: str, wrapper: Callable[..., Any]) -> None:
    own = name in vars(owner)
    original = getattr(owner, name)
    setattr(owner, name, wrapt.FunctionWrapper(original, wrapper))

    def undo() -> None:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)  # the inherited one shows through again

    _guards.undo.append(undo)


def _optional(module: str, owner: str, name: str) -> tuple[Any, str] | None:
    try:
        found: Any = importlib.import_module(module)
    except ImportError:
        return None
    for part in owner.split("."):
        found = getattr(found, part, None)
        if found is None:
            return None
    return (found, name) if hasattr(found, name) else None


def _install() -> None:
    _patch(time, "sleep", _always("time.sleep"))
    for name in _SOCKET_METHODS:
        _patch(socket.socket, name, _blocking_socket)
    _patch(socket, "getaddrinfo", _always("socket.getaddrinfo"))
    _patch(builtins, "open", _from_app("open"))
    _patch(io, "open", _from_app("open"))
    _patch(subprocess, "run", _always("subprocess.run"))
    _patch(subprocess, "call", _always("subprocess.call"))
    _patch(subprocess.Popen, "wait", _no_timeout("subprocess.Popen.wait", 0))
    _patch(subprocess.Popen, "communicate", _no_timeout("subprocess.Popen.communicate", 1))
    _patch(threading, "Lock", _new_lock)
    for module, owner, name, kind in (
        ("requests.sessions", "Session", "request", "requests"),
        ("pymongo.synchronous.mongo_client", "MongoClient", "_select_server", "pymongo-sync"),
    ):
        target = _optional(module, owner, name)
        if target is not None:
            package = sys.modules[module.partition(".")[0]].__file__ or ""
            _patch(*target, _always(kind, os.path.dirname(package)))


def enter() -> list[BlockingCallError]:
    """Start forbidding (patching on the first active block); returns its violations list."""
    violations: list[BlockingCallError] = []
    with _guards.lock:
        if not _guards.active:
            _install()
        _guards.active.append(violations)
    return violations


def leave(violations: list[BlockingCallError]) -> None:
    """Stop forbidding for one block (unpatching with the last one)."""
    with _guards.lock:
        _guards.active = [v for v in _guards.active if v is not violations]
        if not _guards.active:
            while _guards.undo:
                _guards.undo.pop()()
