"""Schema versions and migrations: configuration, the write guard, migration on read and write.

Each backend-facing test runs on memory, SQLite, Redis, Valkey and a Cluster of each.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatstate import (
    AsyncMemoryBackend,
    AsyncRedisBackend,
    AsyncStateService,
    MemoryBackend,
    RedisBackend,
    SqliteBackend,
    StateData,
    StateService,
)
from chatstate.exceptions import (
    BackendUnavailable,
    ConfigurationError,
    MigrationError,
    SchemaVersionError,
    StateTooLargeError,
)
from chatstate.state import Replace
from chatstate.state._rules import merge
from chatstate.typing import JSONObject
from strategies import canonical, documents, patches

_users = itertools.count()


def _user() -> str:
    return f"mig:{next(_users)}"


# -- the migrations the tests use: pure functions of the document ---------------------


def to_2(doc: JSONObject) -> JSONObject:
    if "a" in doc:
        doc["a2"] = doc.pop("a")
    doc["v2"] = True
    return doc


def to_3(doc: JSONObject) -> JSONObject:
    hist = doc.get("hist")
    doc["hist"] = [*hist, 3] if isinstance(hist, list) else [3]
    return doc


def to_4(doc: JSONObject) -> JSONObject:
    out = {k: v for k, v in doc.items() if k != "b"}
    out["v4"] = len(out)
    return out


MIGRATIONS: dict[int, Callable[[JSONObject], JSONObject]] = {1: to_2, 2: to_3, 3: to_4}


def rules(version: int | None, **kwargs: Any) -> StateData:
    """StateData at ``version`` with the first migrations (``None``: no schema at all)."""
    if version is None:
        return StateData(preserved=["jwt_token"], **kwargs)
    migrations = {n: MIGRATIONS[n] for n in range(1, version)}
    return StateData(
        preserved=["jwt_token"], schema_version=version, migrations=migrations, **kwargs
    )


def expected(doc: JSONObject, start: int, end: int = 4) -> JSONObject:
    for n in range(start, end):
        doc = MIGRATIONS[n](doc)
    return doc


# -- backends -------------------------------------------------------------------------


@pytest.fixture(params=["memory", "sqlite"])
def local_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """A factory of sync backends over one store (every call shares the data)."""
    if request.param == "memory":
        store = MemoryBackend()
        yield lambda: store
        return
    made: list[SqliteBackend] = []

    def sqlite() -> SqliteBackend:
        made.append(SqliteBackend(str(tmp_path / "state.db")))
        return made[-1]

    yield sqlite
    for backend in made:
        backend.close()


def _redis_factory(url: str, namespace: str, *, cluster: bool) -> Iterator[Callable[[], Any]]:
    made: list[RedisBackend] = []

    def redis() -> RedisBackend:
        made.append(RedisBackend.from_url(url, namespace=namespace, cluster=cluster))
        return made[-1]

    yield redis
    for backend in made:
        backend.close()


@pytest.fixture
def redis_backend(redis_url: str, namespace: str) -> Iterator[Callable[[], Any]]:
    """The same on a Redis or Valkey server."""
    yield from _redis_factory(redis_url, namespace, cluster=False)


@pytest.fixture
def cluster_backend(cluster_url: str, namespace: str) -> Iterator[Callable[[], Any]]:
    """The same on a Redis or Valkey Cluster."""
    yield from _redis_factory(cluster_url, namespace, cluster=True)


Body = Callable[..., None]


def each_backend(body: Body) -> Body:
    """Run ``body(make_backend, ...)`` on memory and SQLite, and as ``*_redis``, ``*_cluster``.

    Further arguments (Hypothesis's) pass through unchanged.
    """
    module = sys.modules[body.__module__].__dict__

    def variant(fixture: str, suffix: str, marks: list[pytest.MarkDecorator]) -> Body:
        def test(*args: Any, **kwargs: Any) -> None:
            body(kwargs.pop(fixture), *args, **kwargs)

        params = list(inspect.signature(body).parameters.values())
        test.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [params[0].replace(name=fixture), *params[1:]]
        )
        test.__name__ = body.__name__ + suffix
        test.__qualname__ = test.__name__
        test.__doc__ = body.__doc__
        for mark in marks:
            test = mark(test)
        return test

    module[body.__name__ + "_redis"] = variant("redis_backend", "_redis", [pytest.mark.redis])
    module[body.__name__ + "_cluster"] = variant(
        "cluster_backend", "_cluster", [pytest.mark.redis, pytest.mark.cluster]
    )
    return variant("local_backend", "", [])


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"migrations": {1: to_2}}, "need a schema_version"),
        ({"schema_version": 0}, "from 1 to 999999999"),
        ({"schema_version": True}, "from 1 to 999999999"),
        ({"schema_version": 2.0}, "from 1 to 999999999"),
        ({"schema_version": 10**9}, "from 1 to 999999999"),
        ({"schema_version": 10**8}, "100000000 needs migrations for exactly 1..99999999"),
        ({"schema_version": 2, "migrations": {True: to_2}}, "unexpected [True]"),
        ({"schema_version": 3, "migrations": {1: to_2}}, "missing [2]"),
        ({"schema_version": 2, "migrations": {1: to_2, 2: to_3}}, "unexpected [2]"),
        ({"schema_version": 2, "migrations": {0: to_2, 1: to_2}}, "unexpected [0]"),
        ({"schema_version": 2, "migrations": {1: "to_2"}}, "not callable"),
        ({"schema_version": 2, "migrations": [to_2]}, "must be a mapping"),
    ],
)
def test_bad_schema_configuration_is_refused(kwargs: dict[str, Any], message: str) -> None:
    """schema_version is an int >= 1 and migrations cover exactly 1..N-1 with callables."""
    with pytest.raises(ConfigurationError) as info:
        StateData(**kwargs)
    assert message in str(info.value)


def test_good_schema_configuration_is_kept() -> None:
    """A valid configuration is accepted as given; version 1 needs no migrations."""
    assert StateData(schema_version=1).migrations == {}
    data = rules(4)
    assert data.schema_version == 4
    assert dict(data.migrations) == MIGRATIONS
    assert hash(data) == hash(rules(4))
    assert "migrations=[1, 2, 3]" in repr(data)


class _OldBackend:
    """A third-party backend written before schemas: it does not say it stores them."""

    def __init__(self) -> None:
        self.inner = MemoryBackend()

    def load(self, user_id: str) -> Any:
        return self.inner.load(user_id)

    def apply(self, user_id: str, write: Any) -> Any:
        return self.inner.apply(user_id, write)

    def close(self) -> None:
        pass


def test_a_backend_that_stores_no_schema_is_refused_at_construction() -> None:
    """StateData(schema_version=...) over a backend without stores_schema: ConfigurationError."""
    with pytest.raises(ConfigurationError, match="does not store schema versions"):
        StateService(_OldBackend(), rules(2))
    StateService(_OldBackend(), rules(None)).update("u", {"a": 1})  # no schema: as before


def test_an_async_backend_that_stores_no_schema_is_refused() -> None:
    """The async twin makes the same check."""

    class OldAsync:
        async def load(self, user_id: str) -> Any: ...
        async def apply(self, user_id: str, write: Any) -> Any: ...
        async def aclose(self) -> None: ...

    with pytest.raises(ConfigurationError, match="does not store schema versions"):
        AsyncStateService(OldAsync(), rules(2))  # type: ignore[arg-type]


def test_without_a_schema_writes_carry_schema_1_where_the_backend_stores_schemas() -> None:
    """No schema configured: writes are schema 1; a backend storing none gets none, as before."""
    svc = StateService(rules=rules(None))
    assert svc.manager.update_write({"a": 1}, None).schema == 1
    assert StateService(rules=rules(3)).manager.update_write({"a": 1}, None).schema == 3

    class Old:
        def load(self, user_id: str) -> Any: ...
        def apply(self, user_id: str, write: Any) -> Any: ...
        def close(self) -> None: ...

    old = StateService(Old(), rules(None))  # type: ignore[arg-type]
    assert old.manager.update_write({"a": 1}, None).schema is None


def test_code_without_a_schema_never_writes_into_a_migrated_document() -> None:
    """The first rolling deploy: old code (no schema) gets SchemaVersionError, writes nothing."""
    store = MemoryBackend()
    new = StateService(store, rules(3))
    new.update("ana", {"x": 1})
    old = StateService(store)
    before = new.snapshot("ana")
    for write in (
        lambda: old.update("ana", {"name": "Bob"}),
        lambda: old.increment("ana", "n"),
        lambda: old.reset("ana"),
        lambda: old.transaction("ana", lambda d: {**d, "y": 1}),
    ):
        with pytest.raises(SchemaVersionError) as info:
            write()
        assert (info.value.stored, info.value.supported) == (3, 1)
    assert new.snapshot("ana") == before
    old.delete("ana")  # a delete is never guarded: removing needs no shape
    assert new.get("ana") == {}


# -- migration on read and on write (Hypothesis) ----------------------------------------

ACTIONS = st.sampled_from(["get", "snapshot", "update", "transaction", "claim", "increment"])


def _clean(doc: JSONObject) -> JSONObject:
    return {k: v for k, v in doc.items() if k != "jwt_token"}


@each_backend
@settings(
    max_examples=60,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    start=documents(),
    old=st.sampled_from([None, 1, 2, 3]),
    action=ACTIONS,
    patch=patches(),
    token=st.booleans(),
)
def test_an_old_document_reads_and_writes_as_if_migrated_in_python(  # noqa: PLR0917 - Hypothesis
    make_backend: Callable[[], Any],
    start: JSONObject,
    old: int | None,
    action: str,
    patch: JSONObject,
    token: bool,
) -> None:
    """A document stored at a random older schema, then read or written by schema-4 code.

    The result is what the migrations give in plain Python (then the write), the stored
    schema is 4, the preserved field is untouched.
    """
    user = _user()
    start, patch = _clean(start), _clean(patch)
    old_svc = StateService(make_backend(), rules(old))
    new_svc = StateService(make_backend(), rules(4))
    stored = dict(old_svc.update(user, start))
    if token:
        old_svc.set_preserved(user, "jwt_token", "tok")
        stored["jwt_token"] = "tok"
    version = old_svc.snapshot(user).version
    want = expected(dict(stored), old or 1) if stored else {}
    if action == "get":
        got: Any = new_svc.get(user)
    elif action == "snapshot":
        got = new_svc.snapshot(user).data
    elif action == "update":
        got = dict(new_svc.update(user, patch))
        want = merge(want, patch)
    elif action == "transaction":
        got = new_svc.transaction(user, lambda doc: {**doc, "t": 1})
        want = {**want, "t": 1}
    elif action == "increment":
        got = {"n": new_svc.increment(user, "counter", 2)}  # no document holds "counter"
        want = {"n": 2}
    else:
        with new_svc.claim(user, op_id=f"m-{user}") as claim:
            got = claim.data
            claim.update({"c": 1})
        after = new_svc.get(user)
        assert canonical(after) == canonical(merge(want, {"c": 1}) if stored else {"c": 1})
    assert canonical(got) == canonical(want)
    snap = new_svc.snapshot(user)
    if snap.version:
        assert snap.schema == 4
        assert snap.version > version  # the migration (or the write) was stored
        assert snap.data.get("jwt_token") == ("tok" if token else None)


@each_backend
def test_a_document_at_the_current_schema_is_not_written_on_read(
    make_backend: Callable[[], Any],
) -> None:
    """Reading a current document writes nothing (its version stays)."""
    svc = StateService(make_backend(), rules(3))
    svc.update("u", {"a": 1})
    assert svc.snapshot("u").version == svc.snapshot("u").version == 1
    assert svc.snapshot("u").schema == 3


@each_backend
def test_schema_one_costs_nothing_to_adopt(make_backend: Callable[[], Any]) -> None:
    """A schema-less document is schema 1; schema_version=1 reads and writes it unchanged."""
    StateService(make_backend(), rules(None)).update("u", {"a": 1})
    one = StateService(make_backend(), rules(1))
    assert one.snapshot("u").version == 1
    assert one.update("u", {"b": 2}) == {"a": 1, "b": 2}
    assert one.snapshot("u").schema == 1


@each_backend
def test_a_newer_document_is_never_read_nor_written_by_older_code(
    make_backend: Callable[[], Any],
) -> None:
    """Schema-2 code meets a schema-4 document: SchemaVersionError, nothing written."""
    StateService(make_backend(), rules(4)).update("u", {"a": 1})
    old = StateService(make_backend(), rules(2))
    for call in (
        lambda: old.get("u"),
        lambda: old.update("u", {"x": 1}),
        lambda: old.increment("u", "n"),
        lambda: old.reset("u"),
        lambda: old.transaction("u", lambda d: d),
        lambda: old.claim("u", op_id="m1").__enter__(),
    ):
        with pytest.raises(SchemaVersionError) as info:
            call()
        assert (info.value.user_id, info.value.stored, info.value.supported) == ("u", 4, 2)
    snap = StateService(make_backend(), rules(4)).snapshot("u")
    assert (snap.version, snap.data) == (1, {"a": 1})
    # The claim was released: another handler may take the user.
    with StateService(make_backend(), rules(4)).claim("u", op_id="m2") as claim:
        assert claim.status == "claimed"


@each_backend
def test_a_migration_that_changes_a_preserved_field_writes_nothing(
    make_backend: Callable[[], Any],
) -> None:
    """Changing or dropping a preserved field is a MigrationError; the old document stays."""
    old = StateService(make_backend(), rules(None))
    old.update("u", {"a": 1})
    old.set_preserved("u", "jwt_token", "tok")
    for bad in (lambda d: {**d, "jwt_token": "other"}, lambda d: {"a": 1}):
        svc = StateService(
            make_backend(),
            StateData(preserved=["jwt_token"], schema_version=2, migrations={1: bad}),
        )
        with pytest.raises(MigrationError) as info:
            svc.get("u")
        assert (info.value.path, info.value.from_version, info.value.user_id) == (
            "$.jwt_token",
            1,
            "u",
        )
        with pytest.raises(MigrationError):
            svc.update("u", {"b": 1})
    snap = StateService(make_backend(), rules(None)).snapshot("u")
    assert (snap.version, snap.schema, snap.data) == (2, 1, {"a": 1, "jwt_token": "tok"})


@each_backend
def test_a_migration_that_returns_no_object_or_bad_json_writes_nothing(
    make_backend: Callable[[], Any],
) -> None:
    """A migration returning a list, or a value that is not JSON, is a MigrationError."""
    StateService(make_backend(), rules(None)).update("u", {"a": 1})
    for bad in (lambda d: [d], lambda d: {**d, "s": {1, 2}}):
        svc = StateService(make_backend(), StateData(schema_version=2, migrations={1: bad}))
        with pytest.raises(MigrationError):
            svc.get("u")
    assert StateService(make_backend(), rules(None)).snapshot("u").version == 1


# -- concurrency and crashes ------------------------------------------------------------


@each_backend
def test_a_writer_between_the_read_and_the_write_back_wins(
    make_backend: Callable[[], Any],
) -> None:
    """The migration's compare-and-set loses to a concurrent write and reruns on its result."""
    old = StateService(make_backend(), rules(None))
    old.update("u", {"a": 1})
    calls: list[JSONObject] = []

    def racing(doc: JSONObject) -> JSONObject:
        calls.append(dict(doc))
        if len(calls) == 1:
            old.update("u", {"late": True})  # lands after our read, before our write
        return to_2(doc)

    svc = StateService(make_backend(), StateData(schema_version=2, migrations={1: racing}))
    assert svc.get("u") == {"a2": 1, "late": True, "v2": True}
    assert calls == [{"a": 1}, {"a": 1, "late": True}]
    snap = svc.snapshot("u")
    assert (snap.version, snap.schema) == (3, 2)


@each_backend
def test_a_crash_between_read_and_write_leaves_the_old_document(
    make_backend: Callable[[], Any],
) -> None:
    """A migration that dies (after another writer changed the document) stores nothing.

    The other writer's change stands; the next reader migrates it.
    """
    old = StateService(make_backend(), rules(None))
    old.update("u", {"a": 1})

    def crashing(doc: JSONObject) -> JSONObject:
        old.update("u", {"late": True})
        raise RuntimeError("worker killed")

    svc = StateService(make_backend(), StateData(schema_version=2, migrations={1: crashing}))
    with pytest.raises(MigrationError) as info:
        svc.update("u", {"mine": 1})
    assert isinstance(info.value.__cause__, RuntimeError)
    snap = old.snapshot("u")
    assert (snap.version, snap.schema, snap.data) == (2, 1, {"a": 1, "late": True})
    later = StateService(make_backend(), rules(2))
    assert later.update("u", {"mine": 1}) == {"a2": 1, "late": True, "v2": True, "mine": 1}


@each_backend
def test_a_lost_write_back_leaves_the_old_document_for_the_next_reader(
    make_backend: Callable[[], Any],
) -> None:
    """The process dies as it sends the migrated document: the old one stays, migrated later."""
    StateService(make_backend(), rules(None)).update("u", {"a": 1})
    backend = make_backend()
    svc = StateService(backend, rules(2))
    real = backend.apply

    def dying(user_id: str, write: Any) -> Any:
        if isinstance(write.operation, Replace):
            raise BackendUnavailable("killed before the write was sent")
        return real(user_id, write)

    backend.apply = dying
    try:
        with pytest.raises(BackendUnavailable):
            svc.get("u")
    finally:
        del backend.apply
    assert StateService(make_backend(), rules(None)).snapshot("u").version == 1
    assert svc.get("u") == {"a2": 1, "v2": True}


@each_backend
def test_concurrent_writers_during_a_migration_lose_no_update(
    make_backend: Callable[[], Any],
) -> None:
    """Old-schema and new-schema writers race on users being migrated: no increment is lost.

    Old writers succeed until a document is migrated, then get SchemaVersionError; every
    success is counted in the final document, and the migration applied exactly once.
    """
    users = [f"race:{i}" for i in range(4)]
    old = StateService(make_backend(), rules(None))
    for user in users:
        old.update(user, {"n": 0})

    def once(doc: JSONObject) -> JSONObject:
        doc["migrated"] = doc.get("migrated", 0) + 1
        return doc

    new_rules = StateData(schema_version=2, migrations={1: once})
    done = {"old": 0, "new": 0}
    lock = threading.Lock()

    def worker(svc: StateService, kind: str) -> None:
        for i in range(20):
            user = users[i % len(users)]
            try:
                svc.increment(user, "n")
            except SchemaVersionError:
                assert kind == "old"
                continue
            with lock:
                done[kind] += 1

    threads = [
        threading.Thread(target=worker, args=(StateService(make_backend(), rules(None)), "old"))
        for _ in range(3)
    ] + [
        threading.Thread(target=worker, args=(StateService(make_backend(), new_rules), "new"))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = StateService(make_backend(), new_rules)
    total = 0
    for user in users:
        doc = final.get(user)
        assert doc["migrated"] == 1
        assert final.snapshot(user).schema == 2
        total += doc["n"]
    assert done["new"] == 60
    assert total == done["old"] + done["new"]


def test_async_twin_migrates_reads_writes_and_claims() -> None:
    """The asyncio manager migrates on read, on a refused write, in transactions and claims."""

    async def main() -> None:
        store = MemoryBackend()
        old = StateService(store, rules(None))
        for user in ("r", "w", "t", "c"):
            old.update(user, {"a": 1, "b": 2})
        svc = AsyncStateService(AsyncMemoryBackend(store), rules(4))
        want = expected({"a": 1, "b": 2}, 1)
        assert await svc.get("r") == want
        assert dict(await svc.update("w", {"x": 1})) == {**want, "x": 1}
        assert await svc.transaction("t", lambda d: {**d, "y": 1}) == {**want, "y": 1}
        async with await svc.claim("c", op_id="m") as claim:
            assert claim.data == want
            claim.update({"z": 1})
        assert await svc.get("c") == {**want, "z": 1}
        for user in ("r", "w", "t", "c"):
            assert (await svc.snapshot(user)).schema == 4
        older = AsyncStateService(AsyncMemoryBackend(store), rules(2))
        with pytest.raises(SchemaVersionError):
            await older.update("r", {"q": 1})

    asyncio.run(main())


@pytest.mark.redis
def test_async_redis_twin_migrates_concurrent_tasks(redis_url: str, namespace: str) -> None:
    """Many tasks of schema-3 code meet schema-1 documents on Redis: each write lands once."""

    async def main() -> None:
        old = StateService(RedisBackend.from_url(redis_url, namespace=namespace), rules(None))
        svc = AsyncStateService(
            AsyncRedisBackend.from_url(redis_url, namespace=namespace), rules(3)
        )
        try:
            for i in range(5):
                old.update(f"t{i}", {"a": i})
            await asyncio.gather(
                *(svc.increment(f"t{i % 5}", "n") for i in range(50)),
            )
            for i in range(5):
                doc = await svc.get(f"t{i}")
                assert doc == {"a2": i, "v2": True, "hist": [3], "n": 10}
        finally:
            old.close()
            await svc.aclose()

    asyncio.run(main())


# -- the schema guard: the Lua script and apply_write agree ------------------------------

GUARD_OPS = st.lists(
    st.tuples(
        st.sampled_from(["update", "increment", "reset", "replace", "stale replace", "delete"]),
        st.sampled_from([None, 1, 2, 3]),
        st.booleans(),  # with an op id (sent twice) or not
    ),
    min_size=1,
    max_size=12,
)


@pytest.mark.redis
@settings(max_examples=80, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=GUARD_OPS)
def test_the_lua_guard_and_apply_write_agree(redis_url: str, namespace: str, ops: Any) -> None:
    """Random writes at random schemas: same statuses, versions, schemas and documents."""
    user = _user()
    memory = MemoryBackend()
    redis_backend = RedisBackend.from_url(redis_url, namespace=namespace)
    manager = StateService(memory, rules(None)).manager
    try:
        for step, (kind, schema, with_id) in enumerate(ops):
            current = memory.load(user)
            version = current.version if current is not None else 0
            op_id = f"op{step % 3}" if with_id else None
            if kind == "update":
                write = manager.update_write({"k": step, "s": {"n": step}}, op_id)
            elif kind == "increment":
                write = manager.increment_write("count", 1, op_id)
            elif kind == "reset":
                write = manager.reset_write(op_id)
            elif kind == "delete":
                write = manager.delete_write(op_id)
            else:
                expect = version if kind == "replace" else version + 1
                write = manager.write(Replace({"r": step}, expect), op_id)
            write.schema = schema
            got = []
            for backend in (memory, redis_backend):
                try:
                    out = backend.apply(user, write)
                except Exception as exc:  # compared below
                    got.append(type(exc).__name__)
                    continue
                seen = (out.status, out.version, out.value)
                if schema is not None:
                    seen += (out.snapshot.schema,)
                loaded = backend.load(user)
                stored = None if loaded is None else (loaded.version, loaded.schema, loaded.data)
                got.append((seen, stored))
            assert got[0] == got[1], (kind, schema, got)
    finally:
        redis_backend.close()


def test_a_flow_carries_on_over_a_migrated_document() -> None:
    """A conversation begun by the old bot continues under the new one (the claim migrates)."""
    from chatstate.flow import Flow, Menu, MenuItem, Router, Step
    from chatstate.testing import Conversation

    class Greet(Flow):
        name_ = Step("Your name?", key="name", next="city")
        city = Step("Your city?", key="city")

        def on_complete(self, data: dict[str, Any]) -> str:
            return f"Hello {data['name']} from {data['city']}!"

    menu = Menu("Hi!", [MenuItem("greet", "Greet", flow=Greet)])
    store = MemoryBackend()
    old = Conversation(Router(StateService(store), main_menu=menu), "ana")
    assert old.send("greet") == ["Your name?"]
    assert old.send("Ana") == ["Your city?"]

    def add_language(doc: JSONObject) -> JSONObject:
        return {**doc, "lang": "en"}

    svc = StateService(store, StateData(schema_version=2, migrations={1: add_language}))
    new = Conversation(Router(svc, main_menu=menu), "ana")
    assert new.send("Porto") == ["Hello Ana from Porto!"]
    assert svc.snapshot("ana").schema == 2
    assert svc.get("ana")["lang"] == "en"


def test_a_migration_changing_a_preserved_fields_json_type_is_refused() -> None:
    """1 -> True or 7 -> 7.0 in a preserved field is a change: MigrationError, nothing written."""
    store = MemoryBackend()
    keep = StateData(preserved=["flag"])
    StateService(store, keep).set_preserved("u", "flag", 1)

    def to_bool(doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "flag": True}

    new = StateService(
        store, StateData(preserved=["flag"], schema_version=2, migrations={1: to_bool})
    )
    with pytest.raises(MigrationError) as info:
        new.get("u")
    assert info.value.path == "$.flag"
    assert store.load("u").schema == 1


def test_a_migrated_document_over_max_bytes_is_a_migration_error() -> None:
    """The store refusing the result names the user and the migration; nothing is written."""
    store = MemoryBackend()
    StateService(store).update("u", {"a": 1})

    def bloat(doc: dict[str, Any]) -> dict[str, Any]:
        return {**doc, "blob": "x" * 5000}

    new = StateService(store, StateData(max_bytes=1000, schema_version=2, migrations={1: bloat}))
    with pytest.raises(MigrationError) as info:
        new.get("u")
    assert (info.value.user_id, info.value.from_version) == ("u", 1)
    assert isinstance(info.value.__cause__, StateTooLargeError)
    assert store.load("u").schema == 1
