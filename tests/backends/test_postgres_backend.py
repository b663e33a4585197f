"""What only a real PostgreSQL shows: processes on one user, a restart, options, rights, secrets.

The contract suite itself is in test_contract_postgres.py.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import servers
from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendError,
    BackendPermissionError,
    BackendUnavailable,
    ConfigurationError,
    OutcomeUnknown,
    UsageError,
)
from chatstate.state import StateService
from chatstate.state.postgres import AsyncPostgresBackend, PostgresBackend, install_sql
from fakes import FakeClock

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def postgres() -> Iterator[servers.Postgres]:
    """One throwaway PostgreSQL server for the module."""
    server = servers.start_postgres()
    try:
        yield server
    finally:
        server.cleanup()


# -- several processes on one user -------------------------------------------------------

PROCESSES = 4
ROUNDS = 50
INCREMENTS_PER_ROUND = 4  # 200 per process

_barrier: Any = None


def _init_worker(barrier: Any) -> None:
    global _barrier  # noqa: PLW0603 - a pool hands a barrier over only through its initializer
    _barrier = barrier


def _worker(dsn: str, index: int) -> list[str]:
    """Per round: 4 increments and one update_once whose op id another process also sends."""
    applied = []
    with StateService(PostgresBackend(dsn, table_prefix="procs")) as svc:
        for round_ in range(ROUNDS):
            _barrier.wait()
            op_id = f"op-{round_ + index % 2}"  # processes 1 and 3 run one round ahead
            for _ in range(INCREMENTS_PER_ROUND // 2):
                svc.increment("hot", "hits")
            out = svc.update_once("hot", {"seen": {op_id: True}}, op_id=op_id)
            if out.applied:
                applied.append(op_id)
            for _ in range(INCREMENTS_PER_ROUND // 2):
                svc.increment("hot", "hits")
    return applied


def test_four_processes_count_exactly_and_apply_each_op_id_once(
    postgres: servers.Postgres,
) -> None:
    """4 processes writing one user: the exact total, each op id applied by exactly one."""
    PostgresBackend(postgres.dsn, table_prefix="procs").install()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    with ctx.Pool(PROCESSES, initializer=_init_worker, initargs=(barrier,)) as pool:
        work = pool.starmap_async(
            _worker, [(postgres.dsn, i) for i in range(PROCESSES)], chunksize=1
        )
        results = work.get(timeout=600)  # a hang guard (a worker that died), not a pace
    applied = [op for ops in results for op in ops]
    expected_ids = {f"op-{n}" for n in range(ROUNDS + 1)}
    assert sorted(applied) == sorted(expected_ids), "an op id applied twice or never"
    with StateService(PostgresBackend(postgres.dsn, table_prefix="procs")) as svc:
        doc = svc.get("hot")
        assert doc["hits"] == PROCESSES * ROUNDS * INCREMENTS_PER_ROUND
        assert set(doc["seen"]) == expected_ids
        writes = PROCESSES * ROUNDS * INCREMENTS_PER_ROUND + len(expected_ids)
        assert svc.snapshot("hot").version == writes


# -- a server restart ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_no_acknowledged_write_is_lost_across_a_restart(  # noqa: C901 - writers, fault, check
    postgres: servers.Postgres, how: str
) -> None:
    """Writes go on while the server restarts or its postmaster is killed: none acknowledged is lost.

    A write whose outcome is unknown is sent again with its op id once the server
    is back, and then counts exactly once.
    """
    prefix = f"restart_{how}"
    acknowledged: list[str] = []
    unknown: list[str] = []
    stop = threading.Event()

    def write(writer: int) -> None:
        with StateService(
            PostgresBackend(postgres.dsn, table_prefix=prefix, pool_timeout=1)
        ) as svc:
            n = 0
            while not stop.is_set():
                # Op ids of their own: shared, a writer that fell more than the op log's
                # memory (100 ids) behind another, as one waiting out pool_timeout while
                # another burns ids on BackendUnavailable does, re-applied a forgotten id.
                op_id = f"w{writer}-{n}"
                n += 1
                try:
                    svc.update_once("ana", {"seen": {op_id: True}}, op_id=op_id)
                except OutcomeUnknown:
                    unknown.append(op_id)
                except BackendUnavailable:
                    continue  # nothing was sent: this op id is simply not used
                else:
                    acknowledged.append(op_id)

    PostgresBackend(postgres.dsn, table_prefix=prefix).install()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for thread in writers:
        thread.start()
    try:
        while len(acknowledged) < 50:
            stop.wait(0.01)
        if how == "restart":
            postgres.restart()
        else:
            postgres.kill()
            postgres.start()
        before = len(acknowledged)
        while len(acknowledged) < before + 50:
            stop.wait(0.01)
    finally:
        stop.set()
        for thread in writers:
            thread.join(60)
    with StateService(PostgresBackend(postgres.dsn, table_prefix=prefix)) as svc:
        for op_id in unknown:  # settle them: each applies once, whatever the first send did
            svc.update_once("ana", {"seen": {op_id: True}}, op_id=op_id)
        seen = set(svc.get("ana")["seen"])
        assert set(acknowledged) <= seen, "an acknowledged write was lost"
        assert seen == set(acknowledged) | set(unknown)
        assert svc.snapshot("ana").version == len(seen)


# -- tables, options, rights, secrets --------------------------------------------------------


def test_the_tables_live_in_the_chosen_schema_and_prefix(postgres: servers.Postgres) -> None:
    """schema= and table_prefix= place the tables; install_sql() prints what install() runs."""
    with StateService(PostgresBackend(postgres.dsn, schema="bots", table_prefix="shop")) as svc:
        svc.update("ana", {"a": 1})
    with psycopg.connect(postgres.dsn) as conn:
        doc = conn.execute("SELECT doc::jsonb FROM bots.shop_users WHERE user_id = 'ana'")
        assert doc.fetchone() == ({"a": 1},)
    assert 'CREATE TABLE IF NOT EXISTS "bots"."shop_users"' in install_sql("bots", "shop")


def test_create_false_refuses_missing_tables(postgres: servers.Postgres) -> None:
    """With create=False, missing tables are a BackendError that says how to make them."""
    with (
        StateService(PostgresBackend(postgres.dsn, table_prefix="absent", create=False)) as svc,
        pytest.raises(BackendError, match="install"),
    ):
        svc.get("ana")


def test_tables_of_a_newer_chatstate_are_refused(postgres: servers.Postgres) -> None:
    """A schema version above this chatstate's is refused before anything is written."""
    PostgresBackend(postgres.dsn, table_prefix="newer").install()
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("UPDATE public.newer_meta SET value = 99")
    with (
        StateService(PostgresBackend(postgres.dsn, table_prefix="newer")) as svc,
        pytest.raises(BackendError, match="newer chatstate"),
    ):
        svc.update("ana", {"a": 1})


