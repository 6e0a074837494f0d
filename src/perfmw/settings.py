"""Settings: one frozen dataclass, validated when it is built, readable from the environment.

settings = perfmw.Settings(n_plus_one_threshold=3)
settings = perfmw.Settings.from_env()   # PERFMW_N_PLUS_ONE_THRESHOLD=3 ...
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

ENV_PREFIX = "PERFMW_"
logger = logging.getLogger("perfmw")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def env_name(field: str) -> str:
    """The environment variable that sets `field`: PERFMW_<FIELD_NAME_UPPER>."""
    return ENV_PREFIX + field.upper()


_warned: set[str] = set()


def _warn_unknown(name: str, known: Iterable[str]) -> None:
    if name in _warned or len(_warned) >= 100:
        return
    _warned.add(name)
    # Compared without the prefix that they all share.
    fields = {known_name.removeprefix(ENV_PREFIX): known_name for known_name in known}
    closest = difflib.get_close_matches(name.removeprefix(ENV_PREFIX), fields, n=1, cutoff=0.6)
    hint = f" (did you mean {fields[closest[0]]}?)" if closest else ""
    logger.warning("perfmw: %s is not a perfmw setting%s; it is ignored", name, hint)


def _invalid(field: str, why: str, value: object) -> ValueError:
    return ValueError(f"perfmw setting {field} ({env_name(field)}) {why}, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """What perfmw measures and serves. Invalid values raise ValueError naming the field."""

    metrics_path: str | None = "/metrics"
    findings_path: str | None = "/perfmw/findings"
    access_token: str | None = None
    server_timing: bool = False
    n_plus_one_threshold: int = 5
    slow_query_seconds: float = 0.1
    explain_slow_queries: bool = False
    stall_threshold_seconds: float = 0.1
    trace: bool = True
    capture_statement: bool = False
    max_routes: int = 500
    # Findings kept per application (the least recently seen go first), and distinct locations
    # of perfmw_findings_total per process (then `<other>`).
    max_findings: int = 1000
    exclude_paths: tuple[str, ...] = ("/metrics", "/perfmw/findings")
    # Call sites ("path:line", or a path suffix such as "app/legacy.py") whose findings are
    # accepted and not reported: the way to silence a known site.
    silenced_locations: tuple[str, ...] = ()
    # The live dashboard, a web page; its JSON at `dashboard_data_path`. Last, so that the
    # fields before it keep their positions.
    dashboard_path: str | None = "/perfmw"
    # The application's own shared packages (paths, or importable package names) that count
    # as library code: findings name the line that called them.
    library_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = _CHECKS[field.name](field.name, value)
            if checked is not value:
                object.__setattr__(self, field.name, checked)
        _check_served_paths(self)

    @property
    def dashboard_data_path(self) -> str | None:
        """Where the dashboard page reads its data: `<dashboard_path>/data.json`."""
        if self.dashboard_path is None:
            return None
        return self.dashboard_path.rstrip("/") + "/data.json"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Every field from PERFMW_<FIELD_NAME_UPPER>; keyword overrides win over it. A PERFMW_
        variable that names no setting (a typo) is logged once, with the closest name."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        known = {env_name(field.name): field.name for field in dataclasses.fields(cls)}
        for name, raw in env.items():
            field = known.get(name)
            if field is not None:
                values[field] = _PARSERS[field](field, raw.strip())
            elif name.startswith(ENV_PREFIX):
                _warn_unknown(name, known)
        values.update(overrides)
        return cls(**values)


# Validation: each returns the (possibly normalised) value or raises ValueError.


def _check_path(field: str, value: object) -> object:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("/"):
        raise _invalid(field, "must be a path starting with '/' or None", value)
    return value


def _check_optional_str(field: str, value: object) -> object:
    if value is not None and (not isinstance(value, str) or not value):
        raise _invalid(field, "must be a non-empty string or None", value)
    return value


def _check_bool(field: str, value: object) -> object:
    if not isinstance(value, bool):
        raise _invalid(field, "must be a boolean (1/0, true/false, yes/no, on/off)", value)
    return value


def _check_count(field: str, value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _invalid(field, "must be an integer >= 1", value)
    return value


def _check_seconds(field: str, value: object) -> object:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise _invalid(field, "must be a number of seconds >= 0", value)
    return float(value)


def _check_paths(field: str, value: object) -> object:
    if isinstance(value, str) or not isinstance(value, (tuple, list, set, frozenset)):
        raise _invalid(field, "must be a sequence of paths starting with '/'", value)
    items = tuple(value)
    for item in items:
        if not isinstance(item, str) or not item.startswith("/"):
            raise _invalid(field, "must be a sequence of paths starting with '/'", value)
    return items


def _check_strings(field: str, value: object) -> object:
    if isinstance(value, str) or not isinstance(value, (tuple, list, set, frozenset)):
        raise _invalid(field, "must be a sequence of strings", value)
    items = tuple(value)
    if not all(isinstance(item, str) and item for item in items):
        raise _invalid(field, "must be a sequence of non-empty strings", value)
    return items


def _check_library_paths(field: str, value: object) -> object:
    from ._frames import library_root

    items = cast(tuple[str, ...], _check_strings(field, value))
    for item in items:
        if library_root(item) is None:
            raise _invalid(
                field,
                f"names {item!r}, which is neither an existing path nor an importable package",
                value,
            )
    return items


def _check_served_paths(settings: Settings) -> None:
    """Each endpoint perfmw serves has a path of its own (the dashboard serves two)."""
    served: dict[str, str] = {}
    # The later of two fields serving one path is named: the dashboard's when it is one.
    for field, path in (
        ("metrics_path", settings.metrics_path),
        ("findings_path", settings.findings_path),
        ("dashboard_path", settings.dashboard_path),
        ("dashboard_path", settings.dashboard_data_path),
    ):
        first = served.setdefault(path, field) if path is not None else field
        if first != field:
            raise _invalid(
                field,
                f"must not serve {path!r}, which {first} ({env_name(first)}) serves: give one "
                "of them another path, or None",
                getattr(settings, field),
            )


_CHECKS = {
    "metrics_path": _check_path,
    "findings_path": _check_path,
    "dashboard_path": _check_path,
    "access_token": _check_optional_str,
    "server_timing": _check_bool,
    "n_plus_one_threshold": _check_count,
    "slow_query_seconds": _check_seconds,
    "explain_slow_queries": _check_bool,
    "stall_threshold_seconds": _check_seconds,
    "trace": _check_bool,
    "capture_statement": _check_bool,
    "max_routes": _check_count,
    "max_findings": _check_count,
    "exclude_paths": _check_paths,
    "silenced_locations": _check_strings,
    "library_paths": _check_library_paths,
}


# Parsing from the environment: text in, typed value out (validation happens in __post_init__).


def _parse_optional(field: str, raw: str) -> str | None:
    # An empty value or "none" turns an optional endpoint or token off.
    return None if raw == "" or raw.lower() == "none" else raw


def _parse_bool(field: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise _invalid(field, "must be a boolean (1/0, true/false, yes/no, on/off)", raw)


def _parse_int(field: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise _invalid(field, "must be an integer >= 1", raw) from None


def _parse_float(field: str, raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise _invalid(field, "must be a number of seconds >= 0", raw) from None


def _parse_list(field: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_PARSERS = {
    "metrics_path": _parse_optional,
    "findings_path": _parse_optional,
    "dashboard_path": _parse_optional,
    "access_token": _parse_optional,
    "server_timing": _parse_bool,
    "n_plus_one_threshold": _parse_int,
    "slow_query_seconds": _parse_float,
    "explain_slow_queries": _parse_bool,
    "stall_threshold_seconds": _parse_float,
    "trace": _parse_bool,
    "capture_statement": _parse_bool,
    "max_routes": _parse_int,
    "max_findings": _parse_int,
    "exclude_paths": _parse_list,
    "silenced_locations": _parse_list,
    "library_paths": _parse_list,
}
