"""`perfmw report` on answers and files that are not what perfmw writes: random JSON and text, and
real ones with one value replaced or one key removed anywhere. Whatever it reads, it writes a
report (exit 0) or one line on stderr (exit 1), never a traceback; and a Markdown report it
writes holds no HTML.

The real answers come from an instrumented app served by uvicorn; one plain HTTP server on
127.0.0.1 then answers, for each example, what the example says (the service's two endpoints,
or Prometheus's query API).
"""

from __future__ import annotations

import contextlib
import copy
import http.server
import io
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cachetools import LRUCache
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import perfmw
from perfmw import report
from perfmw.__main__ import main
from perfmw._report_input import MAX_BYTES
from perfmw._report_prometheus import COUNTED, CURRENT, counted_expr
from support import serve, wait_for
from test_report import FINDINGS, assert_no_html

BOUNDED = settings(max_examples=150, deadline=None, derandomize=True, database=None)
Answer = tuple[int, str, bytes]  # status, content type, body (status 0: the body alone)


class Answering(http.server.ThreadingHTTPServer):
    """An HTTP server on 127.0.0.1 whose answer to each GET `answer(path)` decides."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self.answer: Callable[[str], Answer] = lambda path: (404, "text/plain", b"")


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Answering

    def do_GET(self) -> None:
        status, content_type, body = self.server.answer(self.path)
        if status == 0:  # not HTTP: the bytes as they are
            self.wfile.write(body)
            return
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def server() -> Iterator[Answering]:
    answering = Answering()
    thread = threading.Thread(target=answering.serve_forever, daemon=True)
    thread.start()
    try:
        yield answering
    finally:
        answering.shutdown()
        answering.server_close()
        thread.join(5)


class Real:
    """What a real instrumented service answered, and the documents made of it."""

    def __init__(self, exposition: str, findings: dict[str, Any]) -> None:
        self.exposition = exposition
        # The service's own findings, and the recorded ones of kinds it has no MongoDB for.
        self.findings = {**findings, "findings": findings["findings"] + FINDINGS + EXTRA}
        samples = report.parse_samples(exposition)
        snapshot = report.Snapshot(
            "http://svc:8000", time.time(), samples, self.findings["findings"]
        )
        self.report = json.loads(report.render_json(report.analyse(snapshot)))
        self.prometheus = _prometheus_answers(exposition)


EXTRA: list[dict[str, Any]] = [
    {
        "kind": "consecutive_queries",
        "route": "/dashboard",
        "count": 3,
        "total_seconds": 0.09,
        "location": "app/dashboard.py:20",
        "via": None,
        "detail": {
            "collections": ["users", "orders"],
            "shape": "find db.users {} ; find db.orders {}",
            "queries": [{"operation": "find", "collection": "users", "duration_seconds": 0.03}],
            "sequential_seconds": 0.06,
            "concurrent_seconds": 0.03,
            "saving_seconds": 0.03,
        },
    },
    {
        "kind": "unbounded_read",
        "route": "/export",
        "count": 1,
        "total_seconds": 0.4,
        "location": "app/export.py:5",
        "detail": {
            "collection": "orders",
            "operation": "find",
            "shape": "find db.orders {}",
            "documents": 5000,
            "bytes": 2_000_000,
            "missing": ["limit", "projection"],
        },
    },
    {
        "kind": "slow_query",
        "route": "/search",
        "count": 2,
        "total_seconds": 0.5,
        "location": "app/search.py:9",
        "detail": {
            "collection": "items",
            "operation": "aggregate",
            "shape": "aggregate db.items [$match]",
            "duration_seconds": 0.3,
        },
    },
    {
        "kind": "blocking_call",
        "route": "/legacy",
        "count": 4,
        "total_seconds": 0.2,
        "location": "app/legacy.py:3",
        "via": "pymongo.synchronous.collection.Collection.find_one",
        "detail": {"kind": "pymongo-sync", "operation": "find", "collection": "users"},
    },
]


@pytest.fixture(scope="module")
def real() -> Real:
    registry = CollectorRegistry()
    app = FastAPI()
    users = perfmw.watch_cache(LRUCache(maxsize=2), name="users", registry=registry)

    @app.get("/users/{user}")
    async def user(user: str) -> dict[str, str]:
        if user not in users:
            users[user] = user.upper()
        return {"name": users[user]}

    @app.get("/big")
    async def big() -> str:
        return "x" * 100_000  # a large_response finding

    @app.get("/blocking")
    async def blocking() -> str:
        time.sleep(0.15)  # a loop_stall finding, with its stack
        return "done"

    perfmw.instrument(app, registry=registry)
    with serve(app) as service, httpx.Client(base_url=service.url, timeout=30) as client:
        for path in ("/users/a", "/users/a", "/users/b", "/users/c", "/big", "/blocking"):
            assert client.get(path).status_code == 200

        def both() -> Any:  # a stall is settled by the watchdog, maybe after the response
            document = client.get("/perfmw/findings").json()
            kinds = {f["kind"] for f in document["findings"]}
            return document if kinds == {"large_response", "loop_stall"} else None

        findings = wait_for(both, 30, "the large response and the stall found")
        exposition = client.get("/metrics").text
    return Real(exposition, findings)


def _prometheus_answers(exposition: str) -> dict[str, dict[str, Any]]:
    """What Prometheus would answer for each metric the report asks for, from one exposition."""
    answers = {}
    for name in COUNTED + CURRENT:
        result = [
            {"metric": {"__name__": name, "job": "api", **dict(labels)}, "value": [1.7e9, str(v)]}
            for (sample, labels), v in report.parse_samples(exposition).items()
            if sample == name
        ]
        answers[name] = {"status": "success", "data": {"resultType": "vector", "result": result}}
    return answers


# Outcomes.


def run(*args: str) -> tuple[int, str, str]:
    """`perfmw report ARGS`: its exit status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["report", *args])
    return status, out.getvalue(), err.getvalue()