def test_a_user_with_table_rights_only_works_and_one_without_gets_permission_error(
    postgres: servers.Postgres,
) -> None:
    """SELECT/INSERT/UPDATE/DELETE on the tables are enough; less is BackendPermissionError."""
    PostgresBackend(postgres.dsn, table_prefix="rights").install()
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS bot")
        conn.execute("DROP ROLE IF EXISTS reader")
        conn.execute("CREATE ROLE bot LOGIN")
        conn.execute("CREATE ROLE reader LOGIN")
        for table in ("users", "ops", "locks", "deadlines", "meta"):
            conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON rights_{table} TO bot")
            conn.execute(f"GRANT SELECT ON rights_{table} TO reader")
    bot = postgres.dsn.replace("chatstate@", "bot@")
    with StateService(PostgresBackend(bot, table_prefix="rights", create=False)) as svc:
        svc.update_once("ana", {"a": 1}, op_id="m1")
        assert svc.erase("ana") == ["document", "operations"]
    reader = postgres.dsn.replace("chatstate@", "reader@")
    with StateService(PostgresBackend(reader, table_prefix="rights", create=False)) as svc:
        assert svc.get("ana") == {}
        with pytest.raises(BackendPermissionError) as info:
            svc.update("ana", {"a": 1})
        assert isinstance(info.value.__cause__, psycopg.errors.InsufficientPrivilege)


