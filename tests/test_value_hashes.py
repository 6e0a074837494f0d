"""Reads' values as hashes, taken by the listener from real commands and replies of the
embedded MongoDB wire server; the bounds on every walk and every set."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from bson import ObjectId, Regex
from prometheus_client import CollectorRegistry
from pymongo import MongoClient

import perfmw
from perfmw import _value_hashes, mongo


@pytest.fixture
def db(mongo_uri: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A fresh database of a client perfmw observes; every reply hashed, however fast."""
    monkeypatch.setattr(mongo, "REPLY_HASH_MIN_SECONDS", 0.0)
    perf = perfmw.Perf(registry=CollectorRegistry())
    mongo.register_listeners()
    name = "h" + uuid.uuid4().hex[:10]
    with MongoClient(mongo_uri) as client:
        yield client[name]
        client.drop_database(name)
    perf.shutdown()


def test_a_read_with_the_same_values_has_the_same_hash(db: Any) -> None:
    db.users.insert_many([{"_id": i, "name": f"u{i}", "team": "a"} for i in range(3)])
    with perfmw.track("reads") as record:
        db.users.find_one({"_id": 1})
        db.users.find_one({"_id": 1})
        db.users.find_one({"_id": 2})  # other values
        list(db.users.find({"_id": 1}))  # no limit: another result
        list(db.users.find({"team": "a"}).skip(1))
        list(db.users.find({"team": "a"}).skip(2))  # another page
        db.users.count_documents({"team": {"$in": ["a", "b"]}})
        db.users.count_documents({"team": {"$in": ["a", "b"]}})
    hashes = [q.values_hash for q in record.queries]
    assert None not in hashes
    assert hashes[0] == hashes[1]
    assert hashes[6] == hashes[7]
    assert len(set(hashes)) == 6
    assert record.read_hashes == set(hashes)


def test_a_reply_holds_at_most_32_hashes_of_its_first_8_documents(db: Any) -> None:
    wide = {f"field{i}": f"value-{i}" for i in range(40)}
    db.wide.insert_one({"_id": "w", **wide})
    db.narrow.insert_many([{"_id": i, "n": f"n{i}"} for i in range(12)])
    with perfmw.track("replies") as record:
        db.wide.find_one({"_id": "w"})
        db.narrow.find_one({"_id": 3}, {"_id": 0})
        list(db.narrow.find({}, {"_id": 0}).sort("_id", 1))  # 12 documents: the first 8 hashed
    wide_read, narrow_read, listed = record.queries
    assert wide_read.reply_hashes is not None
    assert len(wide_read.reply_hashes) == _value_hashes.MAX_HASHES == 32
    assert narrow_read.reply_hashes == {hash("n3")}
    assert listed.reply_hashes == {hash(f"n{i}") for i in range(8)}


def test_a_reply_faster_than_the_threshold_is_not_hashed(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    db.users.insert_one({"_id": 1, "name": "ada"})
    monkeypatch.setattr(mongo, "REPLY_HASH_MIN_SECONDS", 3600.0)
    with perfmw.track("fast") as record:
        db.users.find_one({"_id": 1})
    assert record.queries[0].reply_hashes is None


def test_a_request_keeps_the_hashes_of_its_first_reads_only(
    db: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mongo, "MAX_READ_HASHES", 3)
    db.users.insert_many([{"_id": i} for i in range(6)])
    with perfmw.track("many") as record:
        for i in range(6):
            db.users.find_one({"_id": i})
        db.users.find_one({"_id": 0})  # one of the first three, again
    assert record.read_hashes is not None
    assert len(record.read_hashes) == 3
    assert record.read_hashes == {q.values_hash for q in record.queries[:3]}
    assert record.queries[-1].location is not None  # located as a read sent again


def test_what_cannot_be_compared_gets_no_hash() -> None:
    shape = "find db.c {a: ?}"
    many = {"find": "c", "filter": {"a": {"$in": [ObjectId() for _ in range(100)]}}}
    pattern = {"find": "c", "filter": {"a": re.compile("^x")}}
    deep = {"find": "c", "filter": {"$or": [{"a": ObjectId()} for i in range(40)]}}
    assert _value_hashes.read_hash("find", many, shape) is None
    assert _value_hashes.read_hash("find", deep, shape) is None
    assert _value_hashes.read_hash("find", pattern, shape) is not None  # re.Pattern hashes
    regex = {"find": "c", "filter": {"a": {"$regex": Regex("^x")}}}  # unhashable
    assert _value_hashes.read_hash("find", regex, shape) is None


def test_plain_values_are_compared_whole_whatever_their_number() -> None:
    shape = "find db.c {a: {$in: [?]}}"

    def ins(values: list[int]) -> int | None:
        return _value_hashes.read_hash(
            "find", {"find": "c", "filter": {"a": {"$in": values}}}, shape
        )

    assert ins(list(range(1000))) == ins(list(range(1000)))
    assert ins(list(range(1000))) != ins(list(range(1, 1001)))
    assert ins([1]) != ins([True])  # not the same BSON value


def test_a_filter_keeps_at_most_32_hashes_and_no_common_values() -> None:
    command = {"aggregate": "c", "pipeline": [{"$match": {f"f{i}": f"v{i}" for i in range(50)}}]}
    assert len(_value_hashes.filter_hashes("aggregate", command)) == 32
    common = {"find": "c", "filter": {"a": 0, "b": 1, "c": -1, "d": "", "e": True, "f": None}}
    assert _value_hashes.filter_hashes("find", common) == set()
    nested = {"find": "c", "filter": {"login": {"$in": ["ada", "bob"]}, "n": {"$gt": 5}}}
    assert _value_hashes.filter_hashes("find", nested) == {hash("ada"), hash("bob"), hash(5)}


def test_pipelines_with_the_same_values_hash_alike_whichever_way_they_are_walked() -> None:
    shape = "aggregate db.c [$match {team: ?}, $group]"

    def count(team: Any) -> dict[str, Any]:  # as count_documents sends it
        match = {"$match": {"team": team}}
        return {"aggregate": "c", "pipeline": [match, {"$group": {"_id": 1, "n": {"$sum": 1}}}]}

    hashes = [
        _value_hashes.read_hash("aggregate", count(team), shape)
        for team in ("a", "a", "b", {"$in": ["a"]}, {"$in": ["a"]}, {"$in": ["b"]})
    ]
    assert None not in hashes
    assert hashes[0] == hashes[1] and hashes[3] == hashes[4]
    assert len(set(hashes)) == 4
