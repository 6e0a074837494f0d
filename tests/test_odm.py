"""ODMs: Beanie, ODMantic and MongoEngine users get the same findings at their own lines.

Each ODM's N+1 (a `Link` fetched per document, `get` / `find_one` in a loop, a `ReferenceField`
dereferenced per document) against its batched twin, served by a real uvicorn from the embedded
MongoDB server. The ODM's own frames are library code: the finding names the application's line
in the loop, and `via` the ODM function that line called.
"""

from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import beanie
import httpx
import mongoengine
import odmantic
import pytest
from beanie.operators import In
from fastapi import FastAPI
from motor.motor_asyncio import AsyncIOMotorClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

import perfmw
from support import line_of, serve, wait_for

HERE = Path(__file__).relative_to(Path.cwd()) if Path(__file__).is_absolute() else Path(__file__)
AUTHORS = 6


def findings(url: str, route: str) -> list[dict[str, Any]]:
    found = httpx.get(url + "/perfmw/findings", timeout=10).json()["findings"]
    # The claims here are about query patterns: a slow_query may show up on a loaded machine,
    # and a full collection of the test process's heap (the suite's size decides it) is a real
    # gc stall of whichever request runs then.
    return [
        f
        for f in found
        if f["route"] == route
        and f["kind"] != "slow_query"
        and not (f["kind"] == "loop_stall" and f["detail"]["cause"] == "gc")
    ]


def located(record: Any) -> list[str | None]:
    """The call site of each query of the running request, as the application sees them."""
    return [query.location for query in record.queries]


def settings() -> perfmw.Settings:
    return perfmw.Settings(server_timing=True, n_plus_one_threshold=5)


def instrumented(app: FastAPI) -> FastAPI:
    """`app` with perfmw, tracing into an in-memory exporter kept at `app.state.spans`."""
    app.state.spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(app.state.spans))
    perfmw.instrument(
        app, settings=settings(), registry=CollectorRegistry(), tracer_provider=provider
    )
    return app


def mongo_children(app: FastAPI, route: str) -> list[str]:
    """The MongoDB spans under the latest server span of `route`, by collection."""
    spans = app.state.spans.get_finished_spans()
    servers = [s for s in spans if s.kind.name == "SERVER" and s.name == f"GET {route}"]
    if not servers:  # it ends once the response is sent: maybe not yet
        return []
    server = servers[-1]
    return [
        str((s.attributes or {}).get("db.collection.name"))
        for s in spans
        if s.kind.name == "CLIENT"
        and s.parent is not None
        and s.parent.span_id == server.context.span_id
        and s.context.trace_id == server.context.trace_id
    ]


def query_count(response: httpx.Response) -> str:
    timing = response.headers["server-timing"]
    return timing.split('desc="', 1)[1].split('"', 1)[0]


# Beanie (on pymongo's AsyncMongoClient)


class Author(beanie.Document):
    name: str


class Book(beanie.Document):
    title: str
    author: beanie.Link[Author]


def beanie_app(mongo_uri: str) -> FastAPI:
    database = "beanie" + uuid.uuid4().hex[:8]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client: AsyncMongoClient[Any] = AsyncMongoClient(mongo_uri)
        await beanie.init_beanie(database=client[database], document_models=[Author, Book])
        for i in range(AUTHORS):
            author = Author(name=f"author {i}")
            await author.insert()
            await Book(title=f"book {i}", author=author).insert()  # type: ignore[arg-type]
        yield
        await client.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/books/links")
    async def books_links() -> dict[str, Any]:
        books = await Book.find_many().to_list()
        for book in books:
            await book.fetch_link(Book.author)  # beanie: fetch_link per book
        names = [book.author.name for book in books]  # type: ignore[union-attr]
        return {"names": names, "located": located(perfmw.current_request())}

    @app.get("/authors/each")
    async def authors_each() -> dict[str, Any]:
        books = await Book.find_many().to_list()
        names = []
        for book in books:
            author = await Author.get(book.author.ref.id)  # beanie: get per book
            names.append(author.name if author else None)
        return {"names": names}

    @app.get("/books/in")
    async def books_in() -> dict[str, Any]:
        books = await Book.find_many().to_list()
        ids = [book.author.ref.id for book in books]
        authors = {a.id: a.name for a in await Author.find(In(Author.id, ids)).to_list()}
        return {"names": [authors[i] for i in ids]}

    @app.get("/books/fetched")
    async def books_fetched() -> dict[str, Any]:
        books = await Book.find_many(fetch_links=True).to_list()
        return {"books": len(books)}

    return instrumented(app)


