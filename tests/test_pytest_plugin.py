"""The pytest plugin's query budget: the `perfmw_queries` fixture and the `max_queries` marker.

Each test runs an inner pytest session (pytester, in a subprocess) against a FastAPI app served
by Starlette's TestClient and the embedded MongoDB, as an application's own tests would.
"""

from __future__ import annotations

import re

import pytest

pytest_plugins = ["pytester"]

# The app's MongoClient is made in a session fixture, before the app is instrumented: its
# queries count only because the plugin registers the listeners when a collected test asks.
CONFTEST = """
import os
import warnings

import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pymongo import MongoClient

import perfmw

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette asks for httpx2 for its TestClient
    from starlette.testclient import TestClient


@pytest.fixture(scope="session")
def servers():
    with MongoClient(os.environ["MONGODB_URI"]) as mongo:
        servers = mongo.plugin_test.servers
        servers.delete_many({})
        servers.insert_many([{"_id": i, "name": f"s{i}"} for i in range(3)])
        yield servers
        mongo.drop_database("plugin_test")


@pytest.fixture
def client(servers):
    app = FastAPI()

    @app.get("/servers")
    def list_servers():
        ids = [s["_id"] for s in servers.find({}, {"_id": 1})]  # the list
        return [servers.find_one({"_id": i})["name"] for i in ids]  # one per server

    perfmw.instrument(app, registry=CollectorRegistry())
    with TestClient(app) as client:
        yield client
"""

INNER_TESTS = """
import pytest

pytestmark = pytest.mark.max_queries(0)  # the module's budget; a test's own marker wins


@pytest.mark.max_queries(4)
def test_marker_within_budget(client, servers):
    assert client.get("/servers").json() == ["s0", "s1", "s2"]


@pytest.mark.max_queries(3)
def test_marker_over_budget(client):
    assert client.get("/servers").status_code == 200


def test_module_marker_over_budget(client):
    assert client.get("/servers").status_code == 200


@pytest.mark.max_queries(0)
def test_own_failure_is_reported_not_the_budget(client):
    client.get("/servers")
    raise RuntimeError("the test's own failure")


@pytest.mark.max_queries(4)
def test_fixture_within_budget(client, perfmw_queries):
    with perfmw_queries(4) as captured:
        client.get("/servers")
    assert [q.shape for q in captured.queries] == [
        "find plugin_test.servers {} projection=[_id]",
        "find plugin_test.servers {_id: ?}",
        "find plugin_test.servers {_id: ?}",
        "find plugin_test.servers {_id: ?}",
    ]


@pytest.mark.max_queries(4)
def test_fixture_over_budget(client, perfmw_queries):
    with perfmw_queries(3):
        client.get("/servers")


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_fixture_async_over_budget(client, perfmw_queries):
    async with perfmw_queries(3):
        client.get("/servers")
"""


def line(source: str, marker: str) -> int:
    """The number of the one line of `source` holding `marker`."""
    (number,) = [n for n, text in enumerate(source.splitlines(), 1) if marker in text]
    return number


def location(marker: str) -> str:
    """ "conftest.py:N" of the inner conftest's line holding `marker`, as a query names it."""
    return f"conftest.py:{line(CONFTEST, marker)}"


def budget_message(n: int) -> list[str]:
    """assert_max_queries(n)'s message for one GET /servers, line by line."""
    each = location("# one per server")
    return [
        f"expected at most {n} MongoDB queries, 4 were sent:",
        f"  1. find plugin_test.servers {{}} projection=[_id]  at {location('# the list')}",
        *(f"  {i}. find plugin_test.servers {{_id: ?}}  at {each}" for i in (2, 3, 4)),
    ]


def section(lines: list[str], title: str) -> list[str]:
    """The lines of one test's report section, up to the next section or summary."""
    header = re.compile(rf"^_+ {re.escape(title)} _+$")
    (start,) = [i for i, line in enumerate(lines) if header.match(line)]
    end = start + 1
    while end < len(lines) and not re.match(r"^(_+ .* _+|=+ .* =+)$", lines[end]):
        end += 1
    return lines[start + 1 : end]


