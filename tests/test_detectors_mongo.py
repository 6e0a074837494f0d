"""MongoDB detectors as pure functions over made-up records; the ESR index rule."""

from __future__ import annotations

from perfmw.detectors import mongo
from perfmw.explain import covering_index, esr_index, judge
from perfmw.record import Query, RequestRecord
from perfmw.settings import Settings


def query(
    shape: str,
    start: float,
    seconds: float,
    *,
    operation: str = "find",
    collection: str = "c",
    location: str | None = None,
) -> Query:
    return Query(operation, collection, "db", shape, seconds, location, start, start + seconds)


def record(*queries: Query) -> RequestRecord:
    found = RequestRecord("/r", "GET")
    found.queries.extend(queries)
    return found


def kinds(found: list[object]) -> list[str]:
    return [f.kind for f in found]  # type: ignore[attr-defined]


def test_n_plus_one_one_finding_per_site_unlocated_repetitions_counted_with_the_first() -> None:
    shape = "find db.agents {server_id: ?}"
    queries = [query(shape, i, 0.001, location=None if i < 4 else "app.py:10") for i in range(20)]
    [found] = mongo.n_plus_one("/r", queries, threshold=5)
    assert (found.kind, found.location) == ("n_plus_one", "app.py:10")
    assert found.detail == {
        "collection": "c",
        "operation": "find",
        "shape": shape,
        "repetitions": 20,
    }
    assert mongo.n_plus_one("/r", queries[:4], threshold=5) == []


def test_concurrent_repetitions_are_n_plus_one_too() -> None:
    queries = [query("find db.c {a: ?}", 0.0, 0.01, location="app.py:3") for _ in range(5)]
    assert kinds(mongo.n_plus_one("/r", queries, threshold=5)) == ["n_plus_one"]


def test_consecutive_independent_reads_on_different_collections() -> None:
    run = [
        query("count db.a {status: ?}", 0.000, 0.004, operation="count", collection="a"),
        query(
            "count db.b {}", 0.005, 0.004, operation="count", collection="b", location="app.py:8"
        ),
        query("count db.c {open: ?}", 0.010, 0.004, operation="count", collection="c"),
    ]
    [found] = mongo.consecutive_queries("/r", run)
    assert found.location == "app.py:8"
    assert found.detail["collections"] == ["a", "b", "c"]
    assert round(found.detail["saving_seconds"], 6) == 0.008
    assert round(found.total_seconds, 6) == 0.008


def test_consecutive_site_is_the_second_read_even_when_the_first_is_located() -> None:
    # The first read of a run gets a line when it happens to be slow too: the finding must
    # stay on the same site, or one problem becomes two findings.
    run = [
        query("count db.a {}", 0.000, 0.006, collection="a", location="app.py:7"),
        query("count db.b {}", 0.007, 0.006, collection="b", location="app.py:8"),
    ]
    [found] = mongo.consecutive_queries("/r", run)
    assert found.location == "app.py:8"


def test_overlapping_dependent_or_cheap_reads_are_not_consecutive() -> None:
    overlapping = [
        query("count db.a {}", 0.0, 0.01, operation="count", collection="a"),
        query("count db.b {}", 0.005, 0.01, operation="count", collection="b"),
    ]
    dependent = [
        query("find db.servers {}", 0.0, 0.01, collection="servers"),
        query("find db.agents {server_id: {$in: [?]}}", 0.02, 0.01, collection="agents"),
    ]
    by_id = [
        query("find db.servers {}", 0.0, 0.01, collection="servers"),
        query("find db.owners {_id: ?}", 0.02, 0.01, collection="owners"),
    ]
    cheap = [
        query("count db.a {}", 0.0, 0.001, operation="count", collection="a"),
        query("count db.b {}", 0.002, 0.001, operation="count", collection="b"),
    ]
    same = [query("find db.a {x: ?}", i * 0.02, 0.01, collection="a") for i in range(3)]
    for queries in (overlapping, dependent, by_id, cheap, same):
        assert mongo.consecutive_queries("/r", queries) == []