@pytest.fixture(scope="module")
def beanie_server(mongo_uri: str) -> Iterator[Any]:
    app = beanie_app(mongo_uri)
    with serve(app) as server:
        server.app = app
        yield server


def test_beanie_fetch_link_in_a_loop_is_an_n_plus_one_at_the_loop(beanie_server: Any) -> None:
    response = httpx.get(beanie_server.url + "/books/links", timeout=30)
    assert response.status_code == 200
    body = response.json()
    assert body["names"] == [f"author {i}" for i in range(AUTHORS)]
    assert query_count(response) == f"{1 + AUTHORS} queries"
    loop_line = line_of(HERE, "# beanie: fetch_link per book")
    [found] = findings(beanie_server.url, "/books/links")
    assert found["kind"] == "n_plus_one"
    assert found["location"] == loop_line
    assert found["via"] == "beanie.odm.documents.Document.fetch_link"
    assert found["detail"]["collection"] == "Author"
    assert found["detail"]["repetitions"] == AUTHORS
    # The request's own queries name the same line: the first of the shape, and each one from
    # the Nth (the N+1's) on; those in between were not located (locating costs a stack walk).
    threshold = settings().n_plus_one_threshold
    assert body["located"] == [
        line_of(HERE, "books = await Book.find_many().to_list()"),
        loop_line,
        *[None] * (threshold - 2),
        *[loop_line] * (AUTHORS - threshold + 1),
    ]


def test_beanie_get_in_a_loop_is_an_n_plus_one_at_the_loop(beanie_server: Any) -> None:
    response = httpx.get(beanie_server.url + "/authors/each", timeout=30)
    assert response.json()["names"] == [f"author {i}" for i in range(AUTHORS)]
    [found] = findings(beanie_server.url, "/authors/each")
    assert found["kind"] == "n_plus_one"
    assert found["location"] == line_of(HERE, "# beanie: get per book")
    assert found["via"] == "beanie.odm.documents.Document.get"


def test_beanie_batched_twins_are_clean(beanie_server: Any) -> None:
    response = httpx.get(beanie_server.url + "/books/in", timeout=30)
    assert response.json()["names"] == [f"author {i}" for i in range(AUTHORS)]
    assert query_count(response) == "2 queries"
    assert findings(beanie_server.url, "/books/in") == []
    # One aggregate with a $lookup. (The embedded server does not resolve a $lookup on a DBRef's
    # `$id`, so the links stay unresolved here; against MongoDB they are the authors.)
    response = httpx.get(beanie_server.url + "/books/fetched", timeout=30)
    assert response.json() == {"books": AUTHORS}
    assert query_count(response) == "1 query"
    assert findings(beanie_server.url, "/books/fetched") == []


# ODMantic (on motor)


class Writer(odmantic.Model):
    name: str


class Novel(odmantic.Model):
    title: str
    writer_name: str


