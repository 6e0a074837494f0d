"""Test support: a real uvicorn server on 127.0.0.1 in a thread, and reading scraped metrics."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from prometheus_client.parser import text_string_to_metric_families


class Server:
    """A uvicorn server running `app` on 127.0.0.1, in a background thread."""

    def __init__(self, app: Any, loop: str = "asyncio", **config: Any) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
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


def label_values(exposition: str, name: str, label: str) -> set[str]:
    return {
        dict(labels)[label]
        for (sample_name, labels) in samples(exposition)
        if sample_name == name and label in dict(labels)
    }