def test_a_write_between_reads_breaks_the_run() -> None:
    queries = [
        query("count db.a {}", 0.00, 0.01, operation="count", collection="a"),
        query("insert db.log", 0.02, 0.01, operation="insert", collection="log"),
        query("count db.b {}", 0.04, 0.01, operation="count", collection="b"),
    ]
    assert mongo.consecutive_queries("/r", queries) == []


def test_slow_queries_are_grouped_per_shape_and_location() -> None:
    queries = [
        query("find db.c {a: ?}", 0, 0.3, location="app.py:1"),
        query("find db.c {a: ?}", 1, 0.2, location="app.py:1"),
        query("find db.c {b: ?}", 2, 0.05),
    ]
    [found] = mongo.slow_queries("/r", queries, threshold=0.1)
    assert (found.count, found.detail["duration_seconds"], found.location) == (2, 0.3, "app.py:1")
    assert round(found.total_seconds, 6) == 0.5


def test_unbounded_read_says_what_is_missing() -> None:
    big = query("find db.c {}", 0, 0.1)
    big.documents, big.has_limit, big.has_projection = 5000, False, True
    heavy = query("aggregate db.c [$match {}]", 0, 0.1, operation="aggregate")
    heavy.documents, heavy.reply_bytes = 10, 2 * 1024 * 1024
    heavy.has_limit, heavy.has_projection = True, False
    bounded = query("find db.c {}", 0, 0.1)
    bounded.documents = 5000  # has a limit and a projection
    small = query("find db.c {}", 0, 0.1)
    small.documents, small.has_limit = 1000, False
    found = mongo.unbounded_reads("/r", [big, heavy, bounded, small])
    assert [(f.detail["operation"], f.detail["missing"]) for f in found] == [
        ("find", ["limit"]),
        ("aggregate", ["projection"]),
    ]


def test_detect_runs_every_detector_with_the_settings() -> None:
    shape = "find db.c {a: ?}"
    found = mongo.detect(
        record(*(query(shape, i, 0.2, location="app.py:4") for i in range(3))),
        Settings(n_plus_one_threshold=3, slow_query_seconds=0.1),
    )
    assert sorted(kinds(found)) == ["n_plus_one", "slow_query"]


def test_esr_orders_equality_then_sort_then_range() -> None:
    keys = esr_index(
        {"age": {"$gt": 30}, "owner": "x", "region": {"$in": ["a", "b"]}},
        {"name": -1},
    )
    assert keys == [["owner", 1], ["region", 1], ["name", -1], ["age", 1]]
    assert esr_index({"$and": [{"a": 1}, {"b": {"$lt": 2}}]}, {}) == [["a", 1], ["b", 1]]


def test_judge_collscan_and_in_memory_sort() -> None:
    collscan = {"queryPlanner": {"winningPlan": {"stage": "COLLSCAN"}}}
    verdict = judge(collscan, {"find": "c", "filter": {"owner": "x"}}, "db", "c")
    assert (verdict.index, verdict.stage) == ([["owner", 1]], "COLLSCAN")
    sort = {"queryPlanner": {"winningPlan": {"stage": "SORT", "inputStage": {"stage": "IXSCAN"}}}}
    verdict = judge(sort, {"find": "c", "filter": {"a": 1}, "sort": {"b": 1}}, "db", "c")
    assert (verdict.index, verdict.stage) == ([["a", 1], ["b", 1]], "SORT")
    indexed = {
        "queryPlanner": {"winningPlan": {"stage": "FETCH", "inputStage": {"stage": "IXSCAN"}}}
    }
    assert judge(indexed, {"find": "c", "filter": {"a": 1}}, "db", "c").index is None
    aggregate = {"stages": [{"$cursor": {"queryPlanner": {"winningPlan": {"stage": "COLLSCAN"}}}}]}
    body = {"aggregate": "c", "pipeline": [{"$match": {"k": 1}}, {"$sort": {"t": -1}}]}
    assert judge(aggregate, body, "db", "c").index == [["k", 1], ["t", -1]]