def odmantic_app(mongo_uri: str) -> FastAPI:
    database = "odmantic" + uuid.uuid4().hex[:8]
    engines: dict[str, odmantic.AIOEngine] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client: AsyncIOMotorClient[Any] = AsyncIOMotorClient(mongo_uri)
        engine = engines["engine"] = odmantic.AIOEngine(client=client, database=database)
        await engine.save_all([Writer(name=f"writer {i}") for i in range(AUTHORS)])
        await engine.save_all(
            [Novel(title=f"novel {i}", writer_name=f"writer {i}") for i in range(AUTHORS)]
        )
        yield
        client.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/novels/each")
    async def novels_each() -> dict[str, Any]:
        engine = engines["engine"]
        novels = await engine.find(Novel, sort=Novel.title)
        writers = []
        for novel in novels:
            writer = await engine.find_one(Writer, Writer.name == novel.writer_name)  # odmantic
            writers.append(writer.name if writer else None)
        return {"writers": writers, "located": located(perfmw.current_request())}

    @app.get("/novels/in")
    async def novels_in() -> dict[str, Any]:
        engine = engines["engine"]
        novels = await engine.find(Novel, sort=Novel.title)
        names = [novel.writer_name for novel in novels]
        found = await engine.find(Writer, odmantic.query.in_(Writer.name, names))
        return {"writers": sorted(writer.name for writer in found)}

    return instrumented(app)


@pytest.fixture(scope="module")
def odmantic_server(mongo_uri: str) -> Iterator[Any]:
    app = odmantic_app(mongo_uri)
    with serve(app) as server:
        server.app = app
        yield server


def test_odmantic_find_one_in_a_loop_is_an_n_plus_one_at_the_loop(odmantic_server: Any) -> None:
    response = httpx.get(odmantic_server.url + "/novels/each", timeout=30)
    body = response.json()
    assert body["writers"] == [f"writer {i}" for i in range(AUTHORS)]
    assert query_count(response) == f"{1 + AUTHORS} queries"
    loop_line = line_of(HERE, "# odmantic")
    [found] = findings(odmantic_server.url, "/novels/each")
    assert found["kind"] == "n_plus_one"
    assert found["location"] == loop_line
    assert found["via"] == "odmantic.engine.AIOEngine.find_one"
    assert found["detail"]["collection"] == "writer"
    # motor runs pymongo in a thread: the line is found on the suspended coroutine.
    assert body["located"][0] == line_of(HERE, "novels = await engine.find(Novel, sort=")
    assert body["located"][1] == loop_line
    assert body["located"][-1] == loop_line


def test_odmantic_batched_twin_is_clean(odmantic_server: Any) -> None:
    response = httpx.get(odmantic_server.url + "/novels/in", timeout=30)
    assert response.json()["writers"] == [f"writer {i}" for i in range(AUTHORS)]
    assert query_count(response) == "2 queries"
    assert findings(odmantic_server.url, "/novels/in") == []


# MongoEngine (on the sync MongoClient, in `def` endpoints: Starlette's threadpool)


class Editor(mongoengine.Document):
    name = mongoengine.StringField()
    meta = {"db_alias": "perfmw-tests"}


class Article(mongoengine.Document):
    title = mongoengine.StringField()
    editor = mongoengine.ReferenceField(Editor)
    meta = {"db_alias": "perfmw-tests"}


def mongoengine_app(mongo_uri: str) -> FastAPI:
    database = "mongoengine" + uuid.uuid4().hex[:8]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        mongoengine.connect(
            db=database, host=mongo_uri, alias="perfmw-tests", uuidRepresentation="standard"
        )
        for i in range(AUTHORS):
            editor = Editor(name=f"editor {i}").save()
            Article(title=f"article {i}", editor=editor).save()
        yield
        mongoengine.disconnect(alias="perfmw-tests")

    app = FastAPI(lifespan=lifespan)

    @app.get("/articles/each")
    def articles_each() -> dict[str, Any]:
        names = []
        for article in Article.objects.order_by("title"):
            names.append(article.editor.name)  # mongoengine: dereference per article
        return {"editors": names, "located": located(perfmw.current_request())}

    @app.get("/articles/related")
    def articles_related() -> dict[str, Any]:
        articles = Article.objects.order_by("title").select_related()
        return {"editors": [article.editor.name for article in articles]}

    return instrumented(app)


