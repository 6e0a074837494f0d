"""Route labels: the route template a request matched, never its raw path, within a cap.

/servers/42        -> "/servers/{server_id}"
/api/v1/servers/42 -> "/api/v1/servers/{server_id}"   (a Mount("/api/v1") in front)
/no/such/page      -> "<unmatched>"
the 501st template -> "<other>"                       (max_routes=500)
"""

from __future__ import annotations

import threading
from collections.abc import MutableMapping
from typing import Any

from .record import OTHER, UNMATCHED


def route_template(scope: MutableMapping[str, Any], root_path: str, app: Any = None) -> str:
    """The template of the route that served `scope`, after routing ran.

    `root_path` is the scope's root_path when the request entered perfmw: what mounts added
    to it since is their prefix.
    """
    route = scope.get("route")
    if route is None:
        if app is None:
            return UNMATCHED
        # Responses sent before routing (a CORS preflight answered by middleware, say) still
        # belong to the route their path names.
        router = getattr(app, "router", app)
        return _match(getattr(router, "routes", None) or (), dict(scope), "") or UNMATCHED
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return UNMATCHED
    prefix = str(scope.get("root_path", ""))[len(root_path) :]
    if hasattr(route, "routes"):  # the innermost route is a Mount (static files, a sub-app)
        return prefix or path or "/"
    return prefix + path


def _match(routes: Any, scope: dict[str, Any], prefix: str) -> str | None:
    """The template of the route `scope` would reach, looking inside mounts."""
    for route in routes:
        matches = getattr(route, "matches", None)
        path = getattr(route, "path", None)
        if matches is None or not isinstance(path, str):
            continue
        match, child = matches(scope)
        if match.name == "NONE":
            continue
        inner = getattr(route, "routes", None)
        if inner is None:
            return prefix + path
        # A Mount: what it would pass on is the scope its routes match against.
        found = _match(inner, {**scope, **child}, prefix + path)
        if found is not None:
            return found
    return None


# Mounts with path parameters make root_path vary per request: the cache stays bounded.
_ROUTE_CACHE_LIMIT = 10_000


class RouteLabels:
    """At most `max_routes` distinct templates; the rest are `<other>`."""

    def __init__(self, max_routes: int, app: Any = None) -> None:
        self.max_routes = max_routes
        self.app = app  # where responses sent before routing look their route up
        self._labels: dict[str, str] = {}
        # id of the route (with the root_paths when a mount changed it) -> (route, label): the
        # template is worked out once per route, not per request. Routes need not be hashable
        # (FastAPI's are not); holding the route keeps its id from being reused.
        self._by_route: dict[Any, tuple[Any, str]] = {}
        self._lock = threading.Lock()

    def label_for(self, scope: MutableMapping[str, Any], root_path: str, status: int | None) -> str:
        """The label of the route that served `scope` (see `route_template`) with `status`."""
        route = scope.get("route")
        if route is None:
            app = self.app if status is not None and status not in (404, 405) else None
            return self.label(route_template(scope, root_path, app))
        after = scope.get("root_path", "")
        # No mount on the way (the common case): the route alone is the key.
        key: Any = id(route) if after == root_path else (id(route), after, root_path)
        cached = self._by_route.get(key)
        if cached is not None and cached[0] is route:
            return cached[1]
        label = self.label(route_template(scope, root_path))
        if len(self._by_route) < _ROUTE_CACHE_LIMIT:
            self._by_route[key] = (route, label)
        return label

    def label(self, template: str) -> str:
        label = self._labels.get(template)
        if label is not None:
            return label
        if template in (UNMATCHED, OTHER):
            return template
        with self._lock:
            if template not in self._labels:
                full = len(self._labels) >= self.max_routes
                if full:
                    return OTHER  # not remembered, so the map stays bounded too
                self._labels[template] = template
            return self._labels[template]

    def __len__(self) -> int:
        return len(self._labels)
