"""loop/sockets.py against real TCP sockets: what the kernel says of a server's connections."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from perfmw.loop import sockets


@pytest.fixture
def server() -> Iterator[tuple[socket.socket, socket.socket, socket.socket]]:
    """A listening socket, a client connected to it, and the server's end of that connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    yield listener, client, accepted
    for sock in (accepted, client, listener):
        sock.close()


def test_a_connection_is_read_with_its_state_port_and_the_age_of_its_data(
    server: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    listener, client, accepted = server
    port = listener.getsockname()[1]
    client.sendall(b"GET / HTTP/1.1\r\n\r\n")
    time.sleep(0.05)  # at least this long ago: the test may be kept waiting longer, never less
    fds = [listener.fileno(), client.fileno(), accepted.fileno()]
    found = dict(zip(fds, sockets.readings(fds), strict=True))
    assert (found[listener.fileno()][:2], found[listener.fileno()][3]) == ((10, port), 0)
    # Established on the listening port, the request's 18 bytes unread.
    assert (found[accepted.fileno()][:2], found[accepted.fileno()][3]) == ((1, port), 18)
    assert found[accepted.fileno()][2] >= 40  # ms: the kernel counts in ticks of up to 10 ms
    assert (found[client.fileno()][:2], found[client.fileno()][3]) == (
        (1, client.getsockname()[1]),
        0,
    )
    # Read, never closed: the sockets still carry data, and what was read is no longer unread.
    assert accepted.recv(100) == b"GET / HTTP/1.1\r\n\r\n"
    assert sockets.readings([accepted.fileno()])[0][3] == 0
    accepted.sendall(b"ok")
    assert client.recv(10) == b"ok"


def test_requests_waiting_are_the_unread_ones_on_a_listening_port() -> None:
    # Established on 8000 where the process listens, bytes unread: a request waiting, dated by
    # its data. Read already (an idle keep-alive connection): none. Established from an
    # ephemeral port (a client to MongoDB, say): not the server's.
    readings = [(10, 8000, 0, 0), (1, 8000, 120, 97), (1, 8000, 40, 0), (1, 54321, 30, 310)]
    readings.append((1, 8000, 2500, 12))
    assert sockets.arrivals(10.0, lambda: readings) == [pytest.approx(9.88), 7.5]


def test_a_request_waits_from_its_arrival_or_the_stall_s_start_to_its_end() -> None:
    # Sent 0.05 s into the stall; queued before it began (behind the stall before, say); sent
    # after `end` (the kernel's reading came later): not this stall's.
    assert sockets.waits([10.05, 9.5, 10.31], start=10.0, end=10.3) == [
        pytest.approx(0.25),
        pytest.approx(0.3),
    ]


def test_what_is_not_a_tcp_socket_is_skipped_and_left_open() -> None:
    # A file, a Unix socket, a UDP socket and a closed descriptor.
    pair = socket.socketpair()
    datagram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with open(__file__, "rb") as source:
        try:
            fds = [source.fileno(), pair[0].fileno(), datagram.fileno(), 99_999]
            assert sockets.readings(fds) == []
            pair[0].sendall(b"x")
            assert pair[1].recv(1) == b"x"
            assert source.read(3) == b'"""'
        finally:
            datagram.close()
            pair[0].close()
            pair[1].close()


def test_at_most_max_sockets_are_read(
    server: tuple[socket.socket, socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    _listener, client, accepted = server
    # Descriptors that are no sockets do not count against the cap.
    monkeypatch.setattr(sockets, "MAX_SOCKETS", 1)
    with open(__file__, "rb") as source:
        fds = [source.fileno(), client.fileno(), accepted.fileno()]
        assert [port for _state, port, _ms, _unread in sockets.readings(fds)] == [
            client.getsockname()[1]
        ]


def test_the_process_s_own_sockets_are_found_without_naming_them(
    server: tuple[socket.socket, socket.socket, socket.socket],
) -> None:
    listener, _client, _accepted = server
    port = listener.getsockname()[1]
    found = sorted((state, p) for state, p, _ms, _unread in sockets.readings() if p == port)
    assert found == [(1, port), (10, port)]  # the accepted connection and the listener