def test_bad_options_are_configuration_errors() -> None:
    """Out-of-range options and names that are not plain SQL names fail at construction."""
    dsn = "postgresql://x@127.0.0.1:1/db"
    for options in (
        {"schema": "Bad-Name"},
        {"table_prefix": 'x"; DROP TABLE y; --'},
        {"max_connections": 0},
        {"pool_timeout": 0},
        {"cache_size": -1},
        {"purge_every": 0},
        {"purge_every": float("inf")},
        {"connect_timeout": float("inf")},
        {"pool_timeout": float("nan")},
        {"resolve_attempts": True},
        {"clock": 5},
        {"max_connections": -1},
        {"create": "no"},
        {"prepared_statements": "no"},
        {"prepared_statements": None},
        {"schema": "pg_catalog"},
        {"schema": "pg_temp"},
    ):
        with pytest.raises(ConfigurationError):
            PostgresBackend(dsn, **options)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            AsyncPostgresBackend(dsn, **options)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_connections must be a whole number >= 1"):
        PostgresBackend(dsn, max_connections=-1)


def test_a_connection_argument_it_cannot_use_is_refused_when_the_backend_is_made() -> None:
    """Not a string or pool, an empty string, a port, mode or timeout libpq would refuse.

    Each was accepted and failed on the first call instead, as a raw AttributeError or
    TypeError, or as a BackendUnavailable ("cannot reach the server") that invites
    retries; an empty string connected wherever libpq's defaults pointed.
    """
    secret = "Sup3rS3cretPW"
    for bad in (42, None, b"postgresql://x@h/db", ["host=h"]):
        with pytest.raises(
            ConfigurationError, match="connection string or a psycopg_pool ConnectionPool"
        ):
            PostgresBackend(bad)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="or a psycopg_pool AsyncConnectionPool"):
            AsyncPostgresBackend(bad)  # type: ignore[arg-type]
    for empty in ("", "   "):
        with pytest.raises(ConfigurationError, match="conninfo is empty"):
            PostgresBackend(empty)
    for dsn, option in (
        (f"postgresql://bot:{secret}@127.0.0.1:notaport/db", "port"),
        (f"postgresql://bot:{secret}@127.0.0.1:70000/db", "port"),
        (f"postgresql://bot:{secret}@127.0.0.1/db?sslmode=bogus", "sslmode"),
        (f"host=h password={secret} keepalives=abc", "keepalives"),
        (f"host=h password={secret} target_session_attrs=writable", "target_session_attrs"),
    ):
        for backend in (PostgresBackend, AsyncPostgresBackend):
            with pytest.raises(ConfigurationError, match=f"string's {option} must be") as info:
                backend(dsn)
            assert secret not in str(info.value)
    for fine in ("postgresql://", "postgresql://h1:5432,h2:5433/db?sslmode=verify-full",
                 "host=h port=5432 connect_timeout=3 keepalives=1",
                 "host=h port=' 5432' keepalives=+1 connect_timeout=2.5",  # as libpq reads them
                 "host=h1,h2 port=5432,"):  # fmt: skip
        PostgresBackend(fine).close()


