"""The live dashboard (`dashboard/`): the page, its sign-in, its JSON, its stall store, and what a
person sees of it in a real browser (headless Chromium, driven by Playwright) on real servers."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cachetools import LRUCache
from examples.fastapi_app import app as example
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

import perfmw
from perfmw import _guard
from perfmw.dashboard import data, stalls
from perfmw.loop.monitor import HEARTBEAT_SECONDS
from perfmw.record import RequestRecord, Stall
from support import line_of, serve, serve_script, wait_for

try:
    from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright
except ImportError as exc:  # say how to get it, rather than skipping
    raise ImportError(
        "Playwright is missing: `make test` installs it (pip install -e '.[dev]')"
    ) from exc

TOKEN = "s3cret-token"
# A stall's start is known within half a heartbeat: a 0.25 s sleep is a stall this long at least.
SLEPT = 0.25 - HEARTBEAT_SECONDS / 2 - 0.001
ARTIFACTS = Path(__file__).parent / "artifacts"
# The machine may be busy (CI runs CPU-heavy tests beside these): wait for what a person would
# see, generously, and never for a fixed time.
expect.set_options(timeout=45_000)


def tiny_app(registry: CollectorRegistry, **settings: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    perfmw.instrument(app, settings=perfmw.Settings(**settings), registry=registry)
    return app


# --- The page over HTTP ---


def test_the_page_is_self_contained_behind_a_strict_policy(registry: CollectorRegistry) -> None:
    with serve(tiny_app(registry)) as server:
        response = httpx.get(f"{server.url}/perfmw", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    page = response.text
    # Nothing from anywhere else: no URL at all, no script or stylesheet by reference.
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<script[^>]*\bsrc=|<link[^>]*stylesheet|@import|url\(", page)
    [script] = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    [style] = re.findall(r"<style>(.*?)</style>", page, re.DOTALL)

    def digest(text: str) -> str:
        return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()

    assert response.headers["content-security-policy"] == (
        f"default-src 'none'; script-src 'sha256-{digest(script)}'; "
        f"style-src 'sha256-{digest(style)}'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    # The page builds its document from text: no markup is ever made from data.
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert "document.write" not in script and "eval(" not in script


def test_dashboard_path_moves_the_page_and_its_data_and_none_serves_neither(
    registry: CollectorRegistry,
) -> None:
    moved = tiny_app(registry, dashboard_path="/ops/perf")
    with serve(moved) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        assert client.get("/ops/perf").status_code == 200
        assert client.get("/ops/perf/data.json").json()["perfmw_dashboard"] == 1
        assert client.get("/perfmw").status_code == 404  # the app's own 404
    off = tiny_app(CollectorRegistry(), dashboard_path=None)
    with serve(off) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for path in ("/perfmw", "/perfmw/data.json"):
            response = client.get(path)
            assert response.status_code == 404
            assert response.json() == {"detail": "Not Found"}  # FastAPI's, not perfmw's
        # The app's measurements saw them: 404s of its own, not perfmw's endpoints.
        assert 'http_route="<unmatched>"' in client.get("/metrics").text


def test_the_pages_are_not_measured_as_the_apps_requests(registry: CollectorRegistry) -> None:
    with serve(tiny_app(registry)) as server, httpx.Client(base_url=server.url) as client:
        for path in ("/perfmw", "/perfmw/data.json", "/hello"):
            assert client.get(path).status_code == 200
        routes = client.get("/perfmw/data.json").json()["routes"]
    assert [(r["method"], r["route"], r["requests"]) for r in routes] == [("GET", "/hello", 1)]


def test_other_methods_are_refused(registry: CollectorRegistry) -> None:
    with serve(tiny_app(registry)) as server, httpx.Client(base_url=server.url) as client:
        page = client.put("/perfmw")
        assert (page.status_code, page.headers["allow"]) == (405, "GET, HEAD, POST")
        answer = client.post("/perfmw/data.json")
        assert (answer.status_code, answer.headers["allow"]) == (405, "GET, HEAD")


# --- Signing in ---


def cookie_attributes(response: httpx.Response) -> tuple[str, str, set[str]]:
    """(name, value, attributes) of the one Set-Cookie header of `response`."""
    [header] = response.headers.get_list("set-cookie")
    pair, *attributes = [part.strip() for part in header.split(";")]
    name, _, value = pair.partition("=")
    return name, value, set(attributes)


def test_the_token_is_asked_for_and_the_header_opens_page_and_data(
    registry: CollectorRegistry,
) -> None:
    with serve(tiny_app(registry, access_token=TOKEN)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            form = client.get("/perfmw")
            assert form.status_code == 401
            assert form.headers["www-authenticate"] == 'Bearer realm="perfmw"'
            assert form.headers["content-type"] == "text/html; charset=utf-8"
            assert '<form method="post" action="/perfmw">' in form.text
            assert 'name="token" type="password"' in form.text
            assert "This service's dashboard needs its access token." in form.text
            assert "content-security-policy" in form.headers
            assert client.get("/perfmw/data.json").status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=server.url, headers=bearer, timeout=30) as client:
            page = client.get("/perfmw")
            assert page.status_code == 200 and "<title>perfmw dashboard</title>" in page.text
            assert client.get("/perfmw/data.json").json()["perfmw_dashboard"] == 1
            assert "set-cookie" not in page.headers


def test_a_token_in_the_address_becomes_a_cookie_and_leaves_the_address(
    registry: CollectorRegistry,
) -> None:
    with (
        serve(tiny_app(registry, access_token=TOKEN)) as server,
        httpx.Client(base_url=server.url, timeout=30) as client,
    ):
        signed = client.get(f"/perfmw?token={TOKEN}")
        assert signed.status_code == 303
        assert signed.headers["location"] == "/perfmw"
        name, value, attributes = cookie_attributes(signed)
        assert name == "perfmw_token"
        assert TOKEN not in value and len(value) == 64  # an HMAC of the token, not the token
        assert attributes == {"Path=/perfmw", "HttpOnly", "SameSite=Strict"}  # no Secure on http
        # Following the redirect: the page, at an address without the token.
        followed = client.get(f"/perfmw?token={TOKEN}", follow_redirects=True)
        assert followed.status_code == 200
        assert str(followed.url) == f"{server.url}/perfmw"
        # The cookie (the client's jar keeps it) opens the page and its data...
        assert client.get("/perfmw").status_code == 200
        assert client.get("/perfmw/data.json").status_code == 200
        # ...and nothing else: the metrics and findings endpoints take the header only.
        assert client.get("/metrics").status_code == 401
        assert client.get("/perfmw/findings").status_code == 401


def test_the_sign_in_form_sets_the_cookie_and_a_wrong_token_asks_again(
    registry: CollectorRegistry,
) -> None:
    with serve(tiny_app(registry, access_token=TOKEN)) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            posted = client.post("/perfmw", data={"token": TOKEN})
            assert posted.status_code == 303
            assert posted.headers["location"] == "/perfmw"
            assert cookie_attributes(posted)[0] == "perfmw_token"
            assert client.get("/perfmw/data.json").status_code == 200
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for wrong in (
                client.post("/perfmw", data={"token": "guess"}),
                client.get("/perfmw?token=guess"),
            ):
                assert wrong.status_code == 401
                assert "That token was refused: try again." in wrong.text
                assert '<form method="post" action="/perfmw">' in wrong.text
                assert "set-cookie" not in wrong.headers
            forged = {"Cookie": f"perfmw_token={TOKEN}"}  # the token itself is not the cookie
            assert client.get("/perfmw/data.json", headers=forged).status_code == 401
            huge = client.post("/perfmw", data={"token": "x" * 5000})
            assert huge.status_code == 413


def test_the_cookie_is_secure_when_the_request_came_over_https(
    registry: CollectorRegistry,
) -> None:
    app = tiny_app(registry, access_token=TOKEN)
    with serve(app, proxy_headers=True, forwarded_allow_ips="127.0.0.1") as server:
        signed = httpx.get(
            f"{server.url}/perfmw?token={TOKEN}", headers={"X-Forwarded-Proto": "https"}
        )
    assert signed.status_code == 303
    assert cookie_attributes(signed)[2] == {
        "Path=/perfmw",
        "HttpOnly",
        "SameSite=Strict",
        "Secure",
    }


# --- The data ---


@pytest.fixture
def measured_app(mongo_uri: str, registry: CollectorRegistry) -> Iterator[tuple[FastAPI, Any]]:
    """An app with an N+1, a stall and a watched cache, on the embedded MongoDB."""
    app = FastAPI()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    db = client.get_database(f"dashboard_{os.getpid()}_{time.monotonic_ns()}")
    cache = perfmw.watch_cache(LRUCache(maxsize=10), name="things", registry=registry)

    @app.get("/n1")
    async def n_plus_one() -> dict[str, int]:
        found = 0
        for n in range(6):
            found += await db.things.find_one({"n": n}) is not None  # the N+1 line
        return {"found": found}

    @app.get("/stall")
    async def stall() -> dict[str, str]:
        time.sleep(0.25)  # the stalling line
        return {"slept": "yes"}

    @app.get("/cached/{key}")
    async def cached(key: str) -> dict[str, str]:
        if key not in cache:
            cache[key] = key.upper()
        return {"value": cache[key]}

    perf = perfmw.instrument(app, registry=registry)
    yield app, perf
    perf.shutdown()


def test_the_data_endpoint_answers_what_the_page_shows(
    measured_app: tuple[FastAPI, Any],
) -> None:
    app, _ = measured_app
    with serve(app) as server, httpx.Client(base_url=server.url, timeout=60) as client:
        started = time.time()
        assert client.get("/n1").json() == {"found": 0}
        stalled = client.get("/stall")
        for key in ("a", "b", "a", "b"):
            assert client.get(f"/cached/{key}").status_code == 200
        ended = time.time()

        def answer() -> dict[str, Any] | None:
            document = client.get("/perfmw/data.json").json()
            kinds = {group["kind"] for group in document["findings"]}
            return document if {"n_plus_one", "loop_stall"} <= kinds else None

        document = wait_for(answer, 30, "the N+1 and the stall in the dashboard's data")
    assert set(document) == {
        "perfmw_dashboard",
        "generated_at",
        "pid",
        "pids",
        "measured",
        "requests",
        "routes",
        "findings",
        "stalls",
        "caches",
        "pools",
    }
    assert (document["pid"], document["pids"]) == (os.getpid(), [os.getpid()])
    assert document["requests"] == 6
    routes = {row["route"]: row for row in document["routes"]}
    assert set(routes) == {"/n1", "/stall", "/cached/{key}"}
    assert (routes["/n1"]["requests"], routes["/n1"]["queries_per_request"]) == (1, 6.0)
    assert routes["/n1"]["stalls"] == 0 and routes["/n1"]["stall_seconds"] == 0.0
    assert routes["/stall"]["stalls"] == 1 and routes["/stall"]["stall_seconds"] >= SLEPT
    assert routes["/stall"]["response_bytes"] == len(stalled.content)
    assert routes["/cached/{key}"]["requests"] == 4
    for row in routes.values():
        assert row["p50_seconds"] <= row["p95_seconds"] <= row["p99_seconds"]

    groups = {group["kind"]: group for group in document["findings"]}
    [site] = groups["n_plus_one"]["sites"]
    assert groups["n_plus_one"]["label"] == "N+1 queries"
    assert (site["route"], site["location"], site["count"]) == (
        "/n1",
        line_of(__file__, "# the N+1 line"),
        1,
    )
    assert site["detail"]["repetitions"] == 6
    assert site["example"] == site["detail"]["shape"] and "n: ?" in site["example"]
    assert site["advice"]["title"] == [
        ["text", "N+1 queries: "],
        ["code", "find"],
        ["text", " on "],
        ["code", "things"],
        ["text", " repeated 6 times"],
    ]
    assert site["stack"] == []  # perfmw keeps a stack for stalls only
    [stall] = groups["loop_stall"]["sites"]
    assert (stall["route"], stall["location"]) == ("/stall", line_of(__file__, "# the stalling"))
    assert stall["stack"][-1] == line_of(__file__, "# the stalling") + " in stall"
    assert "stack" not in stall["detail"]  # shipped once, beside it
    assert stall["advice"]["title"] == [["text", "Event loop stalled (blocking)"]]

    points = [p for p in document["stalls"]["points"] if p["route"] == "/stall"]
    assert len(points) == 1
    [point] = points
    assert point["cause"] == "blocking" and point["location"] == stall["location"]
    assert SLEPT <= point["duration_seconds"] < 5
    assert started <= point["at"] <= ended
    assert document["stalls"]["threshold_seconds"] == 0.1
    assert document["stalls"]["capacity"] == stalls.RECENT_STALLS
    [cache] = document["caches"]
    assert (cache["cache"], cache["hits"], cache["misses"], cache["hit_rate"]) == (
        "things",
        2,
        2,
        0.5,
    )
    [pool] = document["pools"]
    assert pool["checkouts"] >= 6
    assert pool["wait_seconds"] >= 0 and pool["p95_wait_seconds"] is not None


@pytest.mark.faults
def test_a_failing_data_build_is_a_500_counted_and_the_app_goes_on(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(perf: Any) -> dict[str, Any]:
        raise RuntimeError("dashboard data down")

    monkeypatch.setattr(data, "document", broken)
    before = _guard.error_counts["dashboard"]
    with serve(tiny_app(registry)) as server, httpx.Client(base_url=server.url) as client:
        answer = client.get("/perfmw/data.json")
        assert (answer.status_code, answer.text) == (500, "perfmw internal error (logged)\n")
        assert client.get("/hello").json() == {"hello": "world"}
        assert client.get("/perfmw").status_code == 200  # the page itself is static
    assert _guard.error_counts["dashboard"] == before + 1


def test_in_multiprocess_mode_the_data_is_read_from_the_workers_files(tmp_path: Path) -> None:
    directory = tmp_path / "multiproc"
    directory.mkdir()
    source = """
