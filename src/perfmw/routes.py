"""Route labels: the route template a request matched, never its raw path, within a cap.

/servers/42        -> "/servers/{server_id}"
/api/v1/servers/42 -> "/api/v1/servers/{server_id}"   (a Mount("/api/v1") or an include_router
                                                        prefix in front)
/no/such/page      -> "<unmatched>"
the 501st template -> "<other>"                       (max_routes=500)

Routing leaves different traces in the scope from one release to the next: Starlette's own
routes put themselves in it only in recent releases (1.10 does, 1.0 does not; FastAPI's always
did), old Starlette (0.27) rewrites `path` at each mount, and recent FastAPI (0.165) keeps the
routes of an included router unprefixed and records the prefixed one in `scope["fastapi"]`.
Where the route in the scope alone does not give the whole template, the request as it entered
is matched again against the app's routes (see `_match`), which every release answers alike.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

from .record import OTHER, UNMATCHED


def route_template(
    scope: MutableMapping[str, Any], path: str, root_path: str, app: Any = None
) -> str:
    """The template of the route that served `scope`, after routing ran.

    `path` and `root_path` are the scope's when the request entered perfmw (old Starlette
    mounts rewrite `path` in place); `app` is the one instrumented, whose routes are matched
    again when the scope does not tell the whole template.
    """
    return _template(scope, path, root_path, app)[0]


def _template(
    scope: MutableMapping[str, Any], path: str, root_path: str, app: Any
) -> tuple[str, bool]:
    """`route_template`, and whether the chosen route and the root_paths alone decide it."""
    route = _chosen(scope)
    own = getattr(route, "path", None)  # its own template, without any include_router prefix
    if not isinstance(own, str):
        own = None
    after = scope.get("root_path", "")
    # The route's own template matches the path it was given: no include_router prefix is
    # missing from it (mounts are in root_path, where they are found again).
    reached = own is not None and _reaches(route, _route_path(str(scope.get("path", "")), after))
    if own is not None and reached and after == root_path:
        return own or "/", True
    if app is not None:
        router = getattr(app, "router", app)
        entered = {**scope, "path": path, "root_path": root_path}
        entered.pop("fastapi", None)  # FastAPI's per-request routing state is not ours to touch
        found = _match(_routes_of(router), entered, "")
        if found is not None:
            return found, reached
    if own is None:
        return UNMATCHED, False
    # Not found again (the app rewrote the path, say): the mounts' raw prefix, as a last resort.
    return str(after)[len(root_path) :] + own or "/", False


def _chosen(scope: MutableMapping[str, Any]) -> Any:
    """The route routing chose (its FastAPI effective context if any), or None."""
    route = scope.get("route")
    state = scope.get("fastapi")
    if type(state) is dict:
        context = state.get("effective_route_context")
        if context is not None and (
            route is None or getattr(context, "original_route", None) is route
        ):
            # A route of an included router: its prefixed twin (a plain Starlette route or a
            # mount in an APIRouter), or the context itself (an APIRoute).
            route = getattr(context, "starlette_route", None) or context
    return route


def _route_path(path: str, root_path: str) -> str:
    """The path routes match against (Starlette's get_route_path, for every release)."""
    if not root_path or not path.startswith(root_path):
        return path  # old Starlette mounts: the path is already the remainder
    rest = path[len(root_path) :]
    return rest if rest[:1] in ("/", "") else path


def _reaches(route: Any, route_path: str) -> bool:
    """Whether the route's own template matches the path: no prefix hides in front of it."""
    pattern = getattr(route, "path_regex", None)
    return not isinstance(pattern, re.Pattern) or pattern.match(route_path) is not None


def _routes_of(router: Any) -> list[Any]:
    """A router's routes, FastAPI's included routers seen through (recent FastAPI)."""
    routes = list(getattr(router, "routes", None) or ())
    expand = getattr(sys.modules.get("fastapi.routing"), "iter_route_contexts", None)
    if expand is None:
        return routes
    try:
        return list(expand(routes))
    except Exception:  # a FastAPI whose helper changed: its routes as they are
        return routes


def _match(routes: Any, scope: dict[str, Any], prefix: str) -> str | None:
    """The template of the route `scope` would reach, looking inside mounts and hosts."""
    for route in routes:
        matches = getattr(route, "matches", None)
        path = getattr(route, "path", None)
        if not isinstance(path, str):
            # A Host adds nothing to the path; anything else without a path is not a route.
            path = "" if isinstance(getattr(route, "host", None), str) else None
        if matches is None or path is None:
            continue
        match, child = matches(scope)
        if match.name == "NONE":
            continue
        inner = getattr(route, "routes", None)
        if inner is None:
            return prefix + path
        if not inner:  # a mount of an app without routes (static files): the mount itself
            return prefix + path or "/"
        # A Mount or Host: what it passes on is the scope its routes match against.
        found = _match(_routes_of(route), {**scope, **child}, prefix + path)
        if found is not None:
            return found
    return None


# Mounts with path parameters make root_path vary per request: the cache stays bounded.
_ROUTE_CACHE_LIMIT = 10_000


class RouteLabels:
    """At most `max_routes` distinct templates; the rest are `<other>`."""

    def __init__(self, max_routes: int, app: Any = None) -> None:
        self.max_routes = max_routes
        self.app = app  # whose routes are matched again when the scope does not tell
        self._labels: dict[str, str] = {}
        # id of the route (with the root_paths when a mount changed it) -> (route, label): the
        # template is worked out once per route, not per request. Routes need not be hashable
        # (FastAPI's are not); holding the route keeps its id from being reused.
        self._by_route: dict[Any, tuple[Any, str]] = {}
        self._lock = threading.Lock()

    def label_for(
        self, scope: MutableMapping[str, Any], path: str, root_path: str, status: int | None
    ) -> str:
        """The label of the route that served `scope` (see `route_template`) with `status`."""
        route = _chosen(scope)
        if route is None:
            if status is None or status in (404, 405):
                return UNMATCHED
            # Sent before routing (a CORS preflight answered by middleware, say), or by a
            # Starlette that records no route: still the route its path names.
            return self.label(_template(scope, path, root_path, self.app)[0])
        after = scope.get("root_path", "")
        # No mount on the way (the common case): the route alone is the key.
        key: Any = id(route) if after == root_path else (id(route), after, root_path)
        cached = self._by_route.get(key)
        if cached is not None and cached[0] is route:
            return cached[1]
        template, cacheable = _template(scope, path, root_path, self.app)
        label = self.label(template)
        if cacheable and len(self._by_route) < _ROUTE_CACHE_LIMIT:
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
