"""The demo's latency proxy in front of the embedded MongoDB: each command arrives `delay`
late, its URI goes through the proxy only, and closing it stops everything it started."""

from __future__ import annotations

import socket
import time

import pytest
from examples.fastapi_app.latency import LatencyProxy, port_of
from pymongo import MongoClient


def test_each_command_arrives_delay_late_through_the_proxy(mongo_uri: str) -> None:
    with (
        LatencyProxy("127.0.0.1", port_of(mongo_uri), delay=0.05) as proxy,
        MongoClient(proxy.uri(mongo_uri), serverSelectionTimeoutMS=5000) as client,
    ):
        client.admin.command("ping")
        assert client.address == ("127.0.0.1", proxy.port)  # not round the proxy
        collection = client.perfmw_latency.items
        collection.insert_many([{"i": i} for i in range(3)])
        started = time.perf_counter()
        for i in range(3):
            assert collection.find_one({"i": i}, {"_id": 0}) == {"i": i}
        # Three commands, each delayed once (a sleep never ends early).
        assert time.perf_counter() - started >= 3 * 0.05
        collection.drop()


def test_the_uri_points_at_the_proxy_with_a_direct_connection() -> None:
    with LatencyProxy("127.0.0.1", 9, delay=0.001) as proxy:
        port = proxy.port
        assert proxy.uri("mongodb://127.0.0.1:40001/?serverSelectionTimeoutMS=2000") == (
            f"mongodb://127.0.0.1:{port}/?serverSelectionTimeoutMS=2000&directConnection=true"
        )
        assert proxy.uri("mongodb://localhost:40001/registry") == (
            f"mongodb://127.0.0.1:{port}/registry?directConnection=true"
        )
    assert not proxy._thread.is_alive()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port), 5):
        pass


def test_a_negative_delay_is_refused() -> None:
    with pytest.raises(ValueError, match="delay must be >= 0"):
        LatencyProxy("127.0.0.1", 9, delay=-0.001)