import sys, time
import uvicorn
from fastapi import FastAPI
import perfmw

app = FastAPI()

@app.get("/stall")
async def stall():
    time.sleep(0.2)
    return {}

perfmw.instrument(app)
uvicorn.run(app, fd=int(sys.argv[1]), log_level="warning")
"""
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory)}
    with serve_script(source, tmp_path, env=env) as url, httpx.Client(base_url=url) as client:
        for _ in range(2):
            assert client.get("/stall").status_code == 200

        def answer() -> dict[str, Any] | None:
            document = client.get("/perfmw/data.json", timeout=30).json()
            return document if document["findings"] else None

        document = wait_for(answer, 30, "the stall findings, read from the workers' files")
    assert len(document["pids"]) == 1 and document["pids"] == [document["pid"]]
    [row] = document["routes"]
    assert (row["route"], row["requests"], row["stalls"]) == ("/stall", 2, 2)
    [group] = document["findings"]
    assert (group["kind"], group["count"]) == ("loop_stall", 2)
    assert [p["route"] for p in document["stalls"]["points"]].count("/stall") == 2


# --- The stall store ---


def test_the_stall_store_keeps_the_last_stalls_of_each_app_only() -> None:
    shown, hidden = (
        perfmw.Perf(registry=CollectorRegistry()),
        perfmw.Perf(settings=perfmw.Settings(dashboard_path=None), registry=CollectorRegistry()),
    )
    try:
        for n in range(stalls.RECENT_STALLS + 44):
            for owner in (shown, hidden):
                record = RequestRecord(f"/r{n}", "GET", f"/r{n}", "http", owner)
                record.stalls.append(Stall(0.1 + n / 1000, f"app.py:{n}", cause="blocking"))
                stalls.note(record)
        kept = stalls.recent(shown)
        assert len(kept) == stalls.RECENT_STALLS == 256
        assert [p["route"] for p in kept] == [f"/r{n}" for n in range(44, 300)]  # oldest gone
        assert kept[-1]["location"] == "app.py:299"
        assert stalls.recent(hidden) == []  # no dashboard: nothing kept for it
    finally:
        shown.shutdown()
        hidden.shutdown()


# --- Advice text: the report's Markdown as text segments ---


@pytest.mark.parametrize(
    ("markdown", "segments"),
    [
        ("plain", [["text", "plain"]]),
        (
            "N+1: `find` on `a`",
            [["text", "N+1: "], ["code", "find"], ["text", " on "], ["code", "a"]],
        ),
        ("``a`b``", [["code", "a`b"]]),
        ("`` `x` ``", [["code", "`x`"]]),
        ("`<script>` &lt;b&gt; \\*a\\* &amp;", [["code", "<script>"], ["text", " <b> *a* &"]]),
        ("an ` alone", [["text", "an ` alone"]]),
    ],
)
def test_advice_markdown_becomes_text_and_code_segments(
    markdown: str, segments: list[list[str]]
) -> None:
    assert data.inline(markdown) == segments


# --- In a real browser ---


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail(
            "Chromium is not installed: `make test` installs it (its `browser` target installs "
            "the Debian package chromium), or run `apt-get install chromium`",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            yield launched
        finally:
            launched.close()


@contextlib.contextmanager
def local_only(browser: Browser, base: str) -> Iterator[tuple[BrowserContext, list[str]]]:
    """A browser context that may load from `base` only: any other request is refused and
    listed (the test then fails on the list)."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    outside: list[str] = []

    def local(route: Any) -> None:
        url = route.request.url
        if url.startswith(base + "/"):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    context.route("**/*", local)
    context.set_default_timeout(45_000)
    try:
        yield context, outside
    finally:
        context.close()


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