def test_an_existing_index_starting_with_the_keys_covers_them() -> None:
    existing = {"_id_": [("_id", 1)], "owner_1_name_1": [("owner", 1), ("name", 1)]}
    assert covering_index([["_id", 1]], existing) == "_id_"
    assert covering_index([["_id", -1]], existing) == "_id_"  # read backwards
    assert covering_index([["owner", 1]], existing) == "owner_1_name_1"
    assert covering_index([["owner", 1], ["name", -1]], existing) is None
    assert covering_index([["name", 1]], existing) is None


def read(
    shape: str,
    start: float,
    values: int | None,
    *,
    collection: str = "users",
    location: str | None = None,
    operation: str = "find",
) -> Query:
    found = query(shape, start, 0.002, collection=collection, location=location)
    found.operation, found.values_hash = operation, values
    return found


def test_the_same_values_read_twice_is_one_duplicate_read_at_the_second_line() -> None:
    shape = "find db.users {_id: ?}"
    queries = [
        read(shape, 0.00, 7, location="app/deps.py:88"),
        read(shape, 0.01, 8),  # another user: the same shape, other values
        read(shape, 0.02, 7, location="app/deps.py:103"),
        read(shape, 0.03, 7, location="app/deps.py:103"),
    ]
    [found] = mongo.duplicate_reads("/r", queries)
    assert (found.kind, found.location) == ("duplicate_read", "app/deps.py:103")
    assert found.detail == {
        "collection": "users",
        "operation": "find",
        "shape": shape,
        "repetitions": 3,
        "first_location": "app/deps.py:88",
    }
    assert round(found.total_seconds, 6) == 0.004  # the two reads that were not needed


def test_a_write_between_two_reads_makes_the_second_fresh() -> None:
    shape = "find db.users {_id: ?}"
    renamed = [
        read(shape, 0.00, 7),
        query("update db.users {_id: ?} update=[$set]", 0.01, 0.002, operation="update"),
        read(shape, 0.02, 7),
    ]
    renamed[1].collection = "users"
    elsewhere = [read(shape, 0.0, 7), read("insert db.log", 0.01, None, operation="insert")]
    elsewhere += [read(shape, 0.02, 7, location="app.py:9")]
    elsewhere[1].collection = "log"
    unhashed = [read(shape, 0.0, None), read(shape, 0.01, None)]  # too large to compare
    failed = [read(shape, 0.0, 7), read(shape, 0.01, 7)]
    failed[1].failed = True
    assert mongo.duplicate_reads("/r", renamed) == []
    assert kinds(mongo.duplicate_reads("/r", elsewhere)) == ["duplicate_read"]
    assert mongo.duplicate_reads("/r", unhashed) == []
    assert mongo.duplicate_reads("/r", failed) == []


def test_a_read_filtering_on_an_earlier_reply_of_the_run_ends_the_run() -> None:
    run = [
        query("find db.tokens {token: ?}", 0.000, 0.006, collection="tokens"),
        query("find db.plans {tier: ?}", 0.007, 0.006, collection="plans", location="app.py:5"),
        query("find db.accounts {login: ?}", 0.014, 0.006, collection="accounts"),
    ]
    run[0].reply_hashes = {hash("t-1"), hash("ada")}
    run[1].filter_hashes = {hash("gold")}
    run[2].filter_hashes = {hash("ada")}  # the login the token held
    [found] = mongo.consecutive_queries("/r", run)
    # tokens then plans could have run together; accounts had to wait for the token.
    assert found.detail["collections"] == ["tokens", "plans"]
    assert found.location == "app.py:5"
    run[2].filter_hashes = {hash("bob")}
    [found] = mongo.consecutive_queries("/r", run)
    assert found.detail["collections"] == ["tokens", "plans", "accounts"]
