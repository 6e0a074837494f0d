"""pytest plugin for perfmw (markers and fixtures for applications' tests).

    @pytest.mark.max_queries(3)           # the test fails if it sends more than 3 queries
    def test_servers(client): ...

    def test_servers(client, perfmw_queries):
        with perfmw_queries(3):           # perfmw.testing.assert_max_queries(3)
            client.get("/servers")

    @pytest.mark.forbid_blocking          # the test fails at a blocking call on the loop
    def test_servers(client): ...

    def test_servers(client, forbid_blocking): ...   # the same, as a fixture

Installed with perfmw (entry point `pytest11`); nothing is patched unless a test asks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator, Iterator
from typing import Any

import pytest

from . import mongo, testing


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "forbid_blocking: fail the test at a known blocking call made on the event loop's "
        "thread (perfmw.testing.forbid_blocking)",
    )
    config.addinivalue_line(
        "markers",
        "max_queries(n): fail the test if it sends more than n MongoDB queries "
        "(perfmw.testing.assert_max_queries)",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    # The queries of clients made in fixtures (or by the app before `instrument()`) count only
    # if the listeners are registered before those clients exist; only when a test asks.
    for item in session.items:
        if item.get_closest_marker("max_queries") or "perfmw_queries" in getattr(
            item, "fixturenames", ()
        ):
            mongo.register_listeners()
            return


_BUDGET = pytest.StashKey[testing.assert_max_queries]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # A misused marker errors the test before its fixtures run, as pytest's own markers do.
    marker = item.get_closest_marker("max_queries")
    if marker is None:
        return
    try:
        item.stash[_BUDGET] = testing.assert_max_queries(*marker.args, **marker.kwargs)
    except (TypeError, ValueError):
        arguments = [repr(a) for a in marker.args]
        arguments += [f"{k}={v!r}" for k, v in marker.kwargs.items()]
        usage = (
            "@pytest.mark.max_queries(n) takes one integer n >= 0, the number of MongoDB "
            f"queries the test may send; got @pytest.mark.max_queries({', '.join(arguments)})"
        )
    else:
        return
    pytest.fail(usage, pytrace=False)  # outside the `except`: no "During handling of..."


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    __tracebackhide__ = True  # a failure here is the test's, not the plugin's
    budget = item.stash.get(_BUDGET, None)
    blocking = item.get_closest_marker("forbid_blocking") is not None
    if budget is None and not blocking:
        return (yield)
    # Plain `with`s, not an ExitStack: a failure's traceback then holds no frame but hidden ones.
    with (
        budget if budget is not None else contextlib.nullcontext(),
        testing.forbid_blocking() if blocking else contextlib.nullcontext(),
    ):
        return (yield)


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture
def perfmw_queries() -> type[testing.assert_max_queries]:
    """perfmw.testing.assert_max_queries, as pytest-django's `django_assert_max_num_queries`.

    def test_servers(client, perfmw_queries):
        with perfmw_queries(3) as captured:
            client.get("/servers")
        assert [q.collection for q in captured.queries] == ["servers"]
    """
    return testing.assert_max_queries


@pytest.fixture
def forbid_blocking(request: pytest.FixtureRequest) -> Iterator[Any]:
    """perfmw.testing.forbid_blocking() around the test; yields it (see `.violations`).

    A blocking call the test did not see (the server turned it into a 500) fails it at
    teardown; one that already failed the test is not reported twice.
    """
    guard = testing.forbid_blocking()
    guard.__enter__()
    try:
        yield guard
    finally:
        if request.node.stash.get(_CALL_FAILED, False):
            # As if leaving with the test's failure: it already reports the blocking call.
            failure = AssertionError("the test failed")
            guard.__exit__(AssertionError, failure, None)
        else:
            guard.__exit__(None, None, None)