BLOCKING_RUNS = 3


def test_the_dashboard_shows_the_example_app_live(
    browser: Browser, mongo_uri: str, registry: CollectorRegistry
) -> None:
    app = example.create_app(mongo_uri, settings=perfmw.Settings(), registry=registry)
    with serve(app) as server, local_only(browser, server.url) as (context, outside):
        page = context.new_page()
        page.goto(f"{server.url}/perfmw")
        # Before any traffic: the empty states say what to do.
        expect(page.locator("#routes")).to_have_text(re.compile("^No requests measured yet: send"))
        expect(page.locator("#updated")).to_contain_text("Updated ")

        with httpx.Client(base_url=server.url, timeout=60) as client:
            for path in [
                *["/servers-with-agents"] * 2,
                *["/reports/blocking?seconds=0.3"] * BLOCKING_RUNS,
                *[f"/servers/{n}" for n in (0, 1, 2, 3, 0, 1, 2, 3)],
            ]:
                assert client.get(path).status_code == 200, path

        # The live refresh brings the N+1 with its line, without reloading the page.
        n_plus_one = page.locator('.site[data-kind="n_plus_one"]')
        expect(n_plus_one).to_have_count(1)
        expect(n_plus_one.locator(".location")).to_have_text(
            line_of(example.__file__, 'server["agents"] = await agents.to_list()')
        )
        expect(n_plus_one.locator(".route")).to_have_text("/servers-with-agents")
        expect(n_plus_one.locator(".count")).to_have_text("2 times")
        expect(n_plus_one.locator(".title")).to_have_text(
            "N+1 queries: find on agents repeated 20 times"
        )
        # One point per stall the blocking route made, in the colour of its cause.
        points = page.locator('#stall-chart circle[data-route="/reports/blocking"]')
        expect(points).to_have_count(BLOCKING_RUNS)
        expect(page.locator("#stall-chart circle.cause-blocking")).to_have_count(BLOCKING_RUNS)
        expect(page.locator('#legend li[data-cause="blocking"]')).to_have_text(
            f"blocking ({BLOCKING_RUNS})"
        )
        # The routes: the N+1's queries per request, the cache's hit rate.
        agents = page.locator('#routes-table tr[data-route="/servers-with-agents"] td')
        expect(agents.nth(0)).to_have_text("GET/servers-with-agents")
        expect(agents.nth(1)).to_have_text("2")  # requests
        expect(agents.nth(6)).to_have_text("21")  # queries per request: 1 + 20
        cache = page.locator('#caches tr[data-cache="servers"] td')
        expect(cache.nth(1)).to_have_text("50%")
        expect(cache.nth(2)).to_have_text("4")  # hits
        expect(cache.nth(3)).to_have_text("4")  # misses
        expect(page.locator("#pools tbody tr")).to_have_count(1)

        # Sorting: by requests, most first, then fewest first.
        requests = page.locator('#routes-table th[data-key="requests"] button')
        requests.click()
        rows = page.locator("#routes-table tbody tr")
        expect(rows.first).to_have_attribute("data-route", "/servers/{server_id}")  # 8
        requests.click()
        expect(rows.first).to_have_attribute("data-route", "/servers-with-agents")  # 2
        expect(page.locator('#routes-table th[data-key="requests"]')).to_have_attribute(
            "aria-sort", "ascending"
        )

        # A click on the stall opens its stack, down to the line that blocked the loop.
        stall = page.locator('.site[data-kind="loop_stall"][data-location]').filter(
            has_text="/reports/blocking"
        )
        frame = line_of(example.__file__, "# stands for a slow synchronous library call")
        stack = stall.locator("ol.stack")
        expect(stack).to_be_hidden()
        stall.locator("button.site-head").click()
        expect(stack.locator("li.here")).to_have_text(f"{frame} in render_report")
        expect(stall.locator(".site-body")).to_contain_text("Do instead")
        # It stays open across refreshes.
        refreshes = page.locator("body").get_attribute("data-refreshes")
        expect(page.locator("body")).not_to_have_attribute("data-refreshes", refreshes or "")
        expect(stack.locator("li.here")).to_be_visible()
        screenshot(page, "dashboard.png")
    assert outside == []