def assert_clean(status: int, out: str, err: str, markdown: bool) -> None:
    """A report and no complaint, or no report and one line; what a terminal can show."""
    if status == 0:
        assert err == ""
        out.encode("utf-8")  # a terminal's encoding: no lone surrogate
        if markdown:
            assert_no_html(out)
    else:
        assert status == 1, (status, err)
        assert out == ""
        assert err.startswith("perfmw report: ") and err.endswith("\n"), err
        assert len(err.splitlines()) == 1, err
        err.encode("utf-8")


def service(metrics: bytes, findings: bytes) -> Callable[[str], Answer]:
    def answer(path: str) -> Answer:
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4", metrics
        if path == "/perfmw/findings":
            return 200, "application/json", findings
        return 404, "text/plain", b"not found"

    return answer


# Strategies.

# What Markdown or HTML would read as markup, were it not escaped; and any characters (lone
# surrogates too).
MARKUP = st.sampled_from(
    [
        "<script>alert(1)</script>",
        "a\n<img src=x onerror=alert(1)>",
        "`x`\n\n<div>",
        "|`<b>`|\n- [x](javascript:alert(1))",
        "**a\r\n<b>b</b>",
    ]
)
TEXT = st.text(st.characters(exclude_categories=()), max_size=12) | MARKUP
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(2**60), 2**60) | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=10,
)


def _paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*at, key))
    elif isinstance(value, list):
        for number, item in enumerate(value):
            yield from _paths(item, (*at, number))


@st.composite
def mutated(draw: st.DrawFn, document: Any) -> Any:
    """`document` with one value, anywhere in it, replaced by any JSON (a string, as often, by
    any other string) or its key removed."""
    path = draw(st.sampled_from(list(_paths(document))))
    if not path:
        return draw(JSON)
    changed = copy.deepcopy(document)
    parent = changed
    for step in path[:-1]:
        parent = parent[step]
    if isinstance(parent, dict) and draw(st.integers(0, 3)) == 0:
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(MARKUP | JSON if isinstance(parent[path[-1]], str) else JSON)
    return changed


def json_bodies(document: Any) -> st.SearchStrategy[bytes]:
    """Random JSON, `document` mutated, or bytes that are no JSON at all."""
    values = JSON | mutated(document) | mutated(document)
    return values.map(lambda value: json.dumps(value).encode()) | st.binary(max_size=40)


