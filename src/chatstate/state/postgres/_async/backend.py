"""The PostgreSQL backend: the one body of both twins.

``_sync/backend.py`` (:class:`~chatstate.state.postgres.PostgresBackend`) is
generated from this module by ``tools/unasync.py``: edit this one, then ``make
unasync``. The tables, statements, rows, the write plan and the error table are
in ``_core.py``, with no I/O.

A write costs one round trip when this backend holds the user's current row
(it read or wrote it last): an ``UPDATE ... WHERE rev = <cached rev>``. Else,
or when another process changed the row meanwhile, two (pipelined): ``BEGIN``,
a placeholder ``INSERT ... ON CONFLICT DO NOTHING`` and ``SELECT ... FOR
UPDATE``; then the ``UPDATE`` (or ``DELETE``) and ``COMMIT``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from chatstate.exceptions import (
    BackendError,
    OutcomeUnknown,
    StateError,
    StoreBusyError,
    UsageError,
)
from chatstate.state._async.leases import hold_lease_async
from chatstate.state._backend import (
    ERASED_PARTS,
    UNCHANGED,
    Outcome,
    Snapshot,
    Write,
    check_deadline,
    check_limit,
    check_prefix,
)
from chatstate.state.postgres._core import (
    DEFAULT_PREFIX,
    DEFAULT_SCHEMA,
    NO_ROW,
    SCHEMA_VERSION,
    TRANSLATED,
    Plan,
    Row,
    RowCache,
    Tables,
    check_conninfo,
    check_options,
    connect_error,
    describe_conninfo,
    live_snapshot,
    may_resend,
    new_rev,
    plan,
    schema_error,
    translate,
)
from chatstate.state.postgres._twins import new_lock_async, pause_async

__all__ = ["AsyncPostgresBackend"]

log = logging.getLogger("chatstate.state")

_RETRY_DELAYS = (0.05, 0.2, 0.5)
# How often the locked path runs again when its row was deleted and made anew meanwhile.
_LOCKED_ATTEMPTS = 10


# Every backend of this process, so that a forked child can drop what it inherited.
_LIVE_BACKENDS: weakref.WeakSet[AsyncPostgresBackend] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for backend in list(_LIVE_BACKENDS):
        backend._after_fork()  # noqa: SLF001 - the module's own class


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _remade(what: str, write: Write, *, applied_before: bool) -> StateError:
    """The error of a write whose row was erased and made anew under it every time."""
    why = f"its row was deleted and made again by other writers {_LOCKED_ATTEMPTS} times"
    if applied_before:  # an earlier attempt lost its connection: it may have committed
        return OutcomeUnknown(
            f"Failed to {what}: {why}; an earlier attempt may have been applied: calling "
            "again with the same op_id is safe",
            op_id=write.op_id or write.op_key,
        )
    return StoreBusyError(f"Failed to {what}: {why} while it waited; nothing was written")


async def _roll_back(conn: psycopg.AsyncConnection[Any]) -> None:
    """End a transaction a failure left open, if the connection still works.

    On a broken connection there is nothing to do: the server rolls back
    what the connection left unfinished, and the pool drops it.
    """
    if conn.closed or conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
        return
    with contextlib.suppress(*TRANSLATED):
        await conn.execute("ROLLBACK")


async def _stored(cur: psycopg.AsyncCursor[Any]) -> bool:
    """Whether a store statement's reply says it changed the row (1, not 0)."""
    found = await cur.fetchone()
    return found is not None and found[0] == 1


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: no bound)."""
    chars = list(prefix)
    while chars:
        code = ord(chars[-1]) + 1
        if code == 0xD800:  # surrogates are no characters
            code = 0xE000
        if code <= 0x10FFFF:  # the last code point
            chars[-1] = chr(code)
            return "".join(chars)
        chars.pop()
    return None


class AsyncPostgresBackend:
    """A store of documents in PostgreSQL (psycopg 3), for the processes of any number of machines.

    One row per user holds the JSON document, and the operation log's records
    are rows beside it, written with it: every write is atomic in one statement
    or one transaction (see ``docs/postgres.md``). The tables are made on first
    use (``create=True``) or by :meth:`install`.

    Args:
        conninfo: A connection string (``"postgresql://bot@db/bot"`` or
            ``"host=db dbname=bot"``): the backend opens, owns and closes a
            pool of connections to it. Or a psycopg_pool pool you made: it stays
            yours (:meth:`aclose` leaves it open); open it before the first call.
        schema: The PostgreSQL schema of the tables (made if missing).
        table_prefix: The start of the tables' names (``<prefix>_users``, ...),
            so several bots can share a schema.
        create: Make the tables on first use if they are missing; with
            ``False`` a missing table is a :class:`~chatstate.exceptions.BackendError`.
        clock: Wall-clock seconds since the epoch. TTLs, the dedupe window,
            claims and lock leases follow it, so every process must share it
            (the default, :func:`time.time`, with NTP); tests pass a fake one.
        max_connections: The most connections the backend's own pool opens.
        pool_timeout: How long a call waits for a connection (seconds) before
            :class:`~chatstate.exceptions.BackendUnavailable`.
        connect_timeout: How long opening a connection may take (seconds).
            libpq counts whole seconds and waits at least 2: ``0.5`` waits 2.
        prepared_statements: Let psycopg prepare the statements it runs often
            (its ``prepare_threshold`` of 5). ``False`` for PgBouncer in
            transaction mode before 1.21 (``prepare_threshold=None``).
        cache_size: How many users' rows the backend keeps to write them in
            one round trip (``0``: none; every write then takes two).
        resolve_attempts: How often a write whose connection broke is sent
            again (with its op id and nonce) before
            :class:`~chatstate.exceptions.OutcomeUnknown`.
        purge_every: How often (seconds on ``clock``) a write also deletes the
            rows that expired; :meth:`purge` does it on demand.

    Raises:
        ConfigurationError: an option is out of range or of the wrong type, or
            ``conninfo`` is not a connection string libpq can read (or an empty
            one, or one with a port, mode or keepalive libpq would refuse; the
            message never quotes it) or a pool.
        UsageError: ``conninfo`` is a pool of the other twin (a sync pool given
            to the asyncio backend, or the reverse).

    The first call connects once before opening the pool, so that refused
    credentials are a :class:`~chatstate.exceptions.BackendAuthenticationError`
    at once, and a server out of reach a
    :class:`~chatstate.exceptions.BackendUnavailable` that says why (rather than
    the pool's retries until ``pool_timeout``).
    """

    kind = "postgres"
    stores_schema = True

    def __init__(
        self,
        conninfo: str | AsyncConnectionPool[Any],
        *,
        schema: str = DEFAULT_SCHEMA,
        table_prefix: str = DEFAULT_PREFIX,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        max_connections: int = 10,
        pool_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        prepared_statements: bool = True,
        cache_size: int = 1024,
        resolve_attempts: int = 2,
        purge_every: float = 600.0,
    ) -> None:
        check_options(
            max_connections=max_connections,
            pool_timeout=pool_timeout,
            connect_timeout=connect_timeout,
            cache_size=cache_size,
            purge_every=purge_every,
            resolve_attempts=resolve_attempts,
            clock=clock,
            create=create,
            prepared_statements=prepared_statements,
        )
        self.tables = Tables(schema, table_prefix)
        check_conninfo(conninfo, AsyncConnectionPool, type(self).__name__)
        self._owned = isinstance(conninfo, str)
        self._conninfo = conninfo if isinstance(conninfo, str) else str(conninfo.conninfo)
        self._pool: AsyncConnectionPool[Any] | None = None if self._owned else conninfo  # type: ignore[assignment]
        self._pool_options: dict[str, Any] = {
            "max_size": max_connections,
            "timeout": float(pool_timeout),
            "kwargs": {
                "autocommit": True,
                "connect_timeout": max(1, round(connect_timeout)),
                "prepare_threshold": 5 if prepared_statements else None,
            },
        }
        self._pool_timeout = float(pool_timeout)
        self._create = create
        self._clock = clock
        self._cache_size = cache_size
        self._cache = RowCache(cache_size)
        self._resolve_attempts = resolve_attempts
        self._purge_every_ms = int(purge_every * 1000)
        self._next_purge_ms: int | None = None
        self._ready = False
        self._ready_lock = new_lock_async()
        self._closed = False
        _LIVE_BACKENDS.add(self)

    def __repr__(self) -> str:
        where = describe_conninfo(self._conninfo)
        address = f"{where.get('server.address', '')}:{where.get('server.port', '')}"
        return (
            f"<{type(self).__name__} {address} db={where.get('db.namespace', '')!r} "
            f"tables={self.tables.users}>"
        )

    def describe(self) -> dict[str, Any]:
        """What traces may say of it: ``db.system.name``, the server and database (no secret)."""
        return {"db.system.name": "postgresql", **describe_conninfo(self._conninfo)}

    # -- connections -------------------------------------------------------------------

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"{self!r} is closed")

    def _after_fork(self) -> None:
        """In a child just forked (one thread, before anything else runs): start over.

        The parent's connections are its own (a statement sent on one would
        corrupt both processes' sessions) and the pool's threads did not survive
        the fork: the child opens a pool of its own on its first call. The
        parent's pool is dropped, never closed (closing would end the parent's
        sessions; psycopg leaves an inherited connection alone when it is
        collected). The locks a parent's thread may have held at the fork are
        made anew, with the row cache. A pool you passed stays as it is: it is
        yours to make in each process.
        """
        if not self._owned:
            return
        self._pool = None
        self._ready_lock = new_lock_async()
        self._cache = RowCache(self._cache_size)

    async def _opened(self) -> AsyncConnectionPool[Any]:
        """The pool, opened on first use (the tables not yet checked)."""
        self._check_open()
        if self._pool is None:
            await self._first_connection()
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                self._conninfo, min_size=1, open=False, name="chatstate", **self._pool_options
            )
            await pool.open()
            self._pool = pool
        return self._pool

    async def _first_connection(self) -> None:
        """Connect once before the pool is made, to say why the server refuses, if it does.

        The pool retries a connection that fails in the background and reports
        only that none came within ``pool_timeout``: refused credentials would be
        a :class:`~chatstate.exceptions.BackendUnavailable` after that wait. This
        makes them a :class:`~chatstate.exceptions.BackendAuthenticationError` at
        once, and any other failure to connect a ``BackendUnavailable`` that
        says why (nothing was sent).
        """
        kwargs = self._pool_options["kwargs"]
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, connect_timeout=kwargs["connect_timeout"], autocommit=True
            )
        except psycopg.Error as exc:
            raise connect_error(exc) from None
        await conn.close()

    async def _open_pool(self) -> AsyncConnectionPool[Any]:
        """The pool, opened and the tables checked (made if asked) on first use."""
        if self._ready and self._pool is not None:
            return self._pool
        async with self._ready_lock:
            pool = await self._opened()
            if not self._ready:
                async with self._borrowed(pool) as conn:
                    await self._check_tables(conn)
                self._ready = True
            return pool

    @contextlib.asynccontextmanager
    async def _borrowed(
        self, pool: AsyncConnectionPool[Any]
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection of ``pool`` in autocommit mode (restored for a pool you own)."""
        async with pool.connection(timeout=self._pool_timeout) as conn:
            if conn.autocommit:
                yield conn
                return
            await conn.set_autocommit(True)
            try:
                yield conn
            finally:
                if not conn.closed:
                    await conn.set_autocommit(False)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """A connection in autocommit mode, the tables checked."""
        self._check_open()
        pool = await self._open_pool()
        if not self._owned:
            async with self._borrowed(pool) as conn:
                yield conn
            return
        # The backend's own pool makes its connections in autocommit mode: taken and
        # given back directly, without the pool's context manager and its COMMIT check
        # (about 10 us of a write that takes 470).
        conn = await pool.getconn(timeout=self._pool_timeout)
        try:
            yield conn
        finally:
            await pool.putconn(conn)

    async def _after_broken(self, attempt: int) -> None:
        """After a broken connection: drop the pool's other dead ones, wait a little."""
        if self._pool is not None:
            with contextlib.suppress(*TRANSLATED):
                await self._pool.check()
        await pause_async(_RETRY_DELAYS[min(attempt, len(_RETRY_DELAYS) - 1)])

    async def _idempotent(self, what: str, call: Callable[[Any], Any]) -> Any:
        """Run ``call(conn)``; sent again on a new connection if the connection broke."""
        for attempt in range(len(_RETRY_DELAYS) + 1):
            try:
                async with self._connection() as conn:
                    return await call(conn)
            except TRANSLATED as exc:
                if attempt < len(_RETRY_DELAYS) and may_resend(exc):
                    await self._after_broken(attempt)
                    continue
                raise translate(exc, what) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- tables ------------------------------------------------------------------------

    async def _check_tables(self, conn: psycopg.AsyncConnection[Any]) -> None:
        try:
            cur = await conn.execute(self.tables.version)
            found = await cur.fetchone()
        except psycopg.errors.UndefinedTable:
            found = None
        if found is not None and found[0] > SCHEMA_VERSION:
            raise schema_error(found[0])
        if found is None:
            if not self._create:
                raise BackendError(
                    f"chatstate's tables ({self.tables.users}, ...) are missing: make them "
                    "with install(), or pass create=True"
                )
            await self._install(conn)

    async def _install(self, conn: psycopg.AsyncConnection[Any]) -> None:
        async with conn.transaction():
            await conn.execute(self.tables.install_lock)
            statements = self.tables.install()
            cur = await conn.execute(self.tables.schema_exists, (self.tables.schema,))
            if await cur.fetchone() is not None:
                statements = statements[1:]  # CREATE SCHEMA checks rights even IF NOT EXISTS
            for statement in statements:
                await conn.execute(statement)
            cur = await conn.execute(self.tables.version)
            found = await cur.fetchone()
            if found is not None and found[0] > SCHEMA_VERSION:
                raise schema_error(found[0])

    async def install(self) -> None:
        """Make the tables now if they are missing (``create=True`` does it on first use).

        Needs the ``CREATE`` right on the schema (and on the database if the schema
        is missing). ``chatstate.state.postgres.install_sql()`` prints the same
        statements for a DBA to run by hand.
        """
        async with self._ready_lock:
            pool = await self._opened()
            try:
                async with self._borrowed(pool) as conn:
                    await self._install(conn)
            except TRANSLATED as exc:
                raise translate(exc, "install the tables") from exc
            self._ready = True

    async def aclose(self) -> None:
        """Close the pool if this backend opened it; it cannot be used afterwards."""
        self._closed = True
        self._cache.clear()
        pool, self._pool = self._pool, None
        if pool is not None and self._owned:
            await pool.close()

    # -- documents ---------------------------------------------------------------------

    async def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None`` (decoded when its data is first read)."""

        async def read(conn: psycopg.AsyncConnection[Any]) -> Row:
            cur = await conn.execute(self.tables.select, (user_id,))
            return Row.read(await cur.fetchone())

        row: Row = await self._idempotent(f"read user {user_id!r}", read)
        self._cache.put(user_id, row)
        return live_snapshot(user_id, row, self._now_ms())[0]

    async def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically: one round trip on a cached row, else two."""
        what = f"write user {user_id!r}"
        lost: BaseException | None = None
        for attempt in range(self._resolve_attempts + 1):
            try:
                async with self._connection() as conn:
                    outcome = (
                        await self._apply_cached(conn, user_id, write) if not attempt else None
                    )
                    for _ in range(_LOCKED_ATTEMPTS):
                        if outcome is not None:
                            break
                        outcome = await self._apply_locked(conn, user_id, write)
                    if outcome is None:
                        raise _remade(what, write, applied_before=lost is not None)
            except TRANSLATED as exc:
                self._cache.drop(user_id)
                if not may_resend(exc):
                    raise translate(exc, what, write, unknown=lost is not None) from exc
                lost = exc
                if attempt < self._resolve_attempts:
                    await self._after_broken(attempt)
                continue
            await self._maybe_purge()
            return outcome
        assert lost is not None
        raise translate(lost, what, write, unknown=True) from lost

    async def _apply_cached(
        self, conn: psycopg.AsyncConnection[Any], user_id: str, write: Write
    ) -> Outcome | None:
        """One statement on the cached row; ``None`` when there is none or it is stale."""
        row = self._cache.get(user_id)
        if row is None:
            return None
        try:
            outcome, how = plan(user_id, row, write, self._now_ms())
        except Exception:  # noqa: BLE001 - a refusal may come of a stale row: decided under lock
            return None
        if how is UNCHANGED:
            cur = await conn.execute(self.tables.revision, (user_id,))
            found = await cur.fetchone()
            return outcome if (None if found is None else found[0]) == row.rev else None
        assert isinstance(how, Plan)
        if not await self._store(conn, how):
            self._cache.drop(user_id)
            return None
        self._cache.put(user_id, how.row)
        return outcome

    async def _send_store(
        self, conn: psycopg.AsyncConnection[Any], how: Plan
    ) -> psycopg.AsyncCursor[Any]:
        """Send the plan's statement (in a pipeline, its reply is read later)."""
        sql = self.tables.store(how.how, record=how.record, trim=how.trim)
        return await conn.execute(sql, how.params)

    async def _store(self, conn: psycopg.AsyncConnection[Any], how: Plan) -> bool:
        """Run the plan's statement; True if the row was the one it was made from."""
        return await _stored(await self._send_store(conn, how))

    async def _apply_locked(
        self, conn: psycopg.AsyncConnection[Any], user_id: str, write: Write
    ) -> Outcome | None:
        """Read the row under ``FOR UPDATE``, plan, store: two pipelined round trips.

        The first sends ``BEGIN``, the placeholder, the locking read and the
        records; the second the store and ``COMMIT`` (or ``ROLLBACK`` when nothing
        changes). Explicit statements, not psycopg's transaction block, whose
        entry and exit each wait for the server in a pipeline.

        ``None`` (nothing written) when the row the lock waited for was deleted
        (an ``erase``) and another writer made a new one before this write's
        insert: the caller runs it again, on that row.
        """
        try:
            async with conn.pipeline() as pipeline:
                await conn.execute("BEGIN")
                await conn.execute(self.tables.placeholder, (user_id,))
                locked = await conn.execute(self.tables.select_for_update, (user_id,))
                records = await conn.execute(self.tables.select_ops, (user_id,))
                await pipeline.sync()
                found = await locked.fetchone()
                ops = await records.fetchone()
                row = Row.read(found, ops[0] if ops else None)
                outcome, how = plan(user_id, row, write, self._now_ms())
                if how is UNCHANGED:
                    # Nothing to store; the placeholder, if it is ours, goes with the rollback.
                    await conn.execute("ROLLBACK")
                    stored = row if row.rev else NO_ROW
                    sent = None
                else:
                    assert isinstance(how, Plan)
                    sent = await self._send_store(conn, how)
                    await conn.execute("COMMIT")
                    stored = how.row
        except BaseException:
            await _roll_back(conn)
            raise
        if sent is not None and not await _stored(sent):
            self._cache.drop(user_id)
            return None
        self._cache.put(user_id, stored)
        return outcome

    # -- expiry ------------------------------------------------------------------------

    async def _maybe_purge(self) -> None:
        now = self._now_ms()
        if self._next_purge_ms is None:
            self._next_purge_ms = now + self._purge_every_ms
        elif now >= self._next_purge_ms:
            self._next_purge_ms = now + self._purge_every_ms
            try:
                await self.purge()
            except BackendError as exc:  # the write is done: a failed purge waits for the next
                log.warning("chatstate: purging expired PostgreSQL rows failed: %s", exc)

    async def purge(self) -> int:
        """Delete every expired row now (writes also do it every ``purge_every``); return how many.

        Expired data is invisible at once either way; this only gives the space back
        (to PostgreSQL's free space: ``VACUUM`` reuses it).
        """
        now = self._now_ms()

        async def run(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(self.tables.purge, {"now": now, "rev": new_rev()})
            found = await cur.fetchone()
            return int(found[0]) if found else 0

        removed: int = await self._idempotent("purge expired rows", run)
        return removed

    # -- listing and erasure -------------------------------------------------------------

    async def users(self, prefix: str = "", *, batch: int = 500) -> AsyncIterator[str]:
        """Every user id with a live document starting with ``prefix``, in byte order.

        Read ``batch`` ids at a time, each page a statement of its own after the
        last id of the one before, so nothing is held between steps.
        """
        check_prefix(prefix)
        batch = check_limit(batch)
        end = _prefix_end(prefix)
        after: str | None = None
        while True:
            params = {
                "start": prefix,
                "prefix": prefix,
                "after": after,
                "end": end,
                "now": self._now_ms(),
                "batch": batch,
            }
            sql = self.tables.users_page(after=after is not None, bounded=end is not None)

            async def page(
                conn: psycopg.AsyncConnection[Any], sql: str = sql, params: Any = params
            ) -> list[Any]:
                cur = await conn.execute(sql, params)
                return await cur.fetchall()

            rows: list[Any] = await self._idempotent("list users", page)
            for (user_id,) in rows:
                yield str(user_id)
            if len(rows) < batch:
                return
            after = str(rows[-1][0])

    async def erase(self, user_id: str) -> list[str]:
        """Remove everything kept for the user, in one statement; return what there was.

        The names are those of :data:`~chatstate.state.ERASED_PARTS` that existed
        (and had not expired): the document, its operation ids, a claim, the
        user's locks and the deadline entry.
        """
        params = {"user_id": user_id, "now": self._now_ms()}

        async def run(conn: psycopg.AsyncConnection[Any]) -> tuple[Any, ...]:
            async with conn.transaction():
                await conn.execute(self.tables.lock_row, (user_id,))
                cur = await conn.execute(self.tables.erase, params)
                found = await cur.fetchone()
            assert found is not None
            return tuple(found)

        self._cache.drop(user_id)
        found: tuple[Any, ...] = await self._idempotent(f"erase user {user_id!r}", run)
        self._cache.drop(user_id)
        return [part for part, there in zip(ERASED_PARTS, found, strict=True) if there]

    async def ping(self) -> float:
        """Round-trip the server once; return the latency in seconds."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> float:
            start = time.perf_counter()
            await conn.execute("SELECT 1")
            return time.perf_counter() - start

        latency: float = await self._idempotent("ping the server", run)
        return latency

    # -- the deadline index (flow reminders and timeouts) ----------------------------------

    async def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """Index the user's next deadline at ``at_ms`` (any clock, in milliseconds).

        With ``earlier_only`` an existing entry only ever moves earlier (see
        :class:`~chatstate.state.DeadlineIndex`); otherwise it is set to ``at_ms``.
        """
        at_ms = check_deadline(at_ms)
        sql = self.tables.schedule(earlier_only=earlier_only)

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(sql, (user_id, at_ms))

        await self._idempotent(f"schedule user {user_id!r}", run)

    async def unschedule(self, user_id: str) -> None:
        """Remove the user's entry from the deadline index, if any."""

        async def run(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(self.tables.unschedule, (user_id,))

        await self._idempotent(f"unschedule user {user_id!r}", run)

    async def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """The entries due at ``now_ms``, earliest first, at most ``limit``; none is removed.

        A plain read: under PostgreSQL's MVCC it never waits for another
        process's lock, so several processes poll at once; the router's claim on
        each user decides which one handles it.
        """
        limit, now_ms = check_limit(limit), check_deadline(now_ms)

        async def run(conn: psycopg.AsyncConnection[Any]) -> list[Any]:
            cur = await conn.execute(self.tables.due, (now_ms, limit))
            return await cur.fetchall()

        rows: list[Any] = await self._idempotent("read due deadlines", run)
        return [(str(user_id), int(at_ms)) for user_id, at_ms in rows]

    # -- per-user locks ------------------------------------------------------------------

    async def try_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """Take the lock for ``token`` if it is free or its holder's lease ran out (one attempt)."""
        now = self._now_ms()
        until = now + max(1, int(lease * 1000))

        async def run(conn: psycopg.AsyncConnection[Any]) -> bool:
            cur = await conn.execute(self.tables.try_lock, (user_id, name, token, until, now))
            return cur.rowcount == 1

        taken: bool = await self._idempotent(f"lock user {user_id!r}", run)
        return taken

    async def renew_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """Extend the lock held under ``token`` to ``lease`` from now; False if it is not held.

        A lapsed lock is never taken back (another holder may have run).
        """
        now = self._now_ms()
        until = now + max(1, int(lease * 1000))

        async def run(conn: psycopg.AsyncConnection[Any]) -> bool:
            cur = await conn.execute(self.tables.renew_lock, (until, user_id, name, token, now))
            return cur.rowcount == 1

        renewed: bool = await self._idempotent(f"renew a lock of user {user_id!r}", run)
        return renewed

    async def unlock(self, user_id: str, name: str, token: str) -> bool:
        """Release the lock held under ``token``; False if it was no longer ours (lapsed)."""
        now = self._now_ms()

        async def run(conn: psycopg.AsyncConnection[Any]) -> bool:
            cur = await conn.execute(self.tables.unlock, (user_id, name, token, now))
            found = await cur.fetchone()
            return bool(found is not None and found[0])

        released: bool = await self._idempotent(f"unlock user {user_id!r}", run)
        return released

    def lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold the user's lock ``name`` across processes and machines.

        A row in the locks table with a lease: taken when free or lapsed, polled
        for until ``wait`` runs out, renewed every third of ``lease`` while the
        block runs, and lapsing by itself ``lease`` seconds after the last
        renewal if its holder dies.

        Raises:
            LockTimeoutError: the lock was not free within ``wait`` seconds.
            LockLostError: the lease ran out while the lock was held (another
                holder may have run meanwhile); raised when the block ends
                without an error of its own.
        """
        return hold_lease_async(self, user_id, name, lease=lease, wait=wait)