EVIL_ROUTE = "/x/<script>alert(1)</script>"
EVIL_IMG_ROUTE = "/y/<img src=x onerror=alert(2)>"
EVIL_KEY = "<img src=x onerror=alert(3)>"
EVIL_SCRIPT_KEY = "<script>alert(4)</script>"


def test_application_strings_are_shown_as_text_never_run(
    browser: Browser, mongo_uri: str, registry: CollectorRegistry
) -> None:
    app = FastAPI()
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_uri)
    db = client.get_database(f"evil_{os.getpid()}_{time.monotonic_ns()}")

    @app.get(EVIL_ROUTE)
    async def evil() -> dict[str, int]:
        for n in range(5):
            await db.evil.find_one({EVIL_KEY: n, EVIL_SCRIPT_KEY: 1})  # the evil N+1
        time.sleep(0.2)  # the evil stall
        return {"done": 1}

    @app.get(EVIL_IMG_ROUTE)
    async def evil_img() -> dict[str, int]:
        return {"done": 2}

    perf = perfmw.instrument(app, registry=registry)
    dialogs: list[str] = []
    with serve(app) as server, local_only(browser, server.url) as (context, outside):
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert http.get(EVIL_ROUTE).json() == {"done": 1}
            assert http.get(EVIL_IMG_ROUTE).json() == {"done": 2}
        page = context.new_page()
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        page.goto(f"{server.url}/perfmw")

        for route in (EVIL_ROUTE, EVIL_IMG_ROUTE):
            cell = page.locator(f'#routes-table tr[data-route="{route}"] .mono')
            expect(cell).to_have_text(route)
            expect(cell).to_be_visible()
        site = page.locator('.site[data-kind="n_plus_one"]')
        expect(site.locator(".route")).to_have_text(EVIL_ROUTE)
        expect(site.locator(".example")).to_contain_text(EVIL_KEY)
        expect(site.locator(".example")).to_contain_text(EVIL_SCRIPT_KEY)
        expect(site.locator(".example")).to_be_visible()
        expect(site.locator(".location")).to_have_text(line_of(__file__, "# the evil N+1"))
        point = page.locator("#stall-chart circle.cause-blocking title")
        expect(point).to_contain_text(f"blocking on {EVIL_ROUTE}")
        # Open every finding: their details hold the strings too.
        for head in page.locator("button.site-head").all():
            head.click()
        expect(page.locator(".site-body").first).to_be_visible()
        # Nothing was made of them: no image, no script but the page's own, no dialog.
        assert page.locator("img").count() == 0
        assert page.locator("script").count() == 1
        assert page.locator("[onerror]").count() == 0
        screenshot(page, "dashboard-escaping.png")
    perf.shutdown()
    assert dialogs == []
    assert outside == []