@pytest.fixture(scope="module")
def mongoengine_server(mongo_uri: str) -> Iterator[Any]:
    app = mongoengine_app(mongo_uri)
    with serve(app) as server:
        server.app = app
        yield server


def test_mongoengine_reference_in_a_loop_is_an_n_plus_one_at_the_loop(
    mongoengine_server: Any,
) -> None:
    response = httpx.get(mongoengine_server.url + "/articles/each", timeout=30)
    body = response.json()
    assert body["editors"] == [f"editor {i}" for i in range(AUTHORS)]
    assert query_count(response) == f"{1 + AUTHORS} queries"
    loop_line = line_of(HERE, "# mongoengine: dereference per article")
    [found] = findings(mongoengine_server.url, "/articles/each")
    assert found["kind"] == "n_plus_one"
    assert found["location"] == loop_line
    assert found["detail"]["collection"] == "editor"
    assert body["located"][1] == loop_line
    assert body["located"][-1] == loop_line


def test_mongoengine_select_related_is_clean(mongoengine_server: Any) -> None:
    response = httpx.get(mongoengine_server.url + "/articles/related", timeout=30)
    assert response.json()["editors"] == [f"editor {i}" for i in range(AUTHORS)]
    assert query_count(response) == "2 queries"
    assert findings(mongoengine_server.url, "/articles/related") == []


# assert_max_queries counts what each ODM sends


def test_assert_max_queries_counts_odm_queries_exactly(
    beanie_server: Any, odmantic_server: Any, mongoengine_server: Any
) -> None:
    for server, path, queries in (
        (beanie_server, "/books/links", 1 + AUTHORS),
        (beanie_server, "/books/in", 2),
        (odmantic_server, "/novels/each", 1 + AUTHORS),
        (mongoengine_server, "/articles/each", 1 + AUTHORS),
        (mongoengine_server, "/articles/related", 2),
    ):
        with perfmw.testing.assert_max_queries(queries):
            assert httpx.get(server.url + path, timeout=30).status_code == 200
        with (
            pytest.raises(AssertionError, match=f"{queries} were sent"),
            perfmw.testing.assert_max_queries(queries - 1),
        ):
            httpx.get(server.url + path, timeout=30)


# A company's own shared package: the application's code, counted as library code on request


SHARED_PACKAGE = """
async def find_user(users, user_id):
    return await users.find_one({"_id": user_id})
"""


def test_library_paths_locate_findings_at_the_line_that_called_the_shared_package(
    mongo_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "acme_common").mkdir()
    (tmp_path / "acme_common" / "__init__.py").write_text("")
    (tmp_path / "acme_common" / "users.py").write_text(SHARED_PACKAGE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "acme_common", raising=False)
    monkeypatch.delitem(sys.modules, "acme_common.users", raising=False)
    import acme_common.users  # type: ignore[import-not-found]

    database = "shared" + uuid.uuid4().hex[:8]

    def app_with(settings: perfmw.Settings) -> FastAPI:
        clients: dict[str, Any] = {}

        @contextlib.asynccontextmanager
        async def lifespan(app: FastAPI) -> AsyncIterator[None]:
            clients["users"] = AsyncMongoClient(mongo_uri)[database].users
            yield
            await clients["users"].database.client.close()

        app = FastAPI(lifespan=lifespan)

        @app.get("/team")
        async def team() -> int:
            for user_id in range(AUTHORS):
                await acme_common.users.find_user(clients["users"], user_id)  # the team loop
            return AUTHORS

        perfmw.instrument(app, settings=settings, registry=CollectorRegistry())
        return app

    loop = line_of(HERE, "# the team loop")
    # By default the shared package is the application's code: the chain goes down into it.
    with serve(app_with(perfmw.Settings())) as server:
        httpx.get(server.url + "/team", timeout=30)
        [found] = findings(server.url, "/team")
    assert (found["location"], found["via"], found["detail"]["chain"]) == (
        loop,
        "pymongo.asynchronous.collection.AsyncCollection.find_one",
        [loop, "acme_common/users.py:3"],
    )
    # Named in library_paths, it is library code, like an ODM: `via` names it.
    with serve(app_with(perfmw.Settings(library_paths=("acme_common",)))) as server:
        httpx.get(server.url + "/team", timeout=30)
        [found] = findings(server.url, "/team")
    assert (found["location"], found["via"]) == (loop, "acme_common.users.find_user")
    assert "chain" not in found["detail"]


