"""A TCP proxy on 127.0.0.1 that delays what clients send: a MongoDB in another zone.

    with LatencyProxy("127.0.0.1", 27017, delay=0.0015) as proxy:
        MongoClient(f"mongodb://127.0.0.1:{proxy.port}/?directConnection=true")

The embedded MongoDB answers on the same machine in microseconds of network, so a fix that
saves round trips (batching, `asyncio.gather`) saves nothing measurable against it, while its
own costs (a bigger reply, more connections) remain: the fixes measured slower than the
anti-patterns. Each chunk a client sends reaches the server `delay` seconds after it was read,
in order; replies pass at once. One delay per command, as a network round trip adds.

    python -m examples.fastapi_app.latency TARGET_PORT [DELAY]  # prints its port, then until EOF

The demo runs it so, in a process of its own: in the service's process, its thread would take
the service's interpreter lock to forward every reply, and perfmw would rightly count that
time as the service's own (a `cpu` stall on whichever request was waiting then).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import AsyncIterator

DELAY_SECONDS = 0.0015  # a round trip between two zones of one region: 1-2 ms
_CHUNK = 1 << 16
_MAX_CONNECTIONS = 256
_MAX_QUEUED_CHUNKS = 64  # per connection: a client that sends faster waits (backpressure)


def port_of(uri: str) -> int:
    """The port of a single-host mongodb:// URI."""
    return int(uri.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])


def through(uri: str, port: int) -> str:
    """`uri` (a mongodb:// URI of the target) pointed at a proxy on 127.0.0.1:port instead."""
    scheme, rest = uri.split("://", 1)
    database, _, query = rest.partition("/")[2].partition("?")
    # The server's hello names its own address: without directConnection a client would
    # connect there and go round the proxy.
    options = "&".join(o for o in (query, "directConnection=true") if o)
    return f"{scheme}://127.0.0.1:{port}/{database}?{options}"


class LatencyProxy:
    """Forwards 127.0.0.1:port to (host, target_port), each client's bytes `delay` s late.

    Runs its own event loop in a daemon thread; `close()` (or leaving the `with`) closes the
    listener and every connection and joins the thread.
    """

    def __init__(
        self, host: str, target_port: int, *, delay: float = DELAY_SECONDS, timeout: float = 10.0
    ) -> None:
        if delay < 0:
            raise ValueError("delay must be >= 0")
        self.target = (host, target_port)
        self.delay = delay
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        started = asyncio.run_coroutine_threadsafe(self._listen(), self._loop)
        try:
            self.port = started.result(timeout)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> LatencyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def uri(self, uri: str) -> str:
        """`uri` (a mongodb:// URI of the target) pointed at this proxy instead."""
        return through(uri, self.port)

    async def _listen(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= 3 * _MAX_CONNECTIONS:  # three tasks a connection
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pending: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_MAX_QUEUED_CHUNKS)
        for coroutine in (
            self._receive(reader, pending),
            self._forward(self._delayed(pending), up_writer),
            self._forward(self._at_once(up_reader), writer),  # replies: at once
        ):
            task = asyncio.ensure_future(coroutine)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _receive(
        self, reader: asyncio.StreamReader, pending: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        """Client -> queue, each chunk stamped with when it is due at the server."""
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                await pending.put((time.monotonic() + self.delay, data))
        await pending.put((0.0, b""))

    @staticmethod
    async def _delayed(pending: asyncio.Queue[tuple[float, bytes]]) -> AsyncIterator[bytes]:
        """The queued chunks, each once it is due."""
        while data := (item := await pending.get())[1]:
            wait = item[0] - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            yield data

    @staticmethod
    async def _at_once(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
        while data := await reader.read(_CHUNK):
            yield data

    @staticmethod
    async def _forward(chunks: AsyncIterator[bytes], writer: asyncio.StreamWriter) -> None:
        try:
            async for data in chunks:
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self, timeout: float = 10.0) -> None:
        if self._loop.is_closed():
            return
        if self._loop.is_running():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        self._loop.close()


def main(argv: list[str] | None = None) -> int:
    """Proxy 127.0.0.1:TARGET_PORT until stdin closes; the first line out is the proxy's port."""
    args = sys.argv[1:] if argv is None else argv
    if not 1 <= len(args) <= 2:
        print("usage: python -m examples.fastapi_app.latency TARGET_PORT [DELAY]", file=sys.stderr)
        return 2
    delay = float(args[1]) if len(args) == 2 else DELAY_SECONDS
    with LatencyProxy("127.0.0.1", int(args[0]), delay=delay) as proxy:
        print(proxy.port, flush=True)
        sys.stdin.read()  # until whoever started us closes our stdin
    return 0


if __name__ == "__main__":
    sys.exit(main())