@st.composite
def expositions(draw: st.DrawFn, exposition: str) -> str:
    """Random text, or a real exposition with one line or value changed."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.text(st.characters(exclude_categories=("Cs",)), max_size=80))
    lines = exposition.splitlines()
    number = draw(st.integers(0, len(lines) - 1))
    line = lines[number]
    how = draw(st.sampled_from(["value", "insert", "replace", "delete"]))
    if how == "value" and not line.startswith("#"):
        value = draw(st.sampled_from(["NaN", "+Inf", "-Inf", "1e400", "1e20", "-3", "x", ""]))
        lines[number] = line.rsplit(" ", 1)[0] + " " + value
    elif how == "insert":
        at = draw(st.integers(0, len(line)))
        lines[number] = line[:at] + draw(st.text('{}",=\\ #\n\tle+Inf_a0.', max_size=6)) + line[at:]
    elif how == "replace":
        lines[number] = draw(st.text(max_size=40))
    else:
        del lines[number]
    return "\n".join(lines) + "\n"


# The properties.


def test_the_real_answers_make_a_report(server: Answering, real: Real, tmp_path: Path) -> None:
    """The documents the tests mutate are accepted as they are: what they find is the mutation."""
    server.answer = service(real.exposition.encode(), json.dumps(real.findings).encode())
    status, out, err = run("--url", server.url)
    assert (status, err) == (0, ""), err
    assert "Large response (98 KiB)" in out and "Event loop stalled (blocking)" in out
    path = tmp_path / "real.json"
    path.write_text(json.dumps(real.report))
    assert run("--compare", str(path), str(path))[::2] == (0, "")
    server.answer = prometheus(real.prometheus)
    status, out, err = run("--prometheus", server.url, "--job", "api")
    assert (status, err) == (0, ""), err


@BOUNDED
@given(data=st.data())
def test_any_findings_answer_is_a_report_or_one_line(
    server: Answering, real: Real, data: st.DataObject
) -> None:
    body = data.draw(json_bodies(real.findings))
    markdown = data.draw(st.booleans())
    server.answer = service(real.exposition.encode(), body)
    args = ["--url", server.url, "--format", "md" if markdown else "json"]
    assert_clean(*run(*args), markdown=markdown)


@BOUNDED
@given(data=st.data())
def test_any_metrics_answer_is_a_report_or_one_line(
    server: Answering, real: Real, data: st.DataObject
) -> None:
    exposition = data.draw(expositions(real.exposition))
    server.answer = service(exposition.encode(), json.dumps(real.findings).encode())
    assert_clean(*run("--url", server.url), markdown=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reports")


@BOUNDED
@given(data=st.data())
def test_any_report_file_to_compare_is_a_table_or_one_line(
    files: Path, real: Real, data: st.DataObject
) -> None:
    good, bad = files / "good.json", files / "bad.json"
    good.write_text(json.dumps(real.report))
    bad.write_bytes(data.draw(json_bodies(real.report)))
    pair = [str(good), str(bad)]
    if data.draw(st.booleans()):
        pair.reverse()
    assert_clean(*run("--compare", *pair), markdown=True)


def prometheus(answers: dict[str, Any]) -> Callable[[str], Answer]:
    """Prometheus's query API: for each query, the answer for the metric it asks about."""

    def answer(path: str) -> Answer:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query).get("query", [""])[0]
        name = next(n for n in re.findall(r"[a-z_]+", query) if n in answers)
        body = answers[name]
        return (
            200,
            "application/json",
            body if isinstance(body, bytes) else json.dumps(body).encode(),
        )

    return answer


@BOUNDED
@given(data=st.data())
def test_any_prometheus_answer_is_a_report_or_one_line(
    server: Answering, real: Real, data: st.DataObject
) -> None:
    answers: dict[str, Any] = dict(real.prometheus)
    name = data.draw(st.sampled_from(sorted(answers)))
    answers[name] = data.draw(json_bodies(answers[name]))
    server.answer = prometheus(answers)
    assert_clean(*run("--prometheus", server.url, "--job", "api"), markdown=True)


# The cases reported, each with the line it gets.

FINDING = {**FINDINGS[1], "detail": {**FINDINGS[1]["detail"], "stack": "app/reports.py:7 in f"}}


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"[" * 10_000 + b"]" * 10_000, "JSON nested deeper than 64 levels"),
        (
            b'{"findings": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
            "JSON nested deeper than 64 levels",
        ),
        (b'{"findings": ["a", "b"]}', 'findings[0] that is the string "a", not an object'),
        (b'{"findings": [3, 4]}', "findings[0] that is the number 3, not an object"),
        (b'{"findings": [[], []]}', "findings[0] that is a list, not an object"),
        (b'{"findings": {"kind": "n_plus_one"}}', "findings that is an object, not a list"),
        (
            json.dumps({"findings": [FINDINGS[0], FINDING]}).encode(),
            'findings[1].detail.stack that is the string "app/reports.py:7 in f", not a list',
        ),
        (b'{"findings": [{"kind": "n_plus_one"}]}', 'findings[0] with no "route"'),
        (b'{"pid": 1}', 'an object with no "findings"'),
        (b'["findings"]', "a list, not an object"),
        (b'{"findings": [], "pids": [1, "2"]}', 'pids[1] that is the string "2", not an integer'),
        (b'{"findings": NaN}', "NaN, which is not a JSON number"),
        (b'{"findings": [], "pid": 1e400}', "the number 1e400, beyond ±2**53"),
        (
            b"<html>a login page</html>",
            "text that is not JSON (Expecting value: line 1 column 1 (char 0))",
        ),
    ],
    ids=[
        "10000-deep",
        "10000-deep-findings",
        "strings",
        "numbers",
        "lists",
        "dict",
        "stack-string",
        "no-route",
        "no-findings",
        "list",
        "pid-string",
        "nan",
        "huge",
        "html",
    ],
)
def test_a_bad_findings_answer_is_one_line_naming_it(
    server: Answering, real: Real, body: bytes, problem: str
) -> None:
    server.answer = service(real.exposition.encode(), body)
    assert run("--url", server.url) == (
        1,
        "",
        f"perfmw report: {server.url}/perfmw/findings answered {problem}\n",
    )


