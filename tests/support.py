"""Test support: a real uvicorn server on 127.0.0.1 in a thread, and reading scraped metrics."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from perfmw._frames import format_location


class Server:
    """A uvicorn server running `app` on 127.0.0.1, in a background thread."""

    def __init__(self, app: Any, loop: str = "asyncio", **config: Any) -> None:
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted connections only when
        # the listening socket says so, and without it every response waits on delayed ACKs.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        options = {"log_level": "warning", "lifespan": "on", "loop": loop, **config}
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def start(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        if self.thread.is_alive():
            raise RuntimeError("uvicorn did not stop")


@contextlib.contextmanager
def serve(app: Any, loop: str = "asyncio", **config: Any) -> Iterator[Server]:
    server = Server(app, loop, **config).start()
    try:
        yield server
    finally:
        server.stop()


def wait_for(
    check: Any, timeout: float = 10.0, what: str | None = None, interval: float = 0.05
) -> Any:
    """Poll `check()` until it returns something truthy and return that; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what or check} (last: {last!r})"
    )


def line_of(path: str | os.PathLike[str], marker: str) -> str:
    """ "path:line" of the first line of `path` holding `marker`, as a finding names it.

    Lines that call line_of() are skipped, so a test can name the marker it looks for.
    """
    with open(path, encoding="utf-8") as source:
        for number, text in enumerate(source, start=1):
            if marker in text and "line_of(" not in text:
                return format_location(os.fspath(path), number)
    raise AssertionError(f"{marker!r} is not in {path}")


def samples(exposition: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by (name, labels)."""
    found: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def sample(exposition: str, name: str, **labels: str) -> float | None:
    """The value of one sample, or None when it is not exposed."""
    return samples(exposition).get((name, frozenset(labels.items())))


def request_count(
    exposition: str, route: str, status: str = "200", method: str = "GET"
) -> float | None:
    """Requests counted by http_server_request_duration_seconds for one route and status."""
    return sample(
        exposition,
        "http_server_request_duration_seconds_count",
        http_request_method=method,
        http_route=route,
        http_response_status_code=status,
    )


def label_values(exposition: str, name: str, label: str) -> set[str]:
    return {
        dict(labels)[label]
        for (sample_name, labels) in samples(exposition)
        if sample_name == name and label in dict(labels)
    }


async def _fetch_all(port: int, paths: list[str], statuses: list[int]) -> None:
    """One keep-alive HTTP/1.1 connection sending GETs in turn (responses need Content-Length)."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for path in paths:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            statuses.append(int(lines[0].split(" ")[1]))
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
    finally:
        writer.close()


def hammer(port: int, paths: list[str], connections: int = 16) -> list[int]:
    """GET every path over `connections` keep-alive connections; the status codes, unordered.

    A small raw client: load tests measure the server, not an HTTP client's own cost.
    """
    import asyncio

    statuses: list[int] = []

    async def run() -> None:
        shares = [paths[i::connections] for i in range(connections)]
        await asyncio.gather(*(_fetch_all(port, share, statuses) for share in shares if share))

    asyncio.run(run())
    return statuses


@contextlib.contextmanager
def serve_script(
    source: str,
    directory: Any,
    *,
    health: str = "/metrics",
    cgroup: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Run `source` (a script that serves `app` with `uvicorn.run(app, fd=int(sys.argv[1]))`) in
    its own process, as a real deployment does, on a socket bound here; yields its URL.

    With `cgroup`, the process is moved into that cgroup (its `cgroup.procs`) before it serves;
    `env` adds to the environment it inherits.
    """
    import subprocess
    import sys

    import httpx

    from prometheus_server import stop_process

    script = directory / "server.py"
    script.write_text(source)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    log = (directory / "server.log").open("w")
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([os.getcwd(), *sys.path]),
        **(env or {}),
    }
    process = subprocess.Popen(
        [sys.executable, str(script), str(sock.fileno())],
        pass_fds=[sock.fileno()],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=environment,
    )
    sock.close()
    try:
        if cgroup is not None:
            with open(os.path.join(cgroup, "cgroup.procs"), "w") as procs:
                procs.write(str(process.pid))

        def answering() -> bool:
            if process.poll() is not None:
                raise RuntimeError((directory / "server.log").read_text())
            try:
                return httpx.get(url + health, timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answering, 30, what=f"the server of {script}")
        yield url
    finally:
        stop_process(process)
        log.close()


def pool_label(mongo_uri: str) -> dict[str, str]:
    """The connection-pool label of the embedded server's `mongodb://host:port` URI."""
    host, port = mongo_uri.removeprefix("mongodb://").split("/")[0].split(":")
    return {"db_client_connection_pool_name": f"{host}:{port}"}


def waited_and_spent(exposition: str, pool: dict[str, str]) -> tuple[float, float]:
    """Seconds waited for the pool's connections, and spent in the aggregates on `agents` that
    the pool-wait tests send one at a time through a one-connection pool."""
    waited = sample(exposition, "db_client_connection_wait_time_seconds_sum", **pool)
    spent = sample(
        exposition,
        "db_client_operation_duration_seconds_sum",
        db_system_name="mongodb",
        db_operation_name="aggregate",
        db_collection_name="agents",
    )
    assert waited is not None and spent is not None
    return waited, spent