# Traces: each ODM's queries are MongoDB spans under the request's span


def test_odm_queries_are_spans_under_the_request_span(
    beanie_server: Any, odmantic_server: Any, mongoengine_server: Any
) -> None:
    for server, route, first, then in (
        (beanie_server, "/books/links", "Book", "Author"),
        (odmantic_server, "/novels/each", "novel", "writer"),
        (mongoengine_server, "/articles/each", "article", "editor"),
    ):
        server.app.state.spans.clear()
        assert httpx.get(server.url + route, timeout=30).status_code == 200
        children = wait_for(lambda: mongo_children(server.app, route))  # noqa: B023
        assert sorted(children) == sorted([first] + [then] * AUTHORS), route


# A repository method called in four loops: four N+1s, each at its loop


REPOSITORY = """
async def find_user(users, user_id):
    return await users.find_one({"_id": user_id})
"""


def test_four_loops_over_one_repository_method_are_four_findings_at_their_loops(
    mongo_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "team_repository.py").write_text(REPOSITORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "team_repository", raising=False)
    import team_repository  # type: ignore[import-not-found]

    clients: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        clients["users"] = AsyncMongoClient(mongo_uri)["loops" + uuid.uuid4().hex[:8]].users
        yield
        await clients["users"].database.client.close()

    app = FastAPI(lifespan=lifespan)

    async def owners(users: Any) -> None:
        for user_id in range(AUTHORS):
            await team_repository.find_user(users, user_id)  # loop 3, one call deeper

    @app.get("/everyone")
    async def everyone() -> int:
        users = clients["users"]
        for user_id in range(AUTHORS):
            await team_repository.find_user(users, user_id)  # loop 1
        user_id = 0
        while user_id < AUTHORS:
            await team_repository.find_user(users, user_id)  # loop 2
            user_id += 1
        await owners(users)
        return len([await team_repository.find_user(users, i) for i in range(AUTHORS)])  # loop 4

    with serve(instrumented(app)) as server:
        assert httpx.get(server.url + "/everyone", timeout=30).json() == AUTHORS
        # (each loop reads the same users: those are duplicate_reads too)
        found = [f for f in findings(server.url, "/everyone") if f["kind"] == "n_plus_one"]
    repository_line = "team_repository.py:3"
    loops = {
        line_of(HERE, "# loop 1"): [line_of(HERE, "# loop 1"), repository_line],
        line_of(HERE, "# loop 2"): [line_of(HERE, "# loop 2"), repository_line],
        line_of(HERE, "# loop 3, one call deeper"): [
            line_of(HERE, "# loop 3, one call deeper"),
            repository_line,
        ],
        line_of(HERE, "# loop 4"): [line_of(HERE, "# loop 4"), repository_line],
    }
    assert sorted((f["kind"], f["location"]) for f in found) == sorted(
        ("n_plus_one", line) for line in loops
    )
    for finding in found:
        assert finding["detail"]["repetitions"] == AUTHORS, finding["location"]
        assert finding["detail"]["chain"] == loops[finding["location"]]
        assert finding["via"] == "pymongo.asynchronous.collection.AsyncCollection.find_one"