def test_a_bad_metrics_answer_is_one_line_naming_it(server: Answering, real: Real) -> None:
    findings = json.dumps(real.findings).encode()
    count = "http_server_request_duration_seconds_count"
    cases = [
        (
            re.sub(rf"^({count}{{.*}}) .*$", r"\1 NaN", real.exposition, count=1, flags=re.M),
            f"answered a sample of {count} that is nan, not a number within ±2**53",
        ),
        (
            real.exposition.replace('le="0.005"', 'le="soon"', 1),
            "answered a sample of http_server_request_duration_seconds_bucket with no number "
            "as its le label",
        ),
        (
            "<html>a login page</html>\n",
            "did not answer a Prometheus exposition: invalid metric name:<html>a login page</html>",
        ),
    ]
    for exposition, problem in cases:
        server.answer = service(exposition.encode(), findings)
        assert run("--url", server.url) == (
            1,
            "",
            f"perfmw report: {server.url}/metrics {problem}\n",
        )


def test_what_does_not_speak_http_is_one_line(server: Answering) -> None:
    server.answer = lambda path: (0, "", b"SSH-2.0-OpenSSH_9.6\r\n")
    assert run("--url", server.url) == (
        1,
        "",
        f"perfmw report: {server.url}/metrics did not answer HTTP (BadStatusLine)\n",
    )
    assert run("--prometheus", server.url) == (
        1,
        "",
        f"perfmw report: Prometheus at {server.url} did not answer HTTP (BadStatusLine)\n",
    )


def test_a_bad_prometheus_answer_is_one_line_naming_it(server: Answering, real: Real) -> None:
    count, bucket = (f"http_server_request_duration_seconds_{n}" for n in ("count", "bucket"))
    asked = {name: counted_expr(name, '{job="api"}', "1h") for name in (count, bucket)}
    first = real.prometheus[count]["data"]["result"][0]
    cases = [
        (
            count,
            {"data": {"result": [{**first, "value": [1, "abc"]}]}},
            ('data.result[0].value[1] that is the string "abc", not a finite number in a string'),
        ),
        (
            count,
            {"data": {"result": [{**first, "value": [1, "1e400"]}]}},
            ('data.result[0].value[1] that is the string "1e400", not a finite number in a string'),
        ),
        (
            count,
            {"data": {"result": [{**first, "metric": ["job"]}]}},
            ("data.result[0].metric that is a list, not an object"),
        ),
        (
            count,
            {"data": {"result": [{**first, "value": [1]}]}},
            ("data.result[0].value that is a list of 1, not a list of two"),
        ),
        (count, {"data": "[]"}, 'data that is the string "[]", not an object'),
        (
            bucket,
            {"data": {"result": [{"metric": {}, "value": [1, "2"]}]}},
            (f"a sample of {bucket} with no number as its le label"),
        ),
    ]
    for name, change, problem in cases:
        answer = real.prometheus[name]
        data = (
            {**answer["data"], **change["data"]}
            if isinstance(change["data"], dict)
            else (change["data"])
        )
        server.answer = prometheus({**real.prometheus, name: {**answer, "data": data}})
        assert run("--prometheus", server.url, "--job", "api") == (
            1,
            "",
            f"perfmw report: Prometheus at {server.url} answered {problem} to {asked[name]}\n",
        )
    server.answer = prometheus({**real.prometheus, count: b"[" * 10_000 + b"]" * 10_000})
    assert run("--prometheus", server.url, "--job", "api") == (
        1,
        "",
        f"perfmw report: Prometheus at {server.url} answered JSON nested deeper than 64 levels "
        f"to {asked[count]}\n",
    )


def test_an_answer_or_file_over_64_mib_is_refused(
    server: Answering, real: Real, tmp_path: Path
) -> None:
    big = b" " * (MAX_BYTES + 1)  # read to one byte past the cap, no further
    server.answer = service(real.exposition.encode(), big)
    assert run("--url", server.url) == (
        1,
        "",
        f"perfmw report: {server.url}/perfmw/findings answered more than 64 MiB\n",
    )
    path = tmp_path / "big.json"
    path.write_bytes(big)
    assert run("--compare", str(path), str(path)) == (
        1,
        "",
        f"perfmw report: {path} holds more than 64 MiB\n",
    )
