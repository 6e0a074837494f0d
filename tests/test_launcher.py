"""`perfmw run`: real servers started by the launcher as a user starts them, in a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from perfmw import launcher
from prometheus_server import stop_process
from support import label_values, sample, wait_for

BIN = os.path.dirname(os.path.abspath(sys.executable))  # the virtualenv's, where uvicorn is
# How a user starts it: the console script, or the module.
LAUNCHERS = {
    "perfmw": [os.path.join(BIN, "perfmw")],
    "python -m perfmw": [sys.executable, "-m", "perfmw"],
}

# A service that builds its clients when its module is imported, and never calls perfmw.
SHOP = """
import os

from fastapi import FastAPI
from pymongo import AsyncMongoClient, MongoClient
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

client = MongoClient(os.environ["SHOP_MONGO_URI"])
async_client = AsyncMongoClient(os.environ["SHOP_MONGO_URI"])
app = FastAPI()


@app.get("/sync")
def sync_route():
    items = client[os.environ["SHOP_DB"]].sync_items
    items.insert_one({"sku": 1})
    items.find_one({"sku": 1})
    return {"count": items.count_documents({})}


@app.get("/async")
async def async_route():
    items = async_client[os.environ["SHOP_DB"]].async_items
    await items.insert_one({"sku": 1})
    await items.find_one({"sku": 1})
    return {"count": await items.count_documents({})}


async def stock(request):
    return JSONResponse(await async_client[os.environ["SHOP_DB"]].stock.count_documents({}))


# A Starlette app mounted in the FastAPI one: measured once, by the outer app.
app.mount("/legacy", Starlette(routes=[Route("/stock", stock)]))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PERFMW_")}
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    return {**env, **extra}


@pytest.fixture
def shop(tmp_path: Path, mongo_uri: str, request: pytest.FixtureRequest) -> Iterator[Server]:
    (tmp_path / "shop.py").write_text(SHOP)
    command = [*LAUNCHERS[request.param], "run", "uvicorn", "shop:app"]
    with Server(command, tmp_path, SHOP_MONGO_URI=mongo_uri, SHOP_DB=tmp_path.name) as server:
        yield server


