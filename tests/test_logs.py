"""The log sink: one readable sentence per finding, for every kind (the exact lines)."""

from __future__ import annotations

import logging

import pytest

from perfmw.detectors import mongo
from perfmw.exporters import logs
from perfmw.exporters.logs import describe
from perfmw.findings import KINDS, Finding
from perfmw.record import Query

VIA = "pymongo.asynchronous.collection.AsyncCollection.find_one"


def query(shape: str, start: float, seconds: float, collection: str, **fields: object) -> Query:
    found = Query(shape.partition(" ")[0], collection, "db", shape, seconds, None, start)
    found.finished_at = start + seconds
    for name, value in fields.items():
        setattr(found, name, value)
    return found


def n_plus_one() -> Finding:
    shape = "find db.agents {server_id: ?}"
    queries = [query(shape, i, 0.001, "agents", location="app/routes.py:40") for i in range(12)]
    [found] = mongo.n_plus_one("/servers", queries, threshold=5)
    return found


def duplicate_read() -> Finding:
    shape = "find db.users {_id: ?}"
    queries = [
        query(shape, 0.0, 0.002, "users", location="api/deps.py:88", values_hash=7),
        query(shape, 0.1, 0.002, "users", location="api/deps.py:103", values_hash=7, via=VIA),
    ]
    [found] = mongo.duplicate_reads("/me", queries)
    return found


def consecutive_queries() -> Finding:
    run = [
        query("count db.servers {status: ?}", 0.00, 0.010, "servers"),
        query("count db.agents {}", 0.02, 0.010, "agents", location="app/dashboard.py:12"),
    ]
    [found] = mongo.consecutive_queries("/dashboard", run)
    return found


def slow_query() -> Finding:
    queries = [query("find db.servers {owner: ?}", 0, 0.25, "servers", location="app/s.py:80")]
    [found] = mongo.slow_queries("/servers/by-owner", queries, threshold=0.1)
    return found


def unbounded_read() -> Finding:
    export = query("find db.agents {}", 0, 0.5, "agents", location="app/export.py:9")
    export.documents, export.has_limit = 5000, False
    [found] = mongo.unbounded_reads("/agents/export", [export])
    return found


FINDINGS = {
    "n_plus_one": (
        n_plus_one,
        "N+1 queries on /servers: find on agents repeated 12 times at app/routes.py:40",
    ),
    "duplicate_read": (
        duplicate_read,
        "duplicate read on /me: find on users sent 2 times with the same values, again at "
        f"api/deps.py:103 via {VIA} (first at api/deps.py:88): read it once and pass it down",
    ),
    "consecutive_queries": (
        consecutive_queries,
        "independent queries awaited one after another on /dashboard (servers, agents) at "
        "app/dashboard.py:12: running them concurrently would save 10 ms",
    ),
    "slow_query": (
        slow_query,
        "slow query on /servers/by-owner: find on servers took 250 ms at app/s.py:80",
    ),
    "missing_index": (
        lambda: Finding(
            "missing_index",
            "/servers/by-owner",
            "app/s.py:80",
            0.05,
            {"collection": "servers", "operation": "find", "index": [["owner", 1]]},
        ),
        "missing index on /servers/by-owner: find on servers scans the collection at "
        "app/s.py:80; an index {owner: 1} would serve it",
    ),
    "unbounded_read": (
        unbounded_read,
        "unbounded read on /agents/export: find on agents returned 5000 documents with no "
        "limit at app/export.py:9",
    ),
    "loop_stall": (
        lambda: Finding(
            "loop_stall",
            "/reports/blocking",
            "app/reports.py:7",
            0.2,
            {"cause": "blocking", "duration_seconds": 0.2, "stack": ["app/reports.py:7 in r"]},
        ),
        "event loop stalled 200 ms (blocking) on /reports/blocking at app/reports.py:7\n"
        "    app/reports.py:7 in r",
    ),
    "blocking_call": (
        lambda: Finding(
            "blocking_call",
            "/servers/legacy",
            "app/legacy.py:3",
            0.004,
            {"kind": "pymongo-sync", "operation": "find", "collection": "servers"},
        ),
        "blocking call on /servers/legacy: pymongo-sync (find on servers) on the event loop's "
        "thread for 4 ms at app/legacy.py:3",
    ),
    "large_response": (
        lambda: Finding(
            "large_response",
            "/agents/export",
            "app/export.py:5",
            0.3,
            {"bytes": 900000, "problems": ["uncompressed", "no_cache_headers"], "method": "GET"},
        ),
        "large response on /agents/export: 900000 bytes (uncompressed and no cache headers) "
        "from app/export.py:5",
    ),
}


def test_every_kind_has_its_sentence() -> None:
    assert sorted(FINDINGS) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_each_finding_is_one_sentence(kind: str) -> None:
    make, sentence = FINDINGS[kind]
    finding = make()
    assert finding.kind == kind
    text = describe(finding)
    assert text == sentence
    # One line; only a stall's stack follows, each frame on a line of its own.
    assert len(text.splitlines()) == (2 if kind == "loop_stall" else 1)
    assert "{'" not in text


def test_a_stall_names_the_other_requests_that_waited_for_it() -> None:
    make, _sentence = FINDINGS["loop_stall"]
    finding = make()
    finding.detail.update(requests_waiting=3, delayed_seconds=0.6)
    assert describe(finding).splitlines()[0] == (
        "event loop stalled 200 ms (blocking) on /reports/blocking, 3 other requests waiting, "
        "at app/reports.py:7"
    )


def test_a_blocking_call_names_the_other_requests_that_waited_for_it() -> None:
    make, _sentence = FINDINGS["blocking_call"]
    finding = make()
    finding.detail.update(requests_waiting=1, delayed_seconds=0.004)
    assert describe(finding) == (
        "blocking call on /servers/legacy: pymongo-sync (find on servers) on the event loop's "
        "thread for 4 ms, 1 other request waiting, at app/legacy.py:3"
    )


def test_a_duplicate_read_whose_first_line_is_not_known_yet_says_so() -> None:
    finding = duplicate_read()
    finding.detail["first_location"] = None
    finding.via = None
    assert describe(finding) == (
        "duplicate read on /me: find on users sent 2 times with the same values, again at "
        "api/deps.py:103 (first at an earlier line): read it once and pass it down"
    )


def test_the_application_strings_of_a_duplicate_read_stay_on_its_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    finding = duplicate_read()
    finding.route = "/me\nperfmw: forged"
    finding.location = "api/x.py:1\nfake"
    finding.detail["first_location"] = "api/y.py:2\rfake"
    with caplog.at_level(logging.WARNING, logger="perfmw"):
        logs.log_findings([finding])
    [line] = [r.getMessage() for r in caplog.records if r.name == "perfmw"]
    assert line == (
        "perfmw: duplicate read on /me\\nperfmw: forged: find on users sent 2 times with the "
        f"same values, again at api/x.py:1\\nfake via {VIA} (first at api/y.py:2\\rfake): read "
        "it once and pass it down"
    )
