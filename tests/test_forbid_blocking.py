"""perfmw.testing.forbid_blocking(): blocking calls on the loop's thread raise where made."""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import socket
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import requests
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pymongo import MongoClient

import perfmw
from perfmw.testing import BlockingCallError, forbid_blocking
from support import line_of, serve

pytest_plugins = ["pytester"]


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/async-sleep")
    async def async_sleep() -> dict[str, bool]:
        time.sleep(0.01)  # on the loop
        return {"slept": True}

    @app.get("/def-sleep")
    def def_sleep() -> dict[str, bool]:
        time.sleep(0.01)  # in the threadpool
        return {"slept": True}

    perfmw.instrument(app, registry=CollectorRegistry())
    return app


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_raises_at_the_sleep_of_an_async_endpoint_not_of_a_def_endpoint(loop: str) -> None:
    with serve(make_app(), loop=loop) as server:
        with forbid_blocking() as guard:
            assert httpx.get(server.url + "/def-sleep").json() == {"slept": True}
        assert guard.violations == []
        with pytest.raises(BlockingCallError) as raised, forbid_blocking():
            assert httpx.get(server.url + "/async-sleep").status_code == 500
        assert raised.value.kind == "time.sleep"
        where = line_of(__file__, "# on the loop")
        assert raised.value.location == where
        assert str(raised.value) == (
            f"time.sleep called on the event loop's thread at {where}: it "
            "blocks every request in flight; await asyncio.sleep() instead"
        )
        # The traceback ends at the call site, in the endpoint.
        frames = [f for f, _ in traceback.walk_tb(raised.value.__traceback__)]
        assert "async_sleep" in [f.f_code.co_name for f in frames]
        # Undone on exit: the same endpoint is served again.
        assert httpx.get(server.url + "/async-sleep").json() == {"slept": True}


def blocking_socket() -> None:
    left, right = socket.socketpair()
    with left, right:
        right.sendall(b"x")
        left.recv(1)  # a blocking socket


def open_file() -> None:
    with open(__file__, "rb") as f:  # a file read
        f.read(1)


def run_subprocess() -> None:
    subprocess.run(["true"], check=True)  # a child process


def requests_get() -> None:
    with contextlib.suppress(requests.ConnectionError):  # nothing listens there
        requests.get("http://127.0.0.1:9/", timeout=1)  # a synchronous HTTP client


def new_lock() -> Callable[[], None]:
    lock = threading.Lock()

    def take() -> None:
        with lock:  # a lock without timeout
            pass

    return take


CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("time.sleep", lambda: time.sleep(0.001), "lambda: time.sleep(0.001)"),
    ("socket.sendall", blocking_socket, "right.sendall"),
    ("open", open_file, "# a file read"),
    ("subprocess.run", run_subprocess, "# a child process"),
    ("requests", requests_get, "# a synchronous HTTP client"),
]


@pytest.mark.parametrize(("kind", "call", "marker"), CASES, ids=[c[0] for c in CASES])
def test_each_known_blocking_call_raises_on_the_loop_and_not_in_a_worker_thread(
    kind: str, call: Callable[[], Any], marker: str
) -> None:
    async def on_the_loop() -> None:
        call()

    async def in_a_thread() -> None:
        await asyncio.get_running_loop().run_in_executor(None, call)
        await asyncio.to_thread(call)

    with forbid_blocking():
        asyncio.run(in_a_thread())
        call()  # no loop running in this thread
    with pytest.raises(BlockingCallError) as raised, forbid_blocking():
        asyncio.run(on_the_loop())
    assert (raised.value.kind, raised.value.location) == (kind, line_of(__file__, marker))


def test_synchronous_pymongo_raises_on_the_loop(mongo_uri: str) -> None:
    client: MongoClient[dict[str, Any]] = MongoClient(mongo_uri)
    try:

        async def on_the_loop() -> None:
            client.perfmw_test.items.find_one({"n": 1})  # sync pymongo

        async def in_a_thread() -> None:
            await asyncio.to_thread(client.perfmw_test.items.find_one, {"n": 1})

        with forbid_blocking():
            asyncio.run(in_a_thread())
        with pytest.raises(BlockingCallError) as raised, forbid_blocking():
            asyncio.run(on_the_loop())
    finally:
        client.close()
    assert (raised.value.kind, raised.value.location) == (
        "pymongo-sync",
        line_of(__file__, "# sync pymongo"),
    )
    assert "AsyncMongoClient" in str(raised.value)


def test_a_lock_made_inside_the_block_cannot_be_waited_for_on_the_loop() -> None:
    async def with_timeout(lock: Any) -> bool:
        acquired = bool(lock.acquire(timeout=1))
        lock.release()
        return acquired

    async def without_timeout(take: Callable[[], None]) -> None:
        take()

    with forbid_blocking():
        lock = threading.Lock()
        assert asyncio.run(with_timeout(lock))
    with pytest.raises(BlockingCallError) as raised, forbid_blocking():
        asyncio.run(without_timeout(new_lock()))
    assert (raised.value.kind, raised.value.location) == (
        "threading.Lock.acquire",
        line_of(__file__, "# a lock without timeout"),
    )


def test_patches_are_undone_on_exit_and_nested_blocks_share_them() -> None:
    async def sleep() -> None:
        time.sleep(0.001)

    originals = (time.sleep, builtins.open, subprocess.run, threading.Lock, socket.getaddrinfo)
    assert "recv" not in vars(socket.socket)
    # The sleep caught inside is raised again by the outer block's exit.
    with pytest.raises(BlockingCallError), forbid_blocking() as outer:
        with forbid_blocking():
            assert time.sleep is not originals[0]
        assert time.sleep is not originals[0]  # the outer block still forbids
        assert type(threading.Lock()).__name__ == "_CheckedLock"
        with pytest.raises(BlockingCallError):
            asyncio.run(sleep())
    assert [v.kind for v in outer.violations] == ["time.sleep"]
    assert (time.sleep, builtins.open, subprocess.run, threading.Lock, socket.getaddrinfo) == (
        originals
    )
    assert "recv" not in vars(socket.socket)
    asyncio.run(sleep())  # allowed again


def test_a_swallowed_violation_fails_the_block_on_exit() -> None:
    async def swallowing() -> None:
        with contextlib.suppress(BlockingCallError):
            time.sleep(0.001)  # swallowed here

    with pytest.raises(BlockingCallError) as raised, forbid_blocking():
        asyncio.run(swallowing())
    assert raised.value.location == line_of(__file__, "# swallowed here")


INNER_TESTS = """
import asyncio, time, pytest

async def sleepy():
    time.sleep(0.001)

@pytest.mark.forbid_blocking
def test_marked():
    asyncio.run(sleepy())

def test_fixture(forbid_blocking):
    asyncio.run(sleepy())

def test_unmarked():
    asyncio.run(sleepy())
"""


def test_pytest_plugin_marker_and_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*BlockingCallError: time.sleep called on the event loop's thread at *test_inner.py:4*",
        ]
    )
