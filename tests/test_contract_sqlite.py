"""The backend contract suite on the SQLite backend, with a temp file per test and a fake clock.

Plus what only a file can show: several processes, reopening, locks across objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import shutil
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.stateful import invariant

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
from strategies import canonical
from test_state_machine import RULES, ServiceModel


class FakeClock:
    """A wall clock that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class TestSqliteBackend(BackendContract):
    @pytest.fixture(autouse=True)
    def _store(self, tmp_path: Path) -> None:
        self.clock = FakeClock()
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
        results = pool.starmap(_worker, [(path, i) for i in range(PROCESSES)], chunksize=1)
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
    clock = FakeClock()
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
    clock = FakeClock()
    backend = SqliteBackend(tmp_path / "state.db", clock=clock, purge_every=60)
    svc = StateService(backend, ttl=10, dedupe_window=10)
    svc.update_once("ana", {"a": 1}, op_id="m1")
    clock.now += 11
    assert svc.get("ana") == {}
    assert backend.purge() == 2  # the document and the op log
    svc.update("bob", {"b": 1})
    clock.now += 100
    svc.update("carl", {"c": 1})  # a write past purge_every purges on the way
    count = sqlite3.connect(tmp_path / "state.db").execute("SELECT count(*) FROM chatstate_users")
    assert count.fetchone() == (1,)
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


# -- the state machine of tests/test_state_machine.py, on a file -------------------------


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
