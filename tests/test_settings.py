from __future__ import annotations

import dataclasses
import logging

import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette

import perfmw
from perfmw import settings as settings_module
from perfmw.settings import env_name


def test_defaults_are_the_contract() -> None:
    settings = perfmw.Settings()
    assert settings.metrics_path == "/metrics"
    assert settings.findings_path == "/perfmw/findings"
    assert settings.dashboard_path == "/perfmw"
    assert settings.dashboard_data_path == "/perfmw/data.json"
    assert settings.access_token is None
    assert settings.server_timing is False
    assert settings.n_plus_one_threshold == 5
    assert settings.slow_query_seconds == 0.1
    assert settings.explain_slow_queries is False
    assert settings.stall_threshold_seconds == 0.1
    assert settings.trace is True
    assert settings.capture_statement is False
    assert settings.max_routes == 500
    assert settings.exclude_paths == ("/metrics", "/perfmw/findings")
    assert settings.library_paths == ()


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        perfmw.Settings().max_routes = 3  # type: ignore[misc]


def test_from_env_reads_every_field() -> None:
    env = {
        "PERFMW_METRICS_PATH": "/internal/metrics",
        "PERFMW_FINDINGS_PATH": "",
        "PERFMW_DASHBOARD_PATH": "/ops/perf",
        "PERFMW_ACCESS_TOKEN": "s3cret",
        "PERFMW_SERVER_TIMING": "Yes",
        "PERFMW_N_PLUS_ONE_THRESHOLD": "3",
        "PERFMW_SLOW_QUERY_SECONDS": "0.25",
        "PERFMW_EXPLAIN_SLOW_QUERIES": "ON",
        "PERFMW_STALL_THRESHOLD_SECONDS": "0",
        "PERFMW_TRACE": "false",
        "PERFMW_CAPTURE_STATEMENT": "1",
        "PERFMW_MAX_ROUTES": "20",
        "PERFMW_EXCLUDE_PATHS": "/health, /internal/metrics",
        "PERFMW_SILENCED_LOCATIONS": "app/legacy.py",
        "PERFMW_LIBRARY_PATHS": "tests/support.py, httpx",
    }
    settings = perfmw.Settings.from_env(env)
    assert settings == perfmw.Settings(
        metrics_path="/internal/metrics",
        findings_path=None,
        dashboard_path="/ops/perf",
        access_token="s3cret",
        server_timing=True,
        n_plus_one_threshold=3,
        slow_query_seconds=0.25,
        explain_slow_queries=True,
        stall_threshold_seconds=0.0,
        trace=False,
        capture_statement=True,
        max_routes=20,
        exclude_paths=("/health", "/internal/metrics"),
        silenced_locations=("app/legacy.py",),
        library_paths=("tests/support.py", "httpx"),
    )


def test_every_field_has_an_environment_variable() -> None:
    names = {field.name for field in dataclasses.fields(perfmw.Settings)}
    for name in names:
        assert env_name(name) == "PERFMW_" + name.upper()


@pytest.mark.parametrize("raw", ["1", "0", "TRUE", "false", "yes", "No", "on", "OFF"])
def test_booleans_accept_the_documented_words(raw: str) -> None:
    settings = perfmw.Settings.from_env({"PERFMW_SERVER_TIMING": raw})
    assert settings.server_timing is (raw.lower() in ("1", "true", "yes", "on"))


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"PERFMW_SERVER_TIMING": "maybe"}, "server_timing"),
        ({"PERFMW_TRACE": "2"}, "trace"),
        ({"PERFMW_SLOW_QUERY_SECONDS": "-1"}, "slow_query_seconds"),
        ({"PERFMW_SLOW_QUERY_SECONDS": "fast"}, "slow_query_seconds"),
        ({"PERFMW_STALL_THRESHOLD_SECONDS": "nan"}, "stall_threshold_seconds"),
        ({"PERFMW_N_PLUS_ONE_THRESHOLD": "0"}, "n_plus_one_threshold"),
        ({"PERFMW_N_PLUS_ONE_THRESHOLD": "2.5"}, "n_plus_one_threshold"),
        ({"PERFMW_MAX_ROUTES": "0"}, "max_routes"),
        ({"PERFMW_METRICS_PATH": "metrics"}, "metrics_path"),
        ({"PERFMW_DASHBOARD_PATH": "perfmw"}, "dashboard_path"),
        ({"PERFMW_EXCLUDE_PATHS": "health"}, "exclude_paths"),
        ({"PERFMW_LIBRARY_PATHS": "no/such/dir"}, "library_paths"),
    ],
)
def test_bad_environment_values_name_the_field_and_variable(
    env: dict[str, str], field: str
) -> None:
    with pytest.raises(ValueError) as raised:
        perfmw.Settings.from_env(env)
    assert field in str(raised.value)
    assert env_name(field) in str(raised.value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"slow_query_seconds": -0.5}, "slow_query_seconds"),
        ({"stall_threshold_seconds": float("inf")}, "stall_threshold_seconds"),
        ({"server_timing": "yes"}, "server_timing"),
        ({"n_plus_one_threshold": True}, "n_plus_one_threshold"),
        ({"max_routes": 0}, "max_routes"),
        ({"metrics_path": "metrics"}, "metrics_path"),
        ({"findings_path": ""}, "findings_path"),
        ({"dashboard_path": ""}, "dashboard_path"),
        ({"dashboard_path": 1}, "dashboard_path"),
        ({"access_token": ""}, "access_token"),
        ({"exclude_paths": "/metrics"}, "exclude_paths"),
        ({"silenced_locations": [""]}, "silenced_locations"),
        ({"library_paths": "shared"}, "library_paths"),
        ({"library_paths": ["no_such_package_anywhere"]}, "library_paths"),
        ({"library_paths": ["no/such/dir"]}, "library_paths"),
    ],
)
def test_bad_values_fail_at_construction(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=f"{field} \\({env_name(field)}\\)"):
        perfmw.Settings(**kwargs)  # type: ignore[arg-type]