@pytest.fixture
def inner(pytester: pytest.Pytester, mongo_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONGODB_URI", mongo_uri)
    monkeypatch.setenv("COLUMNS", "200")  # the summary lines are not cut
    # Written as is (makeconftest strips the leading newline): the line numbers are CONFTEST's.
    (pytester.path / "conftest.py").write_text(CONFTEST, encoding="utf-8")


def write_tests(pytester: pytest.Pytester, source: str) -> None:
    (pytester.path / "test_inner.py").write_text(source, encoding="utf-8")


def run(pytester: pytest.Pytester) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers", "-rfE")


def test_marker_and_fixture_fail_with_assert_max_queries_message(
    inner: None, pytester: pytest.Pytester
) -> None:
    write_tests(pytester, INNER_TESTS)
    result = run(pytester)
    result.assert_outcomes(passed=2, failed=5)
    lines = result.stdout.lines
    # The marker's failure is the message alone: the plugin's frames are hidden.
    marker = budget_message(3)
    assert section(lines, "test_marker_over_budget") == [
        "",
        f"E   AssertionError: {marker[0]}",
        *(f"    {line}" for line in marker[1:]),
        "All traceback entries are hidden. Pass `--full-trace` to see hidden and internal frames.",
    ]
    module = budget_message(0)
    assert section(lines, "test_module_marker_over_budget")[1:3] == [
        f"E   AssertionError: {module[0]}",
        f"    {module[1]}",
    ]
    # The fixture's failure points at the test's `with` line, or `async with`.
    for title, statement in [
        ("test_fixture_over_budget", "with perfmw_queries(3):"),
        ("test_fixture_async_over_budget", "async with perfmw_queries(3):"),
    ]:
        fixture = section(lines, title)
        assert fixture[fixture.index(f">       {statement}") :] == [
            f">       {statement}",
            f"E       AssertionError: {marker[0]}",
            *(f"E       {line}" for line in marker[1:]),
            "",
            f"test_inner.py:{line(INNER_TESTS, f'    {statement}')}: AssertionError",
        ]
    own = section(lines, "test_own_failure_is_reported_not_the_budget")
    assert own[-3:] == [
        "E       RuntimeError: the test's own failure",
        "",
        f"test_inner.py:{line(INNER_TESTS, 'raise RuntimeError')}: RuntimeError",
    ]
    assert not [line for line in own if "MongoDB queries" in line]
    assert [line for line in lines if line.startswith("FAILED ")] == [
        f"FAILED test_inner.py::test_marker_over_budget - AssertionError: {marker[0]}",
        f"FAILED test_inner.py::test_module_marker_over_budget - AssertionError: {module[0]}",
        "FAILED test_inner.py::test_own_failure_is_reported_not_the_budget - "
        "RuntimeError: the test's own failure",
        f"FAILED test_inner.py::test_fixture_over_budget - AssertionError: {marker[0]}",
        f"FAILED test_inner.py::test_fixture_async_over_budget - AssertionError: {marker[0]}",
    ]


BAD_MARKERS = """
import pytest

BAD = ["'3'", "-1", "True", "", "1, 2", "m=3"]


@pytest.mark.parametrize(
    "arguments",
    [pytest.param(a, marks=eval(f"pytest.mark.max_queries({a})"), id=a or "none") for a in BAD],
)
def test_bad(arguments, client):
    raise AssertionError("the body ran")


@pytest.mark.max_queries(n=4)
def test_by_name(client):
    client.get("/servers")
"""


def test_a_bad_marker_argument_errors_the_test_at_setup(
    inner: None, pytester: pytest.Pytester
) -> None:
    write_tests(pytester, BAD_MARKERS)
    result = run(pytester)
    result.assert_outcomes(passed=1, errors=6)
    lines = result.stdout.lines
    for arguments, id in [("'3'", "'3'"), ("-1", "-1"), ("True", "True"), ("", "none")]:
        assert section(lines, f"ERROR at setup of test_bad[{id}]") == [
            "@pytest.mark.max_queries(n) takes one integer n >= 0, the number of MongoDB queries "
            f"the test may send; got @pytest.mark.max_queries({arguments})"
        ]
    assert section(lines, "ERROR at setup of test_bad[1, 2]")[0].endswith(
        "got @pytest.mark.max_queries(1, 2)"
    )
    assert section(lines, "ERROR at setup of test_bad[m=3]")[0].endswith(
        "got @pytest.mark.max_queries(m=3)"
    )
    assert "the body ran" not in result.stdout.str()


def test_no_listeners_are_registered_unless_a_test_asks(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner="""
        import pymongo.monitoring

        from perfmw import mongo

        def test_nothing_registered():
            assert not mongo._registered
            assert pymongo.monitoring._LISTENERS.command_listeners == []
        """
    )
    run(pytester).assert_outcomes(passed=1)
