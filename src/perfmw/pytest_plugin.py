"""pytest plugin for perfmw (markers and fixtures for applications' tests).

    @pytest.mark.forbid_blocking          # the test fails at a blocking call on the loop
    def test_servers(client): ...

    def test_servers(client, forbid_blocking): ...   # the same, as a fixture

Installed with perfmw (entry point `pytest11`); nothing is patched unless a test asks.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "forbid_blocking: fail the test at a known blocking call made on the event loop's "
        "thread (perfmw.testing.forbid_blocking)",
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, Any]:
    if item.get_closest_marker("forbid_blocking") is None:
        return (yield)
    from perfmw.testing import forbid_blocking as forbid

    with forbid():
        return (yield)


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


@pytest.fixture
def forbid_blocking(request: pytest.FixtureRequest) -> Iterator[Any]:
    """perfmw.testing.forbid_blocking() around the test; yields it (see `.violations`).

    A blocking call the test did not see (the server turned it into a 500) fails it at
    teardown; one that already failed the test is not reported twice.
    """
    from perfmw.testing import forbid_blocking as forbid

    guard = forbid()
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