class Server:
    """A program serving on 127.0.0.1 in its own process (`--port` added), always stopped."""

    def __init__(self, command: list[str], cwd: Path, **env: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = cwd / "stderr.txt"
        with self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)],
                cwd=cwd,
                env=environment(**env),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )

    def __enter__(self) -> Server:
        try:
            wait_for(self._answering, 60, what="the launched server")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process(self.process)

    def _answering(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the server exited: {self.stderr_path.read_text()}")
        try:
            return httpx.get(self.url + "/metrics", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self, sig: signal.Signals) -> tuple[int, str]:
        """Stop it as an operator does: its exit status and everything it wrote on stderr."""
        self.process.send_signal(sig)
        status = self.process.wait(30)
        return status, self.stderr_path.read_text()


def queries(metrics: str, collection: str, operation: str) -> float | None:
    return sample(
        metrics,
        "db_client_operation_duration_seconds_count",
        db_system_name="mongodb",
        db_collection_name=collection,
        db_operation_name=operation,
    )


@pytest.mark.parametrize("shop", list(LAUNCHERS), indirect=True)
def test_clients_built_at_import_are_counted_and_the_shutdown_is_clean(shop: Server) -> None:
    with httpx.Client(base_url=shop.url, timeout=30) as http:
        assert http.get("/sync").json() == {"count": 1}
        assert http.get("/async").json() == {"count": 1}
        assert http.get("/legacy/stock").json() == 0
        metrics = http.get("/metrics").text
    for route in ("/sync", "/async"):
        labels = {"http_request_method": "GET", "http_route": route}
        assert sample(metrics, "perfmw_request_db_queries_count", **labels) == 1
        assert sample(metrics, "perfmw_request_db_queries_sum", **labels) == 3
        assert sample(metrics, "perfmw_request_db_queries_bucket", **labels, le="2.0") == 0
        assert sample(metrics, "perfmw_request_db_queries_bucket", **labels, le="3.0") == 1
    for collection in ("sync_items", "async_items"):
        assert queries(metrics, collection, "insert") == 1
        assert queries(metrics, collection, "find") == 1
        assert queries(metrics, collection, "aggregate") == 1
    # The mounted app's request, once: by the FastAPI app it is mounted in.
    mounted = {"http_request_method": "GET", "http_route": "/legacy/stock"}
    assert sample(metrics, "perfmw_request_db_queries_count", **mounted) == 1
    assert sample(metrics, "perfmw_request_db_queries_sum", **mounted) == 1
    assert queries(metrics, "stock", "aggregate") == 1
    routes = label_values(metrics, "perfmw_request_db_queries_count", "http_route")
    assert routes == {"/sync", "/async", "/legacy/stock"}  # none of the mounted app's own

    status, stderr = shop.stop(signal.SIGINT)
    assert status == 0, stderr
    assert "perfmw" not in stderr and "Traceback" not in stderr, stderr
    assert "Finished server process" in stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_uvicorn_shuts_down_an_instrumented_app_without_a_perfmw_error(
    tmp_path: Path, mongo_uri: str, sig: signal.Signals
) -> None:
    # The one line, and garbage in cycles: collections run up to and during the shutdown.
    (tmp_path / "one_line.py").write_text(
        SHOP
        + """
import perfmw

perfmw.instrument(app)
kept = []


@app.get("/cycles")
def cycles():
    for _ in range(20_000):
        node = {}
        node["self"] = node
        kept.append(node)
    return len(kept)
"""
    )
    with Server(
        ["uvicorn", "one_line:app"], tmp_path, SHOP_MONGO_URI=mongo_uri, SHOP_DB=tmp_path.name
    ) as server:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            for _ in range(3):
                assert http.get("/sync").status_code == 200
                assert http.get("/async").status_code == 200
                assert http.get("/cycles").status_code == 200
            metrics = http.get("/metrics").text
            assert sample(metrics, "perfmw_internal_errors_total", component="loop") is None
        status, stderr = server.stop(sig)
    # Recent uvicorn re-raises SIGTERM once it has shut down: killed by it, after a clean stop.
    assert status in (0, -sig), stderr
    assert "perfmw internal error" not in stderr and "Traceback" not in stderr, stderr
    assert "Finished server process" in stderr


def run(*argv: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "perfmw", "run", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment(**env),
        timeout=60,
    )


def test_the_exit_status_and_output_are_the_programs_own() -> None:
    done = run("python", "-c", "import sys; print('served'); sys.exit(7)")
    assert (done.returncode, done.stdout, done.stderr) == (7, "served\n", "")


def test_the_program_starts_with_perfmw_ready_before_its_own_code() -> None:
    check = (
        "import sys; from pymongo import monitoring; from perfmw import mongo; "
        "print(mongo._commands in monitoring._LISTENERS.command_listeners, "
        "'starlette.applications' in sys.modules)"
    )
    done = run("python", "-c", check)
    assert (done.returncode, done.stdout, done.stderr) == (0, "True True\n", "")


def test_the_programs_own_sitecustomize_still_runs(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "print('site', 'after perfmw' if 'perfmw.launcher' in sys.modules else 'alone')\n"
    )
    done = run("python", "-c", "print('main')", PYTHONPATH=str(tmp_path))
    # The launcher is a Python program too: its own interpreter loads it first, alone.
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == "site alone\nsite after perfmw\nmain\n"


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        ((), f"perfmw run: no program given; {launcher.USAGE}\n"),
        (
            ("no-such-program-perfmw", "app:app"),
            "perfmw run: program not found: no-such-program-perfmw\n",
        ),
    ],
    ids=["no program", "unknown program"],
)
def test_a_missing_program_is_a_usage_error_in_one_line(argv: tuple[str, ...], line: str) -> None:
    done = run(*argv)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", line)


def test_an_invalid_setting_is_a_usage_error_naming_its_variable() -> None:
    done = run("python", "-c", "print('never')", PERFMW_MAX_ROUTES="0")
    assert (done.returncode, done.stdout, done.stderr) == (
        2,
        "",
        "perfmw run: perfmw setting max_routes (PERFMW_MAX_ROUTES) must be an integer >= 1, "
        "got 0\n",
    )
