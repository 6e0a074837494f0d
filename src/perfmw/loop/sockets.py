"""Requests a blocked loop has not read yet, and when each arrived, as the kernel says.

A request sent while the loop is blocked waits in its connection's receive buffer, where no
middleware sees it; it is read, and starts, only once the loop runs again. Linux tells, for
every TCP connection, how many bytes wait unread (FIONREAD) and the time since it last
received data (`tcpi_last_data_recv` of TCP_INFO, in milliseconds, to a kernel tick). Read
on the loop's thread while the loop is still blocked (a request finishing inside a stall),
or before the loop reads its sockets again (uvloop runs its timers, the heartbeat among
them, first), they date each request still waiting. asyncio reads its sockets before its
timers: when a stall ends at the heartbeat there, the requests the loop has just read are
not seen, and the count errs low. The server's connections are the process's established
TCP sockets whose local port is one the process listens on (the application's clients, to
MongoDB or anywhere else, connect from other ports).

Read only when a stall is reported, and for a sync MongoDB call on the loop's thread at most
once a second per call site (mongo.py), at most MAX_SOCKETS sockets (about 6 µs each); Linux
only, TCP only (a Unix socket, or a connection the server has not accepted yet, is not seen).
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
import termios
from collections.abc import Callable, Iterable

MAX_SOCKETS = 1024
_ESTABLISHED, _LISTEN = 1, 10
_INFO_BYTES = 104  # struct tcp_info up to tcpi_rcv_space: every kernel since 2.6 has them
_LAST_DATA_RECV = struct.Struct("<I")  # milliseconds, at offset 52
_TCP_INFO = getattr(socket, "TCP_INFO", None)

_NO_BYTES = bytes(4)
_UNREAD = struct.Struct("i")

#: A socket's (state, local port, milliseconds since it last received data, bytes unread).
Reading = tuple[int, int, int, int]


def readings(fds: Iterable[int] | None = None) -> list[Reading]:
    """The process's TCP sockets as the kernel sees them now (none off Linux)."""
    if _TCP_INFO is None or not sys.platform.startswith("linux"):
        return []
    if fds is None:
        try:
            fds = [int(name) for name in os.listdir("/proc/self/fd")]
        except OSError:
            return []
    found: list[Reading] = []
    looked = 0
    for fd in fds:
        if looked >= MAX_SOCKETS:
            break
        try:
            sock = socket.socket(fileno=fd)  # not ours: detached below, never closed
        except (OSError, ValueError):  # not a socket, or closed meanwhile
            continue
        looked += 1
        try:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_BYTES)
            port = sock.getsockname()[1]
            unread = 0  # a listening socket has none (and fails the call)
            if info[0] == _ESTABLISHED:
                unread = _UNREAD.unpack(fcntl.ioctl(fd, termios.FIONREAD, _NO_BYTES))[0]
        except OSError:  # UDP, or a socket gone meanwhile
            continue
        finally:
            sock.detach()
        if len(info) >= 56:
            found.append((info[0], port, _LAST_DATA_RECV.unpack_from(info, 52)[0], unread))
    return found


def arrivals(now: float, read: Callable[[], list[Reading]] = readings) -> list[float]:
    """When each request still unread in a server connection arrived, on the clock `now` was
    read from."""
    found = read()
    listening = {port for state, port, _ms, _unread in found if state == _LISTEN}
    return [
        now - ms / 1000.0
        for state, port, ms, unread in found
        if state == _ESTABLISHED and port in listening and unread
    ]


def waits(arrived: Iterable[float], start: float, end: float) -> list[float]:
    """How long each request still unread at `end` waited within the stall [start, end]."""
    return [end - max(at, start) for at in arrived if at <= end]
