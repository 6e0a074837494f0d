from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from otlp_receiver import OtlpReceiver
from perfmw import _guard


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: the test injects failures into perfmw on purpose")


@pytest.fixture(autouse=True)
def no_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """perfmw swallows its own errors in production; in tests an unexpected one fails."""
    before = len(_guard.recent_errors)
    yield
    errors = _guard.recent_errors[before:]
    del _guard.recent_errors[before:]
    if errors and request.node.get_closest_marker("faults") is None:
        component, exc = errors[0]
        raise AssertionError(f"perfmw swallowed an internal error in {component}: {exc!r}") from exc


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver on 127.0.0.1, where `configure_tracing()` sends."""
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
        monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
        monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
        yield receiver


@pytest.fixture(scope="session")
def mongo_uri() -> Iterator[str]:
    """A real MongoDB wire server on 127.0.0.1 (the embedded SecantusDB), for the session."""
    from secantus import SecantusDBServer

    with tempfile.TemporaryDirectory() as storage, SecantusDBServer(storage_path=storage) as server:
        yield server.uri