def test_a_pool_of_the_other_twin_is_a_usage_error() -> None:
    """A sync pool given to the asyncio backend (or the reverse) fails when it is made."""
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    sync_pool = ConnectionPool("postgresql://x@127.0.0.1:1/db", open=False)
    async_pool = AsyncConnectionPool("postgresql://x@127.0.0.1:1/db", open=False)
    with pytest.raises(
        UsageError, match="AsyncPostgresBackend needs a psycopg_pool AsyncConnectionPool"
    ):
        AsyncPostgresBackend(sync_pool)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"^PostgresBackend needs a psycopg_pool ConnectionPool"):
        PostgresBackend(async_pool)  # type: ignore[arg-type]


def test_the_password_is_never_shown() -> None:
    """A DSN's password appears in no repr, description or error."""
    dsn = "postgresql://bot:hunter2secret@127.0.0.1:1/db?connect_timeout=1"
    backend = PostgresBackend(dsn, pool_timeout=0.5)
    assert "hunter2secret" not in repr(backend)
    assert "hunter2secret" not in str(backend.describe())
    assert backend.describe()["db.system.name"] == "postgresql"
    with pytest.raises(BackendUnavailable) as info:
        StateService(backend).get("ana")
    assert "hunter2secret" not in str(info.value)
    backend.close()


