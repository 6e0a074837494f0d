"""Cost of perfmw's pymongo listeners, against OpenTelemetry's pymongo instrumentation.

1. Listener cost per command (started + succeeded), fed the same real events recorded from the
   embedded MongoDB server, inside a request record (shape included). Budget (issue 3): at most
   5 µs, and at most a third of OpenTelemetry's CommandTracer (SDK provider, dropping exporter,
   under a server span) in the same run. Each listener's own cost is its round less the same
   round through listeners that do nothing (the replay loop and pymongo's two calls per
   command, which every listener is called through).
2. End to end, per `find_one` against the embedded server (in its own process): a client with
   perfmw's listeners inside a request record, against the same client without listeners and
   with listeners that do nothing (pymongo's own cost of publishing events); sync and async.

Times on a shared machine swing with what else runs; where valgrind is installed, the listener
cost of 1. is also counted in instructions per command (callgrind, exact whatever the machine is
doing), perfmw's against OpenTelemetry's: the ratio that the budget's third is checked on.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient, MongoClient, monitoring

import perfmw
from benchmarks._callgrind import probe_instructions
from perfmw import mongo
from perfmw.record import RequestRecord, _current

ROUNDS = 15
EVENTS_PER_ROUND = 4_000
QUERIES_PER_REQUEST = 4  # a fresh record every few commands, as in real requests
E2E_CALLS = 500
E2E_ROUNDS = 11


class _Recorder(monitoring.CommandListener):
    def __init__(self) -> None:
        self.events: list[Any] = []

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.events.append(event)

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self.events.append(event)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self.events.append(event)


class _NoopCommands(monitoring.CommandListener):
    def started(self, event: Any) -> None:
        return None

    def succeeded(self, event: Any) -> None:
        return None

    def failed(self, event: Any) -> None:
        return None


class _NoopPool(monitoring.ConnectionPoolListener):
    def __getattribute__(self, name: str) -> Any:
        if name.startswith(("connection_", "pool_")):
            return _ignore
        return super().__getattribute__(name)


def _ignore(event: Any) -> None:
    return None


def record_events(uri: str) -> list[tuple[Any, Any]]:
    """(started, succeeded) pairs of real find_one / find / count commands."""
    recorder = _Recorder()
    with MongoClient(uri, event_listeners=[recorder]) as client:
        items = client.bench.items
        for i in range(40):
            items.find_one({"_id": i})
            items.find_one({"owner": f"o{i % 7}"}, {"name": 1})
            list(items.find({"owner": f"o{i % 7}", "n": {"$gt": i}}).sort("n", -1).limit(5))
            items.count_documents({"owner": "o1"})
    started = {
        e.request_id: e
        for e in recorder.events
        if isinstance(e, monitoring.CommandStartedEvent)
        and e.command_name not in mongo.HOUSEKEEPING
    }
    return [
        (started[e.request_id], e)
        for e in recorder.events
        if isinstance(e, monitoring.CommandSucceededEvent) and e.request_id in started
    ]


def perfmw_round(pairs: list[tuple[Any, Any]], perf: Any, listener: Any = None) -> float:
    """µs per command through perfmw's listener (or `listener`, fed the same way)."""
    listener = mongo.CommandListener() if listener is None else listener
    records: list[RequestRecord | None] = [
        RequestRecord("/bench", "GET", "/bench", "http", perf)
        for _ in range(EVENTS_PER_ROUND // QUERIES_PER_REQUEST + 1)
    ]
    n = len(pairs)
    started_at = time.perf_counter()
    for i in range(EVENTS_PER_ROUND):
        if i % QUERIES_PER_REQUEST == 0:
            # The next request; the one before ends, and is freed as a served request is (kept
            # to the round's end, its queries would age through the collector's generations).
            _current.set(records[i // QUERIES_PER_REQUEST])
            records[i // QUERIES_PER_REQUEST] = None
        first, last = pairs[i % n]
        listener.started(first)
        listener.succeeded(last)
    elapsed = time.perf_counter() - started_at
    _current.set(None)
    return elapsed / EVENTS_PER_ROUND * 1e6


def otel_round(pairs: list[tuple[Any, Any]], tracer: Any) -> float:
    from opentelemetry.instrumentation.pymongo import CommandTracer
    from opentelemetry.trace import SpanKind

    listener = CommandTracer(tracer)
    n = len(pairs)
    with tracer.start_as_current_span("GET /bench", kind=SpanKind.SERVER):
        started_at = time.perf_counter()
        for i in range(EVENTS_PER_ROUND):
            first, last = pairs[i % n]
            listener.started(first)
            listener.succeeded(last)
        elapsed = time.perf_counter() - started_at
    return elapsed / EVENTS_PER_ROUND * 1e6


def dropping_tracer() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    class Dropping(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Dropping()))
    return provider.get_tracer("bench")


def sync_e2e(client: MongoClient[Any], perf: Any) -> float:
    items = client.bench.items
    token = _current.set(RequestRecord("/bench", "GET", "/bench", "http", perf)) if perf else None
    started_at = time.perf_counter()
    for i in range(E2E_CALLS):
        if perf is not None and i % QUERIES_PER_REQUEST == 0:
            _current.set(RequestRecord("/bench", "GET", "/bench", "http", perf))
        items.find_one({"_id": i % 50})
    elapsed = time.perf_counter() - started_at
    if token is not None:
        _current.reset(token)
    return elapsed / E2E_CALLS * 1e6


async def async_e2e(client: AsyncMongoClient[Any], perf: Any) -> float:
    items = client.bench.items
    started_at = time.perf_counter()
    for i in range(E2E_CALLS):
        if perf is not None and i % QUERIES_PER_REQUEST == 0:
            _current.set(RequestRecord("/bench", "GET", "/bench", "http", perf))
        await items.find_one({"_id": i % 50})
    elapsed = time.perf_counter() - started_at
    _current.set(None)
    return elapsed / E2E_CALLS * 1e6


#: Rounds replayed for an instruction count: (few, many); their difference cancels start-up.
PROBE_ROUNDS = (1, 6)


def probe(listener: str, rounds: int, events: str) -> None:
    """What valgrind counts: `rounds` rounds of recorded events through one listener."""
    pairs = pickle.loads(Path(events).read_bytes())
    if listener in ("perfmw", "no-op"):
        perf = perfmw.Perf(perfmw.Settings(trace=False), CollectorRegistry())
        for _ in range(rounds):
            perfmw_round(pairs, perf, None if listener == "perfmw" else _NoopCommands())
        perf.shutdown()
    else:
        tracer = dropping_tracer()
        for _ in range(rounds):
            otel_round(pairs, tracer)


def _instructions(listener: str, rounds: int, events: str) -> int:
    return probe_instructions("mongo_listeners", listener, str(rounds), events)


def instructions(pairs: list[tuple[Any, Any]]) -> tuple[float, float]:
    """Instructions per command (started + succeeded), each listener's own: perfmw's and
    OpenTelemetry's, less the no-op listener's."""
    with tempfile.TemporaryDirectory() as folder:
        events = Path(folder, "events.pickle")
        events.write_bytes(pickle.dumps(pairs))
        jobs = [(listener, n) for listener in ("perfmw", "otel", "no-op") for n in PROBE_ROUNDS]
        with ThreadPoolExecutor(max_workers=2) as pool:
            counts = dict(
                zip(jobs, pool.map(lambda job: _instructions(*job, str(events)), jobs), strict=True)
            )
    few, many = PROBE_ROUNDS
    mine, otel, noop = (
        (counts[(listener, many)] - counts[(listener, few)]) / ((many - few) * EVENTS_PER_ROUND)
        for listener in ("perfmw", "otel", "no-op")
    )
    return mine - noop, otel - noop


_SERVER = """
import sys, tempfile
from secantus import SecantusDBServer
with tempfile.TemporaryDirectory() as storage, SecantusDBServer(storage_path=storage) as server:
    print(server.uri, flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def embedded_server() -> Iterator[str]:
    """The embedded MongoDB in its own process: in this one, its threads would compete with
    the client for the GIL and the measure would be of the scheduling, not of the listeners."""
    server = subprocess.Popen(
        [sys.executable, "-c", _SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        yield server.stdout.readline().strip()
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)


def main() -> None:
    perf = perfmw.Perf(perfmw.Settings(trace=False), CollectorRegistry())
    with embedded_server() as uri:
        db = SimpleNamespace(uri=uri)
        with MongoClient(db.uri) as setup:
            setup.bench.items.insert_many(
                [{"_id": i, "owner": f"o{i % 7}", "n": i, "name": f"item-{i}"} for i in range(50)]
            )
        pairs = record_events(db.uri)
        tracer = dropping_tracer()
        ours: list[float] = []
        theirs: list[float] = []
        for _ in range(ROUNDS):  # interleaved, so all see the same machine; own cost per round
            noop = perfmw_round(pairs, perf, _NoopCommands())
            ours.append(perfmw_round(pairs, perf) - noop)
            theirs.append(otel_round(pairs, tracer) - noop)
        mine, otel = statistics.median(ours), statistics.median(theirs)
        print(f"listener cost per command (started + succeeded), {len(pairs)} recorded commands")
        print("(each less a no-op listener fed the same way: the listener's own cost)")
        print("| listener | median µs/command | ratio to OpenTelemetry |")
        print("|---|---|---|")
        print(f"| perfmw | {mine:.2f} | {mine / otel:.2f} |")
        print(f"| opentelemetry-instrumentation-pymongo | {otel:.2f} | 1.00 |")
        verdict = "within" if mine <= 5 and mine <= otel / 3 else "OVER"
        print(f"budget (<= 5 µs and <= 1/3 of OpenTelemetry): {verdict}\n")
        if shutil.which("valgrind"):
            mine_i, otel_i = instructions(pairs)
            print("the same, in instructions per command (callgrind)")
            print("| listener | instructions/command | ratio to OpenTelemetry |")
            print("|---|---|---|")
            print(f"| perfmw | {mine_i:,.0f} | {mine_i / otel_i:.2f} |")
            print(f"| opentelemetry-instrumentation-pymongo | {otel_i:,.0f} | 1.00 |")
            verdict = "within" if mine_i <= otel_i / 3 else "OVER"
            print(f"budget (<= 1/3 of OpenTelemetry) in instructions: {verdict}\n")
        else:
            print("(valgrind not installed: no instruction counts)\n")

        listener_sets: dict[str, list[Any]] = {
            "none": [],
            "no-op": [_NoopCommands(), _NoopPool()],  # what pymongo's events cost by themselves
            "perfmw": perfmw.mongo_listeners(),
        }
        sync_times: dict[str, list[float]] = {name: [] for name in listener_sets}
        sync_clients = {
            name: MongoClient(db.uri, event_listeners=listeners)
            for name, listeners in listener_sets.items()
        }
        for _ in range(E2E_ROUNDS):
            for name, client in sync_clients.items():
                sync_times[name].append(sync_e2e(client, perf if name == "perfmw" else None))
        for client in sync_clients.values():
            client.close()

        async def run_async() -> dict[str, list[float]]:
            times: dict[str, list[float]] = {name: [] for name in listener_sets}
            clients = {
                name: AsyncMongoClient(db.uri, event_listeners=listeners)
                for name, listeners in listener_sets.items()
            }
            for _ in range(E2E_ROUNDS):
                for name, client in clients.items():
                    with_record = perf if name == "perfmw" else None
                    times[name].append(await async_e2e(client, with_record))
            for client in clients.values():
                await client.close()
            return times

        async_times = asyncio.run(run_async())
        print(f"end to end, per find_one against the embedded server ({E2E_CALLS} calls x rounds)")
        # The server's own time varies with the machine's load: the minimum is shown beside the
        # median as the steadier of the two.
        print("| client | statistic | no listener µs | no-op listeners µs | perfmw µs | ratio |")
        print("|---|---|---|---|---|---|")
        for name, times in (("MongoClient", sync_times), ("AsyncMongoClient", async_times)):
            for statistic, pick in (("median", statistics.median), ("min", min)):
                none, noop, ours_us = (pick(times[k]) for k in ("none", "no-op", "perfmw"))
                print(
                    f"| {name} | {statistic} | {none:.0f} | {noop:.0f} | {ours_us:.0f} "
                    f"| {ours_us / none:.3f} |"
                )
    perf.shutdown()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--probe"]:
        probe(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