def test_overrides_win_over_the_environment() -> None:
    settings = perfmw.Settings.from_env({"PERFMW_MAX_ROUTES": "9"}, max_routes=4)
    assert settings.max_routes == 4


def test_a_list_is_normalised_to_a_tuple() -> None:
    assert perfmw.Settings(exclude_paths=["/a", "/b"]).exclude_paths == ("/a", "/b")


@pytest.mark.parametrize("raw", ["", "none", "None"])
def test_an_empty_or_none_dashboard_path_serves_no_dashboard(raw: str) -> None:
    settings = perfmw.Settings.from_env({"PERFMW_DASHBOARD_PATH": raw})
    assert (settings.dashboard_path, settings.dashboard_data_path) == (None, None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"metrics_path": "/perfmw"},
            "perfmw setting dashboard_path (PERFMW_DASHBOARD_PATH) must not serve '/perfmw', "
            "which metrics_path (PERFMW_METRICS_PATH) serves: give one of them another path, "
            "or None, got '/perfmw'",
        ),
        (
            {"findings_path": "/ops/data.json", "dashboard_path": "/ops"},
            "perfmw setting dashboard_path (PERFMW_DASHBOARD_PATH) must not serve "
            "'/ops/data.json', which findings_path (PERFMW_FINDINGS_PATH) serves: give one of "
            "them another path, or None, got '/ops'",
        ),
        (
            {"metrics_path": "/x", "findings_path": "/x"},
            "perfmw setting findings_path (PERFMW_FINDINGS_PATH) must not serve '/x', which "
            "metrics_path (PERFMW_METRICS_PATH) serves: give one of them another path, or None, "
            "got '/x'",
        ),
    ],
)
def test_two_endpoints_on_one_path_are_refused(kwargs: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError) as raised:
        perfmw.Settings(**kwargs)
    assert str(raised.value) == message
    # Turning one off, or moving it, is the way out.
    assert perfmw.Settings(**{**kwargs, "dashboard_path": None, "findings_path": None})


def test_a_library_path_that_names_nothing_says_so() -> None:
    with pytest.raises(ValueError) as raised:
        perfmw.Settings(library_paths=("acme_shared_db",))
    assert str(raised.value) == (
        "perfmw setting library_paths (PERFMW_LIBRARY_PATHS) names 'acme_shared_db', which is "
        "neither an existing path nor an importable package, got ('acme_shared_db',)"
    )


def test_an_unknown_variable_is_logged_once_with_the_closest_setting(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings_module, "_warned", set())
    env = {"PERFMW_SLOW_QUERY_SECOND": "0.5", "PERFMW_NOTHING_LIKE_IT": "1", "OTHER": "x"}
    with caplog.at_level(logging.WARNING, logger="perfmw"):
        for _ in range(3):
            assert perfmw.Settings.from_env(env) == perfmw.Settings()
    assert caplog.messages == [
        "perfmw: PERFMW_SLOW_QUERY_SECOND is not a perfmw setting "
        "(did you mean PERFMW_SLOW_QUERY_SECONDS?); it is ignored",
        "perfmw: PERFMW_NOTHING_LIKE_IT is not a perfmw setting; it is ignored",
    ]


def test_instrument_without_settings_reads_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PERFMW_ACCESS_TOKEN", "s3cret")
    monkeypatch.setenv("PERFMW_N_PLUS_ONE_THRESHOLD", "3")
    from_env = perfmw.instrument(Starlette(), registry=CollectorRegistry())
    assert from_env.settings.access_token == "s3cret"
    assert from_env.settings.n_plus_one_threshold == 3
    explicit = perfmw.instrument(Starlette(), perfmw.Settings(), registry=CollectorRegistry())
    assert explicit.settings == perfmw.Settings()  # explicit settings win, whole
    from_env.shutdown()
    explicit.shutdown()
