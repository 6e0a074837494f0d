"""Query shapes: values become `?`, structure and key order stay."""

from __future__ import annotations

import pytest

from perfmw.shapes import shape_of


@pytest.mark.parametrize(
    ("name", "command", "shape"),
    [
        ("find", {"find": "agents", "filter": {"server_id": 7}}, "find db.agents {server_id: ?}"),
        (
            "find",
            {"find": "a", "filter": {"b": 1, "a": {"$gt": 3, "$lte": 9}}, "sort": {"a": -1}},
            "find db.a {b: ?, a: {$gt: ?, $lte: ?}} sort={a: -1}",
        ),
        (
            "find",
            {"find": "a", "filter": {"_id": {"$in": [1, 2, 3]}}, "projection": {"x": 1, "y": 1}},
            "find db.a {_id: {$in: [?]}} projection=[x, y]",
        ),
        (
            "find",
            {"find": "a", "filter": {"$or": [{"a": 1}, {"b": {"$nin": ["x"]}}]}},
            "find db.a {$or: [{a: ?}, {b: {$nin: [?]}}]}",
        ),
        (
            "find",
            {"find": "a", "filter": {"tags": {"$elemMatch": {"k": "v"}}, "doc": {"x": 1}}},
            "find db.a {tags: {$elemMatch: {k: ?}}, doc: ?}",
        ),
        (
            "aggregate",
            {
                "aggregate": "servers",
                "pipeline": [
                    {"$match": {"region": "eu"}},
                    {
                        "$lookup": {
                            "from": "agents",
                            "localField": "_id",
                            "foreignField": "s",
                            "as": "a",
                        }
                    },
                    {"$project": {"name": 1}},
                ],
                "cursor": {},
            },
            "aggregate db.servers [$match {region: ?}, $lookup agents, $project]",
        ),
        ("count", {"count": "c", "query": {"open": True}}, "count db.c {open: ?}"),
        ("distinct", {"distinct": "c", "key": "k", "query": {}}, "distinct db.c {} key=k"),
        (
            "update",
            {"update": "c", "updates": [{"q": {"_id": 1}, "u": {"$set": {"a": 2}}}] * 3},
            "update db.c {_id: ?} update=[$set]",
        ),
        ("delete", {"delete": "c", "deletes": [{"q": {"a": 5}, "limit": 1}]}, "delete db.c {a: ?}"),
        (
            "findAndModify",
            {"findAndModify": "c", "query": {"a": 1}, "update": {"$inc": {"n": 1}}},
            "findAndModify db.c {a: ?} update=[$inc]",
        ),
        ("insert", {"insert": "c", "documents": [{"secret": "x"}]}, "insert db.c"),
        ("createIndexes", {"createIndexes": "c", "indexes": []}, "createIndexes db.c"),
    ],
)
def test_shapes(name: str, command: dict[str, object], shape: str) -> None:
    assert shape_of(name, command, database="db") == shape


def test_values_never_appear_unless_captured() -> None:
    command = {"find": "users", "filter": {"email": "ann@example.com", "age": {"$gt": 41}}}
    assert "ann@example.com" not in shape_of("find", command, database="db")
    assert shape_of("find", command, capture_values=True, database="db") == (
        "find db.users {email: 'ann@example.com', age: {$gt: 41}}"
    )


def test_in_lists_of_any_length_share_a_shape() -> None:
    short = {"find": "a", "filter": {"x": {"$in": [1]}}}
    long = {"find": "a", "filter": {"x": {"$in": list(range(500))}}}
    assert shape_of("find", short) == shape_of("find", long) == "find a {x: {$in: [?]}}"


def test_key_order_is_kept() -> None:
    ab = shape_of("find", {"find": "c", "filter": {"a": 1, "b": 2}})
    ba = shape_of("find", {"find": "c", "filter": {"b": 2, "a": 1}})
    assert (ab, ba) == ("find c {a: ?, b: ?}", "find c {b: ?, a: ?}")


def test_long_captured_values_are_shortened() -> None:
    shape = shape_of("find", {"find": "c", "filter": {"a": "x" * 500}}, capture_values=True)
    assert shape == "find c {a: '" + "x" * 60 + "...}"