def test_a_malformed_connection_string_is_refused_at_once_and_never_quoted(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """A string libpq cannot parse is refused at once: libpq's message quotes it, password too."""
    secret = "Sup3rS3cretPW"
    for dsn in (f"postgresql://bot:{secret}@[::1/bot", f"password={secret} host"):
        with pytest.raises(ConfigurationError) as info:
            PostgresBackend(dsn)
        assert secret not in str(info.value)
        assert info.value.__cause__ is None
        with pytest.raises(ConfigurationError):
            AsyncPostgresBackend(dsn)
    from chatstate.cli import main

    assert main(["users", "--postgres", f"postgresql://bot:{secret}@[::1/bot"]) != 0
    out, err = capsys.readouterr()
    assert secret not in out + err + caplog.text


def test_refused_credentials_are_an_authentication_error_at_once(
    postgres: servers.Postgres,
) -> None:
    """A wrong password is BackendAuthenticationError on the first call, not a pool timeout."""
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS pwbot")
        conn.execute("CREATE ROLE pwbot LOGIN PASSWORD 'right-pw'")
        hba = postgres.data / "pg_hba.conf"
        hba.write_text("host all pwbot 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
        conn.execute("SELECT pg_reload_conf()")
    wrong = f"postgresql://pwbot:wrong-pw@127.0.0.1:{postgres.port}/postgres"
    for _ in range(600):  # until the reload took effect (a hang guard, not a pace)
        try:
            psycopg.connect(wrong).close()
        except psycopg.OperationalError:
            break
        threading.Event().wait(0.01)
    backend = PostgresBackend(wrong, pool_timeout=30)
    with StateService(backend) as svc, pytest.raises(BackendAuthenticationError) as info:
        svc.update("ana", {"a": 1})
    assert "wrong-pw" not in str(info.value)
    assert str(info.value).count("Failed to connect") == 1
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("DROP ROLE IF EXISTS sleeper")
        conn.execute("CREATE ROLE sleeper NOLOGIN")
    sleeper = f"postgresql://sleeper@127.0.0.1:{postgres.port}/postgres"
    with pytest.raises(BackendAuthenticationError):
        PostgresBackend(sleeper).ping()
    right = wrong.replace("wrong-pw", "right-pw")
    with psycopg.connect(postgres.dsn, autocommit=True) as conn:
        conn.execute("GRANT ALL ON SCHEMA public TO pwbot")
    with StateService(PostgresBackend(right, table_prefix="pwbot")) as svc:
        assert svc.update("ana", {"a": 1}) == {"a": 1}

    async def main() -> None:
        backend = AsyncPostgresBackend(wrong, pool_timeout=30)
        with pytest.raises(BackendAuthenticationError):
            await backend.load("ana")
        await backend.aclose()

    asyncio.run(main())


def test_an_unreachable_server_is_backend_unavailable_and_a_write_says_nothing_was_sent() -> None:
    """No connection at all: BackendUnavailable (not OutcomeUnknown), for reads and writes."""
    backend = PostgresBackend("postgresql://x@127.0.0.1:1/db", pool_timeout=0.5)
    with StateService(backend) as svc, pytest.raises(BackendUnavailable) as info:
        svc.update("ana", {"a": 1})
    assert not isinstance(info.value, OutcomeUnknown)
    assert "nothing was sent" in str(info.value)


def test_a_pool_you_pass_stays_yours_and_needs_no_autocommit(postgres: servers.Postgres) -> None:
    """A psycopg_pool pool is used as it is (autocommit restored) and never closed by chatstate."""
    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    with ConnectionPool(postgres.dsn, min_size=1, max_size=2) as pool:
        with StateService(PostgresBackend(pool, table_prefix="mine")) as svc:
            svc.update("ana", {"a": 1})
            with pool.connection() as conn:
                assert not conn.autocommit
        assert not pool.closed

    async def main() -> None:
        async with AsyncConnectionPool(postgres.dsn, min_size=1, max_size=2, open=False) as pool:
            backend = AsyncPostgresBackend(pool, table_prefix="mine")
            assert await backend.load("ana") is not None
            await backend.aclose()
            assert not pool.closed

    asyncio.run(main())


def test_writes_are_one_round_trip_on_a_cached_row(postgres: servers.Postgres) -> None:
    """After the first, each write of a user is one statement, its UPDATE first, nothing before it."""
    backend = PostgresBackend(postgres.dsn, table_prefix="trips")
    svc = StateService(backend)
    svc.update("ana", {"n": 0})
    sent: list[str] = []
    real = psycopg.Connection.execute

    def execute(self: psycopg.Connection[Any], query: Any, *args: Any, **kw: Any) -> Any:
        sent.append(" ".join(str(query).split()[:5]))
        return real(self, query, *args, **kw)

    psycopg.Connection.execute = execute  # type: ignore[method-assign]
    try:
        for n in range(5):
            svc.update("ana", {"n": n})
            svc.increment("ana", "hits")
    finally:
        psycopg.Connection.execute = real  # type: ignore[method-assign]
    assert sent == ['WITH u AS (UPDATE "public"."trips_users"'] * 10
    svc.close()


def _records(
    dsn: str, prefix: str, user: str
) -> tuple[list[tuple[Any, ...]], int | None, int | None]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"SELECT seq, op_key FROM {prefix}_ops WHERE user_id = %s ORDER BY seq",  # noqa: S608 - a test's own prefix
            (user,),
        ).fetchall()
        found = conn.execute(
            f"SELECT ops_seq, ops_floor FROM {prefix}_users WHERE user_id = %s",  # noqa: S608 - a test's own prefix
            (user,),
        ).fetchone()
    return (rows, found[0], found[1]) if found else (rows, None, None)


def test_the_records_table_holds_exactly_the_newest_ids(postgres: servers.Postgres) -> None:
    """Each write inserts its record; the trim (124 back to 100) deletes the oldest.

    Over the trim, with repeated op ids, from a cached row and from a fresh process's
    read, the records stored are exactly the newest ids, none missing, none twice,
    numbered on from a random base.
    """
    sent: list[str] = []
    base: int | None = None
    for round_ in range(3):
        with StateService(PostgresBackend(postgres.dsn, table_prefix="appended")) as svc:
            for i in range(60):
                op_id = f"op-{round_}-{i}"
                svc.update("ana", {"n": i}, op_id=op_id)
                sent.append(op_id)
                if base is None:
                    first = _records(postgres.dsn, "appended", "ana")[1]
                    assert first is not None
                    assert first > 1
                    base = first - 1
                if i % 7 == 0:
                    svc.update("ana", {"n": i}, op_id=op_id)  # a repeat records nothing
                svc.update("ana", {"m": i})  # a write without an op id records its own key
                sent.append("")
    rows, seq, floor = _records(postgres.dsn, "appended", "ana")
    assert base is not None
    assert seq is not None
    seqs = [r[0] for r in rows]
    assert seq - base == len(sent) == 360
    assert 100 <= len(rows) < 124
    assert seqs == list(range(seq - len(rows) + 1, seq + 1))  # the newest, none missing
    assert floor == seqs[0] - 1
    assert len({key for _, key in rows}) == len(rows)
    with StateService(PostgresBackend(postgres.dsn, table_prefix="appended")) as svc:
        assert svc.update_once("ana", {"n": 59}, op_id="op-2-59").status == "duplicate"
        assert svc.update_once("ana", {"n": 0}, op_id="op-0-0").status == "applied"


def test_an_expired_log_s_records_go_with_the_next_write(postgres: servers.Postgres) -> None:
    """A log that outlived the dedupe window leaves no record behind once the user writes.

    The next write starts a new log (its numbers go on) and deletes the old records in
    the same statement; an op id of the old log is new again. A purge leaves the records
    of a live document's expired log (the user's next write or erase takes them).
    """
    clock = FakeClock(1_700_000_000.0)
    backend = PostgresBackend(postgres.dsn, table_prefix="expiry", clock=clock)
    with StateService(backend, dedupe_window=60) as svc:
        for i in range(5):
            svc.update("ana", {"n": i}, op_id=f"a{i}")
            svc.update("bob", {"n": i}, op_id=f"b{i}")
        clock.now += 61
        assert svc.update_once("ana", {"n": 9}, op_id="a0").status == "applied"
        rows, seq, floor = _records(postgres.dsn, "expiry", "ana")
        assert len(rows) == 1
        assert seq is not None
        assert (rows[0][0], floor) == (seq, seq - 1)
        assert backend.purge() == 0  # both documents live on
        assert len(_records(postgres.dsn, "expiry", "bob")[0]) == 5
        assert _records(postgres.dsn, "expiry", "ana")[0] == rows
        assert svc.update_once("bob", {"n": 9}, op_id="b0").status == "applied"
        assert len(_records(postgres.dsn, "expiry", "bob")[0]) == 1
        assert svc.erase("bob") == ["document", "operations"]
        assert _records(postgres.dsn, "expiry", "bob")[0] == []


def test_a_purge_removes_an_expired_document_whose_log_lives_on(
    postgres: servers.Postgres,
) -> None:
    """An expired document leaves the table at the purge, even while its op ids are kept.

    Every write records an op id, so a document's row nearly always has a live log
    when the document expires: the purge sets ``doc`` to NULL (and a new rev, so a
    cached copy elsewhere is not written over) and keeps the log, which still
    answers a redelivery.
    """
    clock = FakeClock(1_700_000_000.0)
    backend = PostgresBackend(postgres.dsn, table_prefix="purged", clock=clock)
    other = PostgresBackend(postgres.dsn, table_prefix="purged", clock=clock)
    with StateService(backend, ttl=10, dedupe_window=600) as svc, StateService(other) as two:
        svc.update_once("ana", {"address": "Calle Mayor 1"}, op_id="m1")
        svc.update("bob", {"address": "Calle Menor 2"})
        assert two.get("ana") == {"address": "Calle Mayor 1"}  # cached in the other backend
        clock.now += 60
        assert svc.get("ana") == {}
        assert backend.purge() == 2
        with psycopg.connect(postgres.dsn) as conn:
            found = conn.execute(
                "SELECT user_id, doc, version, size, expires_at FROM purged_users ORDER BY 1"
            ).fetchall()
        assert found == [("ana", None, 0, 0, None), ("bob", None, 0, 0, None)]
        assert backend.purge() == 0
        assert (
            svc.update_once("ana", {"address": "Calle Mayor 1"}, op_id="m1").status == "duplicate"
        )
        assert two.update("ana", {"n": 1}) == {"n": 1}  # its cached row is stale: no resurrection
        assert svc.get("ana") == {"n": 1}


def _hold_after_store(backend: PostgresBackend) -> tuple[threading.Event, threading.Event]:
    """Make ``backend``'s locked writes wait, row locked and store sent, until released."""
    holding, release = threading.Event(), threading.Event()
    send = backend._send_store

    def held(conn: psycopg.Connection[Any], how: Any) -> Any:
        cur = send(conn, how)
        conn.execute("SELECT 1")  # the store has run: the row is locked, nothing committed
        holding.set()
        assert release.wait(60)
        return cur

    backend._send_store = held  # type: ignore[method-assign]
    return holding, release


def _wait_for_a_lock_wait(dsn: str) -> None:
    """Return once some session waits for a row lock (polled: a hang guard, not a pace)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(6000):
            found = conn.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()
            if found and found[0]:
                return
            threading.Event().wait(0.01)
    raise AssertionError("no session waited for the row lock")


def test_an_erase_during_a_write_leaves_no_record_and_the_user_writable(
    postgres: servers.Postgres,
) -> None:
    """erase() that waits for a write's row lock also deletes the record that write adds.

    Without the row lock taken first, the erase's snapshot predates the record: it was
    left behind, its op id counted as remembered again, and the user's next writes
    collided with it.
    """
    writer = PostgresBackend(postgres.dsn, table_prefix="eraserace", cache_size=0)
    svc = StateService(writer)
    for i in range(3):
        svc.update("ana", {"n": i}, op_id=f"a{i}")
    holding, release = _hold_after_store(writer)
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(svc.update("ana", {"n": 3}, op_id="a3")))
    thread.start()
    assert holding.wait(60)
    with StateService(PostgresBackend(postgres.dsn, table_prefix="eraserace")) as other:
        erased: list[list[str]] = []
        eraser = threading.Thread(target=lambda: erased.append(other.erase("ana")))
        eraser.start()
        _wait_for_a_lock_wait(postgres.dsn)
        release.set()
        thread.join(60)
        eraser.join(60)
        assert done
        assert erased == [["document", "operations"]]
        assert _records(postgres.dsn, "eraserace", "ana") == ([], None, None)
        for op_id in ("a3", "a4", "a5"):
            assert other.update_once("ana", {"op": op_id}, op_id=op_id).status == "applied"
        assert other.get("ana") == {"op": "a5"}
    svc.close()


def test_a_purge_during_a_write_that_renews_the_log_keeps_its_records(
    postgres: servers.Postgres,
) -> None:
    """A write just inside the dedupe window keeps the log, whatever a purge just past it sees.

    The purge's snapshot predates the write's commit: it must not delete the records
    that write keeps (their op ids would be new again for another window).
    """
    start = 1_700_000_000.0
    clock = FakeClock(start)
    writer = PostgresBackend(postgres.dsn, table_prefix="purgerace", clock=clock, cache_size=0)
    svc = StateService(writer, dedupe_window=60)
    for i in range(3):
        svc.update("ana", {"n": i}, op_id=f"a{i}")
    clock.now = start + 59.999
    holding, release = _hold_after_store(writer)
    thread = threading.Thread(target=lambda: svc.update("ana", {"n": 3}, op_id="a3"))
    thread.start()
    assert holding.wait(60)
    late = FakeClock(start + 60.001)
    purger = PostgresBackend(postgres.dsn, table_prefix="purgerace", clock=late)
    assert purger.purge() == 0
    release.set()
    thread.join(60)
    clock.now = start + 90
    assert svc.update_once("ana", {"n": 1}, op_id="a1").status == "duplicate"
    assert len(_records(postgres.dsn, "purgerace", "ana")[0]) == 4
    purger.close()
    svc.close()


def _fork(child: Any) -> int:
    """Fork; run ``child()`` in the child, which exits 0 if it returned (30 s at most)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() of a threaded process
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child, which reports by its exit status
        status = 1
        try:
            signal.alarm(30)  # a hang guard: a child stuck on an inherited lock dies
            child()
            status = 0
        finally:
            os._exit(status)
    return pid


def _exit_code(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _sessions(dsn: str) -> int:
    """The client sessions of the server, this query's own left out."""
    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()"
        ).fetchone()
    assert found is not None
    return int(found[0])


def test_a_forked_child_opens_its_own_pool_and_the_parent_keeps_its_own(
    postgres: servers.Postgres,
) -> None:
    """A backend used before a fork works in the child too, on connections of its own.

    The child's writes and the parent's, at the same time, all count, and neither
    process's session is disturbed (the child never sends on an inherited socket).
    The fork happens while a parent thread holds the backend's locks (as one in the
    middle of a first call would): the child makes its own.
    """
    backend = PostgresBackend(postgres.dsn, table_prefix="forked", max_connections=2)
    svc = StateService(backend)
    svc.increment("ana", "hits")

    def child() -> None:
        for _ in range(50):
            svc.increment("ana", "hits")

    with backend._ready_lock, backend._cache._lock:
        pid = _fork(child)
    for _ in range(50):
        svc.increment("ana", "hits")
    assert _exit_code(pid) == 0
    assert svc.get("ana") == {"hits": 101}
    with StateService(PostgresBackend(postgres.dsn, table_prefix="forked")) as fresh:
        assert fresh.get("ana") == {"hits": 101}
    svc.close()


def test_closing_a_backend_in_a_forked_child_leaves_the_parent_s_sessions(
    postgres: servers.Postgres,
) -> None:
    """close() in a child closes what the child opened, never the parent's connections."""
    svc = StateService(PostgresBackend(postgres.dsn, table_prefix="forkclose", max_connections=2))
    svc.increment("ana", "hits")
    before = _sessions(postgres.dsn)
    assert before >= 1
    assert _exit_code(_fork(svc.close)) == 0
    assert _sessions(postgres.dsn) == before
    svc.increment("ana", "hits")
    assert svc.get("ana") == {"hits": 2}
    svc.close()


def test_a_write_whose_row_is_erased_and_made_again_while_it_waits_runs_again(
    postgres: servers.Postgres,
) -> None:
    """The uncached write waits on a row that an erase deletes and another writer makes anew.

    Its locking read then finds no row and plans an insert, which loses to the new row:
    it runs again on that row instead of failing, and both writes count.
    """
    prefix = "remade"
    with StateService(PostgresBackend(postgres.dsn, table_prefix=prefix)) as other:
        other.increment("ana", "hits")
        writer = PostgresBackend(postgres.dsn, table_prefix=prefix, cache_size=0)
        send = writer._send_store
        remade: list[bool] = []

        def remake_first(conn: psycopg.Connection[Any], how: Any) -> Any:
            if not remade:  # the first attempt: another writer makes the row anew first
                remade.append(True)
                other.increment("ana", "hits")
            return send(conn, how)

        writer._send_store = remake_first  # type: ignore[method-assign]
        eraser = psycopg.connect(postgres.dsn)
        eraser.execute(f"SELECT FROM {prefix}_users WHERE user_id = 'ana' FOR UPDATE")
        svc = StateService(writer)
        done: list[Any] = []
        thread = threading.Thread(target=lambda: done.append(svc.increment("ana", "hits")))
        thread.start()
        _wait_for_a_lock_wait(postgres.dsn)  # the write's locking read waits for the eraser
        eraser.execute(f"DELETE FROM {prefix}_ops WHERE user_id = 'ana'")  # noqa: S608 - a constant
        eraser.execute(f"DELETE FROM {prefix}_users WHERE user_id = 'ana'")  # noqa: S608 - a constant
        eraser.commit()
        eraser.close()
        thread.join(60)
        assert remade == [True]
        assert done == [2]
        assert other.get("ana") == {"hits": 2}
        svc.close()