def test_signing_in_in_the_browser_and_the_banner_when_the_cookie_goes(
    browser: Browser, registry: CollectorRegistry
) -> None:
    app = tiny_app(registry, access_token=TOKEN)
    with serve(app) as server, local_only(browser, server.url) as (context, outside):
        page = context.new_page()
        page.goto(f"{server.url}/perfmw")
        expect(page.locator("main.signin")).to_contain_text("needs its access token")
        page.fill("#token", "guess")
        page.click("button[type=submit]")
        expect(page.locator("main.signin")).to_contain_text("That token was refused")
        page.fill("#token", TOKEN)
        page.click("button[type=submit]")
        expect(page).to_have_url(f"{server.url}/perfmw")
        expect(page.locator("#updated")).to_contain_text("Updated ")
        expect(page.locator("#error")).to_be_hidden()
        [cookie] = context.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"]) == (
            "perfmw_token",
            True,
            "Strict",
        )
        assert page.evaluate("document.cookie") == ""  # no script can read it
        # Signed out (the cookie gone): the next refresh says so, the page stays.
        context.clear_cookies()
        expect(page.locator("#error")).to_have_text(
            re.compile("^The data endpoint answered 401 Unauthorized")
        )
        expect(page.locator("#live")).to_have_class("dot failed")
    assert outside == []
