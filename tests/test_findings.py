"""The findings store, their merge across processes, the workers' shared files, their counters."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

import perfmw
from perfmw.exporters import shared_findings
from perfmw.findings import Finding, FindingsStore, merge
from support import samples


def finding(line: int, seconds: float = 0.1, seen: float = 1.0, **detail: Any) -> Finding:
    return Finding(
        "n_plus_one", "/r", f"app.py:{line}", seconds, dict(detail), first_seen=seen, last_seen=seen
    )


def test_the_store_keeps_the_most_recently_seen_up_to_its_cap() -> None:
    store = FindingsStore(max_findings=3)
    for line in range(5):
        store.add(finding(line))
    store.add(finding(2, seconds=0.5))  # seen again: the most recent now
    store.add(finding(9))
    kept = {f.location: (f.count, round(f.total_seconds, 6)) for f in store.snapshot()}
    assert kept == {"app.py:2": (2, 0.6), "app.py:4": (1, 0.1), "app.py:9": (1, 0.1)}
    assert len(store) == 3


def serialized(line: int, count: int, seconds: float, seen: float, **detail: Any) -> dict[str, Any]:
    return {
        "kind": "loop_stall",
        "route": "/r",
        "count": count,
        "total_seconds": seconds,
        "location": f"app.py:{line}",
        "via": None,
        "detail": detail,
        "first_seen": seen,
        "last_seen": seen,
    }


def test_merge_sums_each_site_keeps_its_latest_example_and_the_cap() -> None:
    one = [serialized(1, 2, 0.4, 10.0, cause="cpu"), serialized(2, 1, 0.1, 11.0)]
    two = [serialized(1, 3, 0.6, 12.0, cause="blocking"), serialized(3, 1, 0.2, 5.0)]
    merged = merge([one, two])
    assert [(f["location"], f["count"], f["total_seconds"]) for f in merged] == [
        ("app.py:1", 5, 1.0),
        ("app.py:3", 1, 0.2),
        ("app.py:2", 1, 0.1),
    ]
    assert merged[0]["detail"] == {"cause": "blocking"}  # the one seen last
    assert (merged[0]["first_seen"], merged[0]["last_seen"]) == (10.0, 12.0)
    # At most two sites: the least recently seen (app.py:3, at 5.0) goes.
    assert [f["location"] for f in merge([one, two], max_findings=2)] == ["app.py:1", "app.py:2"]


def test_a_stalls_wait_of_other_requests_adds_up_in_the_store_and_across_workers() -> None:
    # delayed_seconds grows as total_seconds does; the rest of the detail is the latest's.
    store = FindingsStore()
    for seen, delayed, waiting in ((1.0, 0.3, 2), (2.0, 0.45, 3), (3.0, 0.0, 0)):
        stall = Finding(
            "loop_stall",
            "/r",
            "app.py:7",
            0.15,
            {"cause": "blocking", "delayed_seconds": delayed, "requests_waiting": waiting},
            first_seen=seen,
            last_seen=seen,
        )
        store.add(stall)
    (entry,) = store.snapshot()
    assert (entry.count, round(entry.total_seconds, 9)) == (3, 0.45)
    assert entry.detail == {"cause": "blocking", "delayed_seconds": 0.75, "requests_waiting": 0}
    one = [serialized(1, 2, 0.3, 12.0, delayed_seconds=0.6, requests_waiting=1)]
    two = [serialized(1, 1, 0.15, 10.0, delayed_seconds=0.45, requests_waiting=3)]
    (merged,) = merge([one, two])  # the later one first: its detail is kept, the waits added
    assert merged["detail"] == {"delayed_seconds": 0.6 + 0.45, "requests_waiting": 1}
    assert merge([two, one])[0]["detail"] == merged["detail"]


@pytest.fixture
def shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> perfmw.Perf:
    """A Perf sharing its findings through `tmp_path`, as a worker of a multiprocess service."""
    perf = perfmw.Perf(perfmw.Settings(max_findings=50), registry=CollectorRegistry())
    # Only the files, not prometheus-client's multiprocess mode (set before it is imported).
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    shared_findings.join(perf)
    return perf


def another_worker(directory: Path, perf: perfmw.Perf, pid: int, findings: list[Any]) -> Path:
    app = shared_findings._apps[perf]
    path = directory / f"perfmw_findings_{app}_{pid}.json"
    path.write_text(json.dumps({"perfmw_findings": 1, "pid": pid, "findings": findings}))
    return path


def test_each_worker_answers_for_all_of_them(shared: perfmw.Perf, tmp_path: Path) -> None:
    shared.add_findings([Finding("loop_stall", "/r", "app.py:1", 0.3, {"cause": "cpu"})], None)
    another_worker(tmp_path, shared, 999_999, [serialized(1, 4, 1.2, 2e9, cause="blocking")])
    result = shared_findings.read(shared)
    assert result is not None
    found, pids = result
    assert pids == sorted([os.getpid(), 999_999])
    assert [(f["location"], f["count"], f["detail"]) for f in found] == [
        ("app.py:1", 5, {"cause": "blocking"})
    ]
    assert found[0]["total_seconds"] == pytest.approx(1.5)
    # Its own file is there for the others, replaced whole.
    app = shared_findings._apps[shared]
    own = json.loads((tmp_path / f"perfmw_findings_{app}_{os.getpid()}.json").read_text())
    assert own["pid"] == os.getpid() and own["findings"][0]["count"] == 1


def test_a_torn_or_foreign_file_is_skipped_and_logged_once(
    shared: perfmw.Perf, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shared.add_findings([Finding("loop_stall", "/r", "app.py:1", 0.3, {"cause": "cpu"})], None)
    torn = another_worker(tmp_path, shared, 11, [serialized(1, 4, 1.2, 3.0)])
    torn.write_bytes(torn.read_bytes()[:40])  # a worker killed while writing
    foreign = another_worker(tmp_path, shared, 12, [{"kind": "x"}])
    with caplog.at_level(logging.WARNING, logger="perfmw"):
        for _ in range(3):
            result = shared_findings.read(shared)
            assert result is not None
            found, pids = result
            assert (pids, [f["count"] for f in found]) == ([os.getpid()], [1])
    skipped = sorted(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert skipped == [
        f"perfmw: skipped the findings file {torn}: not JSON (a worker stopped while writing it?)",
        f"perfmw: skipped the findings file {foreign}: not a perfmw findings file",
    ]


def test_a_workers_file_is_bounded_keeping_the_most_recent(
    shared: perfmw.Perf, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shared_findings, "MAX_FILE_BYTES", 3000)
    for line in range(40):
        shared.findings.add(finding(line, seen=1000.0 + line, shape="x" * 50))
    shared_findings.write(shared)
    path = tmp_path / f"perfmw_findings_{shared_findings._apps[shared]}_{os.getpid()}.json"
    assert path.stat().st_size <= 3000
    kept = [f["location"] for f in json.loads(path.read_text())["findings"]]
    assert kept and len(kept) < 40
    assert kept == [f"app.py:{line}" for line in range(39, 39 - len(kept), -1)]
    # A file past the bound (written by something else) is not read.
    another_worker(tmp_path, shared, 13, [serialized(1, 1, 0.1, 1.0, pad="y" * 4000)])
    result = shared_findings.read(shared)
    assert result is not None and result[1] == [os.getpid()]


def counted(text: str, name: str) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["kind"], dict(labels)["location"]): value
        for (sample_name, labels), value in samples(text).items()
        if sample_name == name
    }


def test_findings_are_counted_by_kind_route_and_a_bounded_set_of_lines() -> None:
    registry = CollectorRegistry()
    perf = perfmw.Perf(perfmw.Settings(max_findings=3), registry=registry)
    found = [finding(line, seconds=0.25) for line in range(5)]
    found.append(Finding("loop_stall", "/r", None, 0.5, {"cause": "cpu"}))
    perf.add_findings(found, None)
    perf.add_findings([finding(1, seconds=0.25)], None)
    text = generate_latest(registry).decode()
    # Three lines kept; app.py:3, app.py:4 and the stall without a line (<unknown>) past them.
    assert counted(text, "perfmw_findings_total") == {
        ("n_plus_one", "app.py:0"): 1,
        ("n_plus_one", "app.py:1"): 2,
        ("n_plus_one", "app.py:2"): 1,
        ("n_plus_one", "<other>"): 2,
        ("loop_stall", "<other>"): 1,
    }
    seconds = counted(text, "perfmw_finding_seconds_total")
    assert seconds[("n_plus_one", "app.py:1")] == pytest.approx(0.5)
    assert seconds[("loop_stall", "<other>")] == pytest.approx(0.5)
    perf.shutdown()


def test_a_findings_counter_carries_the_trace_of_its_latest_finding() -> None:
    registry = CollectorRegistry()
    perf = perfmw.Perf(registry=registry)
    perf.sink.observe_findings([finding(7)], {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}, 10)
    text = openmetrics(registry).decode()
    (line,) = [
        line
        for line in text.splitlines()
        if line.startswith("perfmw_findings_total{") and "app.py:7" in line
    ]
    assert ' 1.0 # {trace_id="4bf92f3577b34da6a3ce929d0e0e4736"} 1.0 ' in line
    perf.shutdown()
