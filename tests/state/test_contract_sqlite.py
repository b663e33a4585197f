"""The backend contract suite on the SQLite backend, with a temp file per test and a fake clock.

Plus what only a file can show: several processes, reopening, locks across objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import re
import shutil
import sqlite3
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.stateful import invariant
from test_state_machine import RULES, ServiceModel

from chatstate.exceptions import (
    BackendError,
    ConfigurationError,
    CorruptStateError,
    LockLostError,
    LockTimeoutError,
    StoreBusyError,
    UsageError,
)
from chatstate.state import AsyncStateService, StateService, stored_size
from chatstate.state._sqlite import AsyncSqliteBackend, SqliteBackend
from chatstate.testing import BackendContract
from fakes import FakeClock
from strategies import canonical


class TestSqliteBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _store(self, tmp_path: Path) -> None:
        self.clock = FakeClock(1_700_000_000.0)
        self.path = tmp_path / "state.db"

    def make_backend(self) -> SqliteBackend:
        return SqliteBackend(self.path, clock=self.clock)

    def make_async_backend(self) -> AsyncSqliteBackend:
        return AsyncSqliteBackend(self.path, clock=self.clock)

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds


# -- several processes on one file ---------------------------------------------------

PROCESSES = 4
ROUNDS = 50
INCREMENTS_PER_ROUND = 4  # 200 per process


_barrier: Any = None


def _init_worker(barrier: Any) -> None:
    global _barrier  # noqa: PLW0603 - a pool hands a barrier over only through its initializer
    _barrier = barrier


def _worker(path: str, index: int) -> list[str]:
    """Per round: 4 increments and one update_once whose op id another process also sends.

    The barrier keeps each op id's copies within a few dozen writes of each
    other: an id is guaranteed remembered for the newest REMEMBERED_OPS writes
    only, and 800 increments in between would rightly let it be forgotten.
    """
    applied = []
    with StateService(SqliteBackend(path, busy_timeout=60)) as svc:
        for round_ in range(ROUNDS):
            _barrier.wait()
            op_id = f"op-{round_ + index % 2}"  # processes 1 and 3 run one round ahead
            for _ in range(INCREMENTS_PER_ROUND // 2):
                svc.increment("hot", "hits")
            # Every copy of an op id is the same request (another patch would be refused).
            out = svc.update_once("hot", {"seen": {op_id: True}}, op_id=op_id)
            if out.applied:
                applied.append(op_id)
            for _ in range(INCREMENTS_PER_ROUND // 2):
                svc.increment("hot", "hits")
    return applied


def test_four_processes_count_exactly_and_apply_each_op_id_once(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    SqliteBackend(path).close()  # create the tables once
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(PROCESSES)
    with ctx.Pool(PROCESSES, initializer=_init_worker, initargs=(barrier,)) as pool:
        work = pool.starmap_async(_worker, [(path, i) for i in range(PROCESSES)], chunksize=1)
        results = work.get(timeout=600)  # a hang guard (a worker that died), not a pace
    applied = [op for ops in results for op in ops]
    expected_ids = {f"op-{n}" for n in range(ROUNDS + 1)}
    assert sorted(applied) == sorted(expected_ids), "an op id applied twice or never"
    with StateService(SqliteBackend(path)) as svc:
        doc = svc.get("hot")
        assert doc["hits"] == PROCESSES * ROUNDS * INCREMENTS_PER_ROUND
        assert set(doc["seen"]) == expected_ids
        assert svc.snapshot("hot").version == PROCESSES * ROUNDS * INCREMENTS_PER_ROUND + len(
            expected_ids
        )


# -- persistence, locks, errors ----------------------------------------------------------


def test_data_survives_closing_and_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with StateService(SqliteBackend(path)) as svc:
        svc.update("ana", {"step": "pay", "cart": {"apples": 2}, "big": 2**63, "f": 0.1 + 0.2})
        svc.update_once("ana", {"n": 1}, op_id="m1")
        svc.manager.backend.schedule("ana", 5_000)  # type: ignore[attr-defined]
    backend = SqliteBackend(path)
    with StateService(backend) as svc:
        snap = svc.snapshot("ana")
        assert snap.version == 2
        assert snap.data == {
            "step": "pay",
            "cart": {"apples": 2},
            "big": 2**63,
            "f": 0.1 + 0.2,
            "n": 1,
        }
        assert svc.update_once("ana", {"n": 1}, op_id="m1").status == "duplicate"
        assert backend.due(10_000) == [("ana", 5_000)]
    with pytest.raises(UsageError):
        backend.load("ana")  # closed


def test_two_backends_on_one_file_exclude_each_others_locks(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    clock = FakeClock(1_700_000_000.0)
    a, b = SqliteBackend(path, clock=clock), SqliteBackend(path, clock=clock)
    try:
        with a.lock("ana", "refresh", lease=30, wait=1):
            with pytest.raises(LockTimeoutError), b.lock("ana", "refresh", lease=30, wait=0.05):
                pass
            with b.lock("ana", "other", lease=30, wait=0.05):
                pass
        with (
            b.lock("ana", "refresh", lease=30, wait=0.05),
            pytest.raises(LockTimeoutError),
            a.lock("ana", "refresh", lease=30, wait=0),
        ):
            pass
        # A holder that outlives its lease is taken over, and hears of it at the end.
        held = a.lock("ana", "refresh", lease=1, wait=0)
        held.__enter__()
        clock.now += 2
        with b.lock("ana", "refresh", lease=30, wait=0):
            pass
        with pytest.raises(LockLostError):
            held.__exit__(None, None, None)
    finally:
        a.close()
        b.close()


def test_the_async_lock_excludes_a_sync_holder_on_another_object(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    sync = SqliteBackend(path)

    async def main() -> None:
        backend = AsyncSqliteBackend(path)
        try:
            with sync.lock("ana", "x", lease=30, wait=0), pytest.raises(LockTimeoutError):
                async with backend.lock("ana", "x", lease=30, wait=0.05):
                    pass
            held = backend.lock("ana", "x", lease=30, wait=0)
            await held.__aenter__()
            assert await backend.erase("ana") == ["lock"]
            with pytest.raises(LockLostError):  # erased while held: no longer ours
                await held.__aexit__(None, None, None)
        finally:
            await backend.aclose()

    try:
        asyncio.run(main())
    finally:
        sync.close()


def test_an_async_backend_over_a_shared_store_leaves_it_open(tmp_path: Path) -> None:
    store = SqliteBackend(tmp_path / "state.db")

    async def main() -> None:
        async with AsyncStateService(AsyncSqliteBackend(store)) as svc:
            await svc.update("ana", {"a": 1})

    asyncio.run(main())
    assert StateService(store).get("ana") == {"a": 1}
    store.close()
    with pytest.raises(UsageError):
        AsyncSqliteBackend(store, busy_timeout=1)


def test_expired_rows_are_purged(tmp_path: Path) -> None:
    clock = FakeClock(1_700_000_000.0)
    backend = SqliteBackend(tmp_path / "state.db", clock=clock, purge_every=60)
    svc = StateService(backend, ttl=10, dedupe_window=10)
    svc.update_once("ana", {"a": 1}, op_id="m1")
    clock.now += 11
    assert svc.get("ana") == {}
    assert backend.purge() == 2  # the document and the op log
    svc.update("bob", {"b": 1})
    clock.now += 100
    svc.update("carl", {"c": 1})  # a write past purge_every purges on the way
    with contextlib.closing(sqlite3.connect(tmp_path / "state.db")) as raw:
        assert raw.execute("SELECT count(*) FROM chatstate_users").fetchone() == (1,)
    svc.close()


def test_corrupt_rows_raise_corrupt_state_and_nothing_is_written(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    svc = StateService(SqliteBackend(path))
    svc.update("ana", {"a": 1})
    svc.update_once("bob", {"b": 1}, op_id="m1")
    raw = sqlite3.connect(path, isolation_level=None)
    raw.execute("UPDATE chatstate_users SET doc = '{not json' WHERE user_id = 'ana'")
    raw.execute("UPDATE chatstate_ops SET records = '[1]' WHERE user_id = 'bob'")
    with pytest.raises(CorruptStateError) as info:
        svc.get("ana")
    assert "ana" in info.value.key
    with pytest.raises(CorruptStateError):
        svc.update("ana", {"b": 2})
    with pytest.raises(CorruptStateError):
        svc.update_once("bob", {"b": 2}, op_id="m2")
    assert raw.execute("SELECT doc FROM chatstate_users WHERE user_id = 'ana'").fetchone() == (
        "{not json",
    )
    svc.delete("bob", force=True)  # removes a corrupt op log along with the document
    assert svc.update_once("bob", {"b": 2}, op_id="m1").applied
    raw.close()
    svc.close()


def test_a_writer_holding_the_file_past_busy_timeout_is_store_busy(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    svc = StateService(SqliteBackend(path, busy_timeout=0.05))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreBusyError) as info:
            svc.update("ana", {"a": 1})
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert svc.get("ana") == {}  # WAL: reads do not wait for the writer
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert svc.update("ana", {"a": 1}) == {"a": 1}
    svc.close()


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[sqlite3.Connection]:
    """Every connection opened during the test, each a StrictBindingConnection."""
    made: list[sqlite3.Connection] = []

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = real_connect(*args, factory=StrictBindingConnection, **kwargs)
        made.append(conn)
        return conn

    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", connect)
    return made


NAMED_PARAMETER = re.compile(r"\?\d|[:@$][A-Za-z_]")


class StrictBindingConnection(sqlite3.Connection):
    """Refuses, on any Python, a named or numbered placeholder bound from a sequence.

    ``:name`` from a sequence is a DeprecationWarning (an error in this suite) from
    Python 3.12 on, and a ProgrammingError from 3.14; ``?1`` from a sequence is one on
    3.12.0 to 3.12.3 (CPython gh-117995).
    """

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if not isinstance(parameters, Mapping) and NAMED_PARAMETER.search(sql):
            raise sqlite3.ProgrammingError(f"a named parameter bound from a sequence: {sql}")
        return super().execute(sql, parameters)


def test_erase_and_purge_bind_named_parameters_from_a_mapping(
    tmp_path: Path, opened: list[sqlite3.Connection]
) -> None:
    clock = FakeClock(1_700_000_000.0)
    backend = SqliteBackend(tmp_path / "state.db", clock=clock, purge_every=60)
    with StateService(backend, ttl=10) as svc:
        svc.update_once("ana", {"a": 1}, op_id="m1")
        assert backend.try_lock("ana", "x", "token", 30)
        assert backend.erase("ana") == ["document", "operations", "lock"]
        svc.update("bob", {"b": 1})
        clock.now += 11
        assert backend.purge() == 1
        svc.update("carl", {"c": 1})
        clock.now += 100
        svc.update("dan", {"d": 1})  # a write past purge_every purges on the way
        assert backend.due(0) == []
    assert opened


def test_a_file_that_cannot_be_opened_leaves_no_connection_open(
    tmp_path: Path, opened: list[sqlite3.Connection]
) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not an SQLite file" * 100)
    newer = tmp_path / "newer.db"
    with contextlib.closing(sqlite3.connect(newer)) as raw:
        raw.execute("PRAGMA user_version = 2")
    with pytest.raises(BackendError, match="not a database"):
        SqliteBackend(junk)
    with pytest.raises(BackendError, match="newer chatstate"):
        SqliteBackend(newer)
    assert len(opened) == 3
    assert all(_closed(conn) for conn in opened), "left to the garbage collector"


def test_a_connection_opened_while_the_backend_closes_is_closed_too(
    tmp_path: Path, opened: list[sqlite3.Connection]
) -> None:
    backend = SqliteBackend(tmp_path / "state.db")
    connected, closed = threading.Event(), threading.Event()
    connect = backend._connect

    def slow_connect() -> sqlite3.Connection:
        conn = connect()
        connected.set()
        assert closed.wait(30)
        return conn

    backend._connect = slow_connect  # type: ignore[method-assign]
    refused: list[Exception] = []

    def load() -> None:
        try:
            backend.load("ana")
        except UsageError as exc:
            refused.append(exc)

    thread = threading.Thread(target=load)
    thread.start()
    assert connected.wait(30)
    backend.close()
    closed.set()
    thread.join()
    assert len(refused) == 1
    assert len(opened) == 2
    assert all(_closed(conn) for conn in opened)


def test_a_file_that_is_not_a_database_is_a_backend_error(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not an SQLite file" * 100)
    with pytest.raises(BackendError) as info:
        SqliteBackend(path)
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_memory_paths_and_bad_options_are_refused(tmp_path: Path) -> None:
    for bad in (":memory:", ""):
        with pytest.raises(ConfigurationError):
            SqliteBackend(bad)
    with pytest.raises(ConfigurationError):
        SqliteBackend(tmp_path / "x.db", busy_timeout=-1)
    with pytest.raises(ConfigurationError):
        SqliteBackend(tmp_path / "x.db", purge_every=0)
    with pytest.raises(ConfigurationError):
        SqliteBackend(tmp_path / "x.db", synchronous="OFF")  # type: ignore[arg-type]


def _increment_ten(svc: StateService) -> None:
    for _ in range(10):
        svc.increment("ana", "n")
    svc.close()


def test_a_forked_child_uses_its_own_connections(tmp_path: Path) -> None:
    svc = StateService(SqliteBackend(tmp_path / "state.db"))
    svc.update("ana", {"n": 0})
    child = multiprocessing.get_context("fork").Process(target=_increment_ten, args=(svc,))
    child.start()
    child.join(30)
    assert child.exitcode == 0
    assert svc.increment("ana", "n") == 11  # the parent's connection still works
    svc.close()


def _run_forked(target: Any, *args: Any) -> None:
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(30)
    assert child.exitcode == 0, "the child failed (its traceback is in the captured stderr)"


def _closed(conn: sqlite3.Connection) -> bool:
    try:
        conn.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


def _use_one_and_check_all_inherited_are_closed(
    used: SqliteBackend, inherited: list[sqlite3.Connection]
) -> None:
    used.load("ana")
    assert all(_closed(conn) for conn in inherited), "an inherited connection left open"
    used.close()


def test_a_forked_child_closes_what_every_backend_inherited_before_its_first_connection(
    tmp_path: Path,
) -> None:
    # Not left to the garbage collector (Python 3.13 warns of every connection it
    # closes), and those of a backend the child never uses are closed too.
    a, b = SqliteBackend(tmp_path / "state.db"), SqliteBackend(tmp_path / "state.db")
    with_a_thread = threading.Thread(target=a.load, args=("bob",))
    with_a_thread.start()
    with_a_thread.join()
    inherited = [*a._conns.values(), *b._conns.values()]
    assert len(inherited) == 3
    _run_forked(_use_one_and_check_all_inherited_are_closed, b, inherited)
    assert not any(_closed(conn) for conn in inherited)  # the parent's stay open
    assert a.load("ana") is None
    a.close()
    b.close()
    assert all(_closed(conn) for conn in inherited)


def _write_twice_around_the_parents_close(backend: SqliteBackend, ready: Any, go: Any) -> None:
    with StateService(backend) as svc:
        svc.update("kid", {"first": 1})
        ready.set()
        assert go.wait(30)
        svc.update("kid", {"second": 2})


def test_a_child_write_survives_the_parent_closing_its_last_connection(tmp_path: Path) -> None:
    # The child uses one of two backends. While the other's inherited connection was
    # open, the child's own took no lock on the file (SQLite counted the parent's), so
    # the parent, closing its last connection, deleted the WAL under the child: the
    # child's second write went to a deleted file and was lost.
    path = tmp_path / "state.db"
    other, used = SqliteBackend(path), SqliteBackend(path)
    used.load("ana")
    ctx = multiprocessing.get_context("fork")
    ready, go = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_write_twice_around_the_parents_close, args=(used, ready, go))
    child.start()
    try:
        assert ready.wait(30)
        other.close()
        used.close()
    finally:
        go.set()
        child.join(30)
    assert child.exitcode == 0
    with StateService(SqliteBackend(path)) as svc:
        assert svc.get("kid") == {"first": 1, "second": 2}


def _read_and_close(backend: SqliteBackend) -> None:
    assert backend.load("nobody") is None
    backend.close()


# The point of this test is a fork while a thread is in a transaction.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_during_a_transaction_leaves_it_to_the_parent(tmp_path: Path) -> None:
    # A transaction larger than the page cache spills its pages into the WAL before
    # COMMIT. A child that closed the connection it inherited in that transaction
    # would roll it back there, wiping those frames from the WAL index the processes
    # share: once the parent committed, the file would be malformed.
    path = tmp_path / "state.db"
    backend = SqliteBackend(path)
    began, forked = threading.Event(), threading.Event()

    def big_transaction() -> None:
        with backend._transaction() as db:
            db.execute("PRAGMA cache_size = 10")  # pages; the default holds about 2 MB
            db.executemany(
                "INSERT INTO chatstate_users (user_id, doc, version, size) VALUES (?, ?, 1, 2)",
                [(f"u{n}", '{"pad":"' + "x" * 2000 + '"}') for n in range(300)],
            )
            began.set()
            assert forked.wait(30)

    thread = threading.Thread(target=big_transaction)
    thread.start()
    try:
        assert began.wait(30)
        _run_forked(_read_and_close, backend)
    finally:
        forked.set()
        thread.join()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert raw.execute("SELECT count(*) FROM chatstate_users").fetchone() == (300,)
    assert backend.load("u299") is not None
    backend.close()


# -- the state machine of tests/state/test_state_machine.py, on a file -------------------------


class SqliteServiceModel(ServiceModel):
    """The dict model against a service on a SqliteBackend (JSON must round-trip exactly)."""

    def __init__(self) -> None:
        super().__init__()
        self.svc.close()
        self.dir = Path(tempfile.mkdtemp())
        self.backend = SqliteBackend(self.dir / "model.db")
        self.svc = StateService(self.backend, rules=RULES)

    @invariant()
    def matches_model(self) -> None:
        for user in ("ann", "bob", "a:{b}"):
            snap = self.svc.snapshot(user)
            assert canonical(snap.data) == canonical(self.docs.get(user, {}))
            assert snap.version == self.versions.get(user, 0)
            row = (
                self.backend._conn()
                .execute("SELECT size FROM chatstate_users WHERE user_id = ?", (user,))
                .fetchone()
            )
            assert (row[0] if row else 0) == stored_size(snap.data)

    def teardown(self) -> None:
        self.svc.close()
        shutil.rmtree(self.dir, ignore_errors=True)


TestSqliteServiceModel = SqliteServiceModel.TestCase
TestSqliteServiceModel.settings = settings(max_examples=25, stateful_step_count=20, deadline=None)


def test_a_cancelled_async_lock_attempt_leaves_the_lock_free(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    sync = SqliteBackend(path)

    async def main() -> None:
        backend = AsyncSqliteBackend(path)
        try:
            for ticks in range(6):  # cancel at different points of the attempt
                held = backend.lock("ana", "x", lease=30, wait=1)
                task = asyncio.create_task(held.__aenter__())
                for _ in range(ticks):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                if not task.cancelled():  # it got the lock before the cancel landed
                    await held.__aexit__(None, None, None)
                await asyncio.sleep(0.05)  # a give-back runs in the executor
                with sync.lock("ana", "x", lease=30, wait=1):
                    pass
        finally:
            await backend.aclose()

    try:
        asyncio.run(main())
    finally:
        sync.close()
