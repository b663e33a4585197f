"""The SQLite backend: persistent, embedded, standard library only.

For a bot that has outgrown memory (it must survive restarts, or run a few
worker processes on one machine) but runs no Redis. Every write is one
``BEGIN IMMEDIATE`` transaction around a read, :func:`apply_write` and a store,
so it is atomic across threads and processes that open the same file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Final, Literal

from chatstate.exceptions import (
    BackendError,
    BackendUnavailable,
    ConfigurationError,
    CorruptStateError,
    StoreBusyError,
    StoreFullError,
    UsageError,
)
from chatstate.state._async.leases import hold_lease_async
from chatstate.state._backend import (
    UNCHANGED,
    Acquire,
    Delete,
    Lease,
    OpLog,
    OpRecord,
    Outcome,
    Release,
    Snapshot,
    Write,
    apply_write,
    check_deadline,
    check_limit,
    check_prefix,
)
from chatstate.state._sync.leases import hold_lease_sync
from chatstate.typing import JSONObject

__all__ = ["AsyncSqliteBackend", "SqliteBackend"]

SCHEMA_VERSION: Final = 1
MIN_SQLITE: Final = (3, 24, 0)

_SCHEMA: Final = (
    # One row per user with a document. Times are milliseconds of the backend's clock.
    """CREATE TABLE IF NOT EXISTS chatstate_users (
        user_id TEXT PRIMARY KEY,
        doc TEXT NOT NULL,
        version INTEGER NOT NULL,
        size INTEGER NOT NULL,
        expires_at INTEGER,
        schema INTEGER NOT NULL DEFAULT 1
    ) WITHOUT ROWID""",
    # The operation log: recent op keys (JSON, oldest first) and the claim, each with
    # its own expiry; it outlives the document (a redelivery after a delete or expiry).
    """CREATE TABLE IF NOT EXISTS chatstate_ops (
        user_id TEXT PRIMARY KEY,
        records TEXT NOT NULL,
        seq INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        lease TEXT,
        lease_expires_at INTEGER
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS chatstate_deadlines (
        user_id TEXT PRIMARY KEY,
        at_ms INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS chatstate_deadlines_at ON chatstate_deadlines (at_ms, user_id)",
    """CREATE TABLE IF NOT EXISTS chatstate_locks (
        user_id TEXT NOT NULL,
        name TEXT NOT NULL,
        token TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        PRIMARY KEY (user_id, name)
    ) WITHOUT ROWID""",
)

_SCHEDULE: Final = (
    "INSERT INTO chatstate_deadlines (user_id, at_ms) VALUES (?, ?) "
    "ON CONFLICT (user_id) DO UPDATE SET at_ms = excluded.at_ms"
)
_SCHEDULE_EARLIER: Final = _SCHEDULE + " WHERE excluded.at_ms < chatstate_deadlines.at_ms"

# sqlite3 result codes (the primary code is the low byte of an extended one).
_BUSY_CODES: Final = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED
_FULL: Final = 13  # SQLITE_FULL
_CANTOPEN: Final = 14  # SQLITE_CANTOPEN

# Threads of one process queue on a lock per file rather than in SQLite's busy
# handler, whose sleeps grow to 100 ms; other processes still meet busy_timeout.
_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()  # also guards _OPEN

# The backends not yet closed, and the process their connections belong to: a forked
# child closes what each inherited before it opens a connection (_leave_parent_connections).
_OPEN: weakref.WeakSet[SqliteBackend] = weakref.WeakSet()
_OPEN_PID = os.getpid()
# What a forked child inherited in the middle of a transaction: never closed, so kept
# from the garbage collector (which would close it).
_LEFT_OPEN: list[sqlite3.Connection] = []


def _reset_file_locks() -> None:
    # A child forked while a thread held a lock would otherwise wait on it forever.
    global _FILE_LOCKS_GUARD  # noqa: PLW0603 - module state, reset in a forked child only
    _FILE_LOCKS.clear()
    _FILE_LOCKS_GUARD = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_file_locks)


def _file_lock(path: str) -> threading.Lock:
    with _FILE_LOCKS_GUARD:
        return _FILE_LOCKS.setdefault(path, threading.Lock())


def _leave_parent_connections() -> None:
    """In a forked child: close the connections every backend inherited, then start over.

    A child must never use its parent's connections, and must close them before it
    opens one of its own on the same file. SQLite keeps one record of its POSIX locks
    per file and process, and the child inherits that record, not the locks: while an
    inherited connection is open, a new one in the child counts on the parent's locks
    and takes none, so the parent's last connection to close can checkpoint and delete
    the WAL file under the child (whose writes then go to a deleted file). Closing one
    between transactions releases only the child's own (absent) locks. One that a
    thread of the parent had in a transaction at the fork stays open: closing it rolls
    back, which wipes the parent's uncommitted frames from the WAL index they share,
    and the file is malformed once the parent commits. (A fork with threads running is
    unsafe anyway; Python 3.12 and later warn of it.) Run once per child, when a
    backend is first used or closed there; never left to the garbage collector, which
    closes whatever it collects (Python 3.13 says so with a ResourceWarning).
    """
    global _OPEN_PID  # noqa: PLW0603 - module state, changed in a forked child only
    pid = os.getpid()
    with _FILE_LOCKS_GUARD:  # held throughout: a first use in another thread waits
        if pid == _OPEN_PID:
            return  # another thread of the child was first
        for backend in [b for b in _OPEN if b._pid != pid]:  # noqa: SLF001 - same module
            for conn in backend._forget_parent(pid):  # noqa: SLF001
                if conn.in_transaction:
                    _LEFT_OPEN.append(conn)
                    continue
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        _OPEN_PID = pid


def _dumps(value: Any) -> str:
    # Python's json writes ints exactly and floats by repr, which reads back bit for bit.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _corrupt(user_id: str, table: str, why: str) -> CorruptStateError:
    return CorruptStateError(
        f"{why} (user {user_id!r} in {table}); nothing was written", key=f"{table}:{user_id}"
    )


def _decode_doc(user_id: str, text: object) -> JSONObject:
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except ValueError:
        doc = None
    if type(doc) is not dict:
        raise _corrupt(user_id, "chatstate_users", "the stored document is not a JSON object")
    return doc


def _decode_log(user_id: str, records: object, seq: object, lease: object) -> OpLog:
    try:
        raw = json.loads(records) if isinstance(records, str) else None
        if type(raw) is not dict or type(seq) is not int:
            raise _corrupt(user_id, "chatstate_ops", "the stored operation log is unreadable")
        log = OpLog(
            {key: OpRecord(int(r[0]), int(r[1]), str(r[2]), str(r[3])) for key, r in raw.items()},
            seq,
        )
        if lease is not None:
            nonce, expires_ms, op_key = json.loads(str(lease))
            log.lease = Lease(str(nonce), int(expires_ms), str(op_key))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise _corrupt(user_id, "chatstate_ops", "the stored operation log is unreadable") from exc
    return log


def _check_schema(path: str, found: int) -> None:
    if found > SCHEMA_VERSION:
        raise BackendError(
            f"{path!r} was written by a newer chatstate "
            f"(schema {found}, this one reads {SCHEMA_VERSION})"
        )


def _busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return (code & 0xFF) in _BUSY_CODES
    text = str(exc)
    return "locked" in text or "busy" in text


@contextlib.contextmanager
def _mapped(path: str) -> Iterator[None]:
    """Turn sqlite3's errors into chatstate's, with the cause chained."""
    try:
        yield
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        primary = code & 0xFF if isinstance(code, int) else None
        if _busy(exc):
            raise StoreBusyError(
                f"the SQLite file {path!r} stayed locked by another writer past busy_timeout"
            ) from exc
        if primary == _FULL:
            raise StoreFullError(f"the disk holding {path!r} is full") from exc
        if primary == _CANTOPEN:
            raise BackendUnavailable(f"cannot open the SQLite file {path!r}: {exc}") from exc
        raise BackendError(f"SQLite failed on {path!r}: {exc}") from exc


class SqliteBackend:
    """A store of documents in one SQLite file, shared by threads and processes of one machine.

    Every write runs in one ``BEGIN IMMEDIATE`` transaction (read, apply, store),
    so it is atomic across every thread and process that opens the file. The
    file is in WAL mode: reads never wait for a writer. Each thread uses its own
    connection; :meth:`close` closes them all.

    Args:
        path: The database file (created with its tables if missing). Not
            ``":memory:"``: use :class:`~chatstate.MemoryBackend`.
        clock: Wall-clock seconds since the epoch. TTLs, the dedupe window,
            claims and lock leases follow it, so every process on the file must
            share it (the default, :func:`time.time`); tests pass a fake one.
        busy_timeout: How long a write waits for another process's
            transaction before :class:`~chatstate.exceptions.StoreBusyError` (seconds).
        synchronous: SQLite's ``synchronous`` setting. ``"NORMAL"`` (the
            default) survives any crash of the process; a power loss may roll
            back the last writes (whole transactions, never half of one).
            ``"FULL"`` also survives a power loss, at a cost per write.
        purge_every: How often (seconds on ``clock``) a write also deletes the
            rows that have expired (documents, op logs, claims, locks);
            :meth:`purge` does it on demand.

    Raises:
        ConfigurationError: an option is out of range.
        BackendError: the file cannot be opened or is not a chatstate database.
    """

    kind = "sqlite"
    stores_schema = True

    def describe(self) -> dict[str, Any]:
        """What traces may say of it: ``db.system.name`` (never the file's path)."""
        return {"db.system.name": "sqlite"}

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 5.0,
        synchronous: Literal["NORMAL", "FULL"] = "NORMAL",
        purge_every: float = 600.0,
    ) -> None:
        self.path = os.fspath(path)
        if self.path in ("", ":memory:") or self.path.startswith("file:"):
            raise ConfigurationError(
                "SqliteBackend needs a file path (use MemoryBackend for a store in memory)"
            )
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise ConfigurationError(
                f"SqliteBackend needs SQLite {'.'.join(map(str, MIN_SQLITE))} or later "
                f"(for UPSERT); this Python links {sqlite3.sqlite_version}"
            )
        for name, value in (("busy_timeout", busy_timeout), ("purge_every", purge_every)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a number of seconds, not {value!r}")
        if not busy_timeout >= 0:
            raise ConfigurationError("busy_timeout must be >= 0 seconds")
        if not purge_every > 0:
            raise ConfigurationError("purge_every must be > 0 seconds")
        if not callable(clock):
            raise ConfigurationError("clock must be a function returning Unix seconds")
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigurationError('synchronous must be "NORMAL" or "FULL"')
        self._clock = clock
        self._busy_timeout = float(busy_timeout)
        self._synchronous = synchronous
        self._purge_every_ms = int(purge_every * 1000)
        self._next_purge_ms: int | None = None
        self._local = threading.local()
        self._conns: dict[threading.Thread, sqlite3.Connection] = {}
        self._guard = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._lock_key = os.path.realpath(self.path)
        self._write_lock = _file_lock(self._lock_key)
        with _FILE_LOCKS_GUARD:
            _OPEN.add(self)
        try:
            self._init_schema()
        except BaseException:
            self.close()  # not a database, or a newer one: its connection closed too
            raise

    def __repr__(self) -> str:
        return f"<SqliteBackend {self.path!r}>"

    # -- connections -------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # autocommit: transactions are explicit
            check_same_thread=False,  # close() may run on another thread
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and self._pid == os.getpid():
            return conn
        if os.getpid() != _OPEN_PID:  # a forked child, even if this backend was made in it
            _leave_parent_connections()
        self._check_open()
        with _mapped(self.path):
            conn = self._connect()
        with self._guard:
            if self._closed:  # close() ran meanwhile and cannot see this one: close it here
                conn.close()
                raise UsageError(f"{self!r} is closed")
            # Close the connections of threads that have ended (an executor's, say).
            for thread in [t for t in self._conns if not t.is_alive()]:
                self._conns.pop(thread).close()
            self._conns[threading.current_thread()] = conn
        self._local.conn = conn
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"{self!r} is closed")

    def _forget_parent(self, pid: int) -> list[sqlite3.Connection]:
        """Start over in forked child ``pid``; return the parent's connections, to close.

        Called with ``_FILE_LOCKS_GUARD`` held, by :func:`_leave_parent_connections`
        only. The locks are new: a thread of the parent may have held one at the fork.
        """
        inherited = list(self._conns.values())
        self._guard = threading.Lock()
        self._conns = {}
        self._local = threading.local()
        self._write_lock = _FILE_LOCKS.setdefault(self._lock_key, threading.Lock())
        self._pid = pid
        return inherited

    def _init_schema(self) -> None:
        conn = self._conn()
        with _mapped(self.path):
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if not mode or str(mode[0]).lower() != "wal":
                raise BackendError(f"could not put {self.path!r} in WAL mode (got {mode!r})")
            with self._write_lock:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    (found,) = conn.execute("PRAGMA user_version").fetchone()
                    _check_schema(self.path, found)
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: committed if the block returns, else rolled back."""
        conn = self._conn()  # first: after a fork it replaces the write lock
        with _mapped(self.path), self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT, which leaves the transaction open.
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def close(self) -> None:
        """Close every connection this backend opened; it cannot be used afterwards.

        In a forked child, this closes the connections inherited from the parent
        (as the first use there does), which leaves the parent's own open.
        """
        if os.getpid() != _OPEN_PID:
            _leave_parent_connections()
        with self._guard:
            self._closed = True
            conns, self._conns = self._conns, {}
            self._local = threading.local()
        with _FILE_LOCKS_GUARD:
            _OPEN.discard(self)
        for conn in conns.values():
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # -- documents ---------------------------------------------------------------

    def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None`` (decoded when its data is first read)."""
        now = self._now_ms()
        with _mapped(self.path):
            row = (
                self._conn()
                .execute(
                    "SELECT doc, version, schema FROM chatstate_users WHERE user_id = ? "
                    "AND (expires_at IS NULL OR expires_at > ?)",
                    (user_id, now),
                )
                .fetchone()
            )
        if row is None:
            return None
        text, version, schema = row
        if type(version) is not int or type(schema) is not int:
            raise _corrupt(user_id, "chatstate_users", "the stored version is not an integer")
        return Snapshot.lazy(version, lambda: _decode_doc(user_id, text), schema)

    def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically (one ``BEGIN IMMEDIATE`` transaction)."""
        with self._transaction() as db:
            now = self._now_ms()
            current, size, expires_at = self._read_doc(db, user_id, now)
            try:
                log, log_expires_at = self._read_log(db, user_id, now)
            except CorruptStateError:
                op = write.operation
                if not (isinstance(op, Delete) and op.force):
                    raise
                log, log_expires_at = OpLog(), 0  # a forced delete replaces a corrupt log
            result = apply_write(current, log, write, now, size)
            data = result.data
            if data is not UNCHANGED:
                if data is None:
                    db.execute("DELETE FROM chatstate_users WHERE user_id = ?", (user_id,))
                else:
                    if write.ttl_ms is not None:
                        expires_at = now + write.ttl_ms
                    row = (user_id, _dumps(data), result.outcome.version, result.size)
                    db.execute(
                        "INSERT OR REPLACE INTO chatstate_users "
                        "(user_id, doc, version, size, expires_at, schema) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (*row, expires_at, result.schema),
                    )
            if result.log_changed:
                if not isinstance(write.operation, Acquire | Release):
                    # As on Redis: recorded ids live dedupe_ms after the last one; a
                    # claim lives by its own lease and keeps nothing else alive.
                    log_expires_at = now + write.dedupe_ms
                self._write_log(db, user_id, log, log_expires_at)
            self._maybe_purge(db, now)
            return result.outcome

    @staticmethod
    def _read_doc(
        db: sqlite3.Connection, user_id: str, now: int
    ) -> tuple[Snapshot | None, int, int | None]:
        """The live document (decoded when read), its size and expiry; drops an expired one."""
        row = db.execute(
            "SELECT doc, version, size, expires_at, schema FROM chatstate_users WHERE user_id = ?",
            (user_id,),
        ).fetchone()
        if row is None:
            return None, 0, None
        text, version, size, expires_at, schema = row
        if expires_at is not None and expires_at <= now:
            db.execute("DELETE FROM chatstate_users WHERE user_id = ?", (user_id,))
            return None, 0, None
        if type(version) is not int or type(size) is not int or type(schema) is not int:
            raise _corrupt(user_id, "chatstate_users", "a bad version, size or schema")
        snapshot = Snapshot.lazy(version, lambda: _decode_doc(user_id, text), schema)
        return snapshot, size, expires_at

    @staticmethod
    def _read_log(db: sqlite3.Connection, user_id: str, now: int) -> tuple[OpLog, int]:
        row = db.execute(
            "SELECT records, seq, expires_at, lease, lease_expires_at "
            "FROM chatstate_ops WHERE user_id = ?",
            (user_id,),
        ).fetchone()
        if row is None:
            return OpLog(), 0
        records, seq, expires_at, lease, lease_expires_at = row
        records_live = type(expires_at) is int and expires_at > now
        lease_live = type(lease_expires_at) is int and lease_expires_at > now
        log = _decode_log(
            user_id,
            records if records_live else "{}",
            seq if records_live else 0,
            lease if lease_live else None,
        )
        return log, expires_at if records_live else 0

    @staticmethod
    def _write_log(db: sqlite3.Connection, user_id: str, log: OpLog, expires_at: int) -> None:
        if not log.records and log.lease is None:
            db.execute("DELETE FROM chatstate_ops WHERE user_id = ?", (user_id,))
            return
        records = {k: [r.seq, r.version, r.nonce, r.digest] for k, r in log.records.items()}
        lease = log.lease
        db.execute(
            "INSERT OR REPLACE INTO chatstate_ops "
            "(user_id, records, seq, expires_at, lease, lease_expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (
                user_id,
                _dumps(records),
                log.seq,
                expires_at,
                None if lease is None else _dumps([lease.nonce, lease.expires_ms, lease.op_key]),
                None if lease is None else lease.expires_ms,
            ),
        )

    # -- expiry ------------------------------------------------------------------

    def _maybe_purge(self, db: sqlite3.Connection, now: int) -> None:
        if self._next_purge_ms is None:
            self._next_purge_ms = now + self._purge_every_ms
        elif now >= self._next_purge_ms:
            self._next_purge_ms = now + self._purge_every_ms
            self._purge(db, now)

    @staticmethod
    def _purge(db: sqlite3.Connection, now: int) -> int:
        # Named parameters, bound from a mapping: ":now" from a sequence is deprecated
        # from Python 3.12 on (a ProgrammingError from 3.14), and 3.12.0 to 3.12.3 say
        # the same of "?1" (CPython gh-117995).
        removed = 0
        for statement in (
            "DELETE FROM chatstate_users WHERE expires_at <= :now",
            (
                "DELETE FROM chatstate_ops WHERE expires_at <= :now "
                "AND (lease_expires_at IS NULL OR lease_expires_at <= :now)"
            ),
            "DELETE FROM chatstate_locks WHERE expires_at <= :now",
        ):
            removed += db.execute(statement, {"now": now}).rowcount
        return removed

    def purge(self) -> int:
        """Delete every expired row now (writes also do it every ``purge_every``); return how many.

        Expired data is invisible at once either way; this only gives the space back
        (to SQLite's free pages: the file itself shrinks only with ``VACUUM``).
        """
        with self._transaction() as db:
            return self._purge(db, self._now_ms())

    # -- erasure -----------------------------------------------------------------

    def users(self, prefix: str = "", *, batch: int = 500) -> Iterator[str]:
        """Every user id with a live document starting with ``prefix``, in byte order.

        Read ``batch`` ids at a time, each page in a statement of its own after
        the last id of the one before, so no read stays open between steps.
        """
        check_prefix(prefix)
        batch = check_limit(batch)
        after: str | None = None
        while True:
            now = self._now_ms()
            with _mapped(self.path):
                rows = (
                    self._conn()
                    .execute(
                        "SELECT user_id FROM chatstate_users WHERE user_id >= ? "
                        "AND (? IS NULL OR user_id > ?) AND substr(user_id, 1, ?) = ? "
                        "AND (expires_at IS NULL OR expires_at > ?) ORDER BY user_id LIMIT ?",
                        (prefix, after, after, len(prefix), prefix, now, batch),
                    )
                    .fetchall()
                )
            for (user_id,) in rows:
                yield str(user_id)
            if len(rows) < batch:
                return
            after = str(rows[-1][0])

    def erase(self, user_id: str) -> list[str]:
        """Remove everything kept for the user, in one transaction; return what there was.

        The names are those of :data:`~chatstate.state.ERASED_PARTS` that
        existed (and had not expired): the document, its operation ids (a
        redelivery after an erasure is new), a claim, the user's locks and the
        deadline entry.
        """
        with self._transaction() as db:
            now = self._now_ms()
            removed = []
            if db.execute(
                "DELETE FROM chatstate_users WHERE user_id = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (user_id, now),
            ).rowcount:
                removed.append("document")
            db.execute("DELETE FROM chatstate_users WHERE user_id = ?", (user_id,))
            row = db.execute(
                "SELECT expires_at > :now AND records != '{}', lease_expires_at > :now "
                "FROM chatstate_ops WHERE user_id = :user_id",
                {"now": now, "user_id": user_id},
            ).fetchone()
            db.execute("DELETE FROM chatstate_ops WHERE user_id = ?", (user_id,))
            if row is not None and row[0]:
                removed.append("operations")
            if row is not None and row[1]:
                removed.append("claim")
            if db.execute(
                "DELETE FROM chatstate_locks WHERE user_id = ? AND expires_at > ?",
                (user_id, now),
            ).rowcount:
                removed.append("lock")
            db.execute("DELETE FROM chatstate_locks WHERE user_id = ?", (user_id,))
            if db.execute("DELETE FROM chatstate_deadlines WHERE user_id = ?", (user_id,)).rowcount:
                removed.append("deadline")
            return removed

    # -- the deadline index (flow reminders and timeouts) ----------------------------

    def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """Index the user's next deadline at ``at_ms`` (any clock, in milliseconds).

        With ``earlier_only`` an existing entry only ever moves earlier (see
        :class:`~chatstate.state.DeadlineIndex`); otherwise it is set to ``at_ms``.
        """
        at_ms = check_deadline(at_ms)
        with self._transaction() as db:
            db.execute(_SCHEDULE_EARLIER if earlier_only else _SCHEDULE, (user_id, at_ms))

    def unschedule(self, user_id: str) -> None:
        """Remove the user's entry from the deadline index, if any."""
        with self._transaction() as db:
            db.execute("DELETE FROM chatstate_deadlines WHERE user_id = ?", (user_id,))

    def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """The entries due at ``now_ms``, earliest first, at most ``limit``; none is removed."""
        limit, now_ms = check_limit(limit), check_deadline(now_ms)
        with _mapped(self.path):
            rows = (
                self._conn()
                .execute(
                    "SELECT user_id, at_ms FROM chatstate_deadlines WHERE at_ms <= ? "
                    "ORDER BY at_ms, user_id LIMIT ?",
                    (now_ms, limit),
                )
                .fetchall()
            )
        return [(str(user_id), int(at_ms)) for user_id, at_ms in rows]

    # -- per-user locks ------------------------------------------------------------

    def try_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """Take the lock for ``token`` if it is free or its holder's lease ran out (one attempt)."""
        with self._transaction() as db:
            now = self._now_ms()
            row = db.execute(
                "SELECT expires_at FROM chatstate_locks WHERE user_id = ? AND name = ?",
                (user_id, name),
            ).fetchone()
            if row is not None and row[0] > now:
                return False
            db.execute(
                "INSERT OR REPLACE INTO chatstate_locks (user_id, name, token, expires_at) "
                "VALUES (?, ?, ?, ?)",
                (user_id, name, token, now + max(1, int(lease * 1000))),
            )
            return True

    def renew_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """Extend the lock held under ``token`` to ``lease`` from now; False if it is not held.

        A lapsed lock is never taken back (another holder may have run).
        """
        with self._transaction() as db:
            now = self._now_ms()
            renewed = db.execute(
                "UPDATE chatstate_locks SET expires_at = ? "
                "WHERE user_id = ? AND name = ? AND token = ? AND expires_at > ?",
                (now + max(1, int(lease * 1000)), user_id, name, token, now),
            )
            return renewed.rowcount == 1

    def unlock(self, user_id: str, name: str, token: str) -> bool:
        """Release the lock held under ``token``; False if it was no longer ours (lapsed)."""
        with self._transaction() as db:
            now = self._now_ms()
            row = db.execute(
                "SELECT expires_at FROM chatstate_locks WHERE user_id = ? AND name = ? "
                "AND token = ?",
                (user_id, name, token),
            ).fetchone()
            if row is None:
                return False
            db.execute(
                "DELETE FROM chatstate_locks WHERE user_id = ? AND name = ? AND token = ?",
                (user_id, name, token),
            )
            return bool(row[0] > now)

    def lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> contextlib.AbstractContextManager[None]:
        """Hold the user's lock ``name`` across threads and processes on this file.

        A row in the locks table with a lease: it is taken when free or lapsed,
        polled for until ``wait`` runs out (on the monotonic clock), renewed every
        third of ``lease`` while the block runs, and lapses by itself ``lease``
        seconds after the last renewal if its holder dies.

        Raises:
            LockTimeoutError: the lock was not free within ``wait`` seconds.
            LockLostError: the lease ran out while the lock was held (another
                holder may have run meanwhile); raised when the block ends
                without an error of its own.
        """
        return hold_lease_sync(self, user_id, name, lease=lease, wait=wait)


class AsyncSqliteBackend:
    """The asyncio face of a :class:`SqliteBackend`: each call runs in a worker thread.

    Args:
        store: A file path (this backend then opens, owns and closes its own
            :class:`SqliteBackend`), or a :class:`SqliteBackend` to share with
            sync code (it stays yours: :meth:`aclose` leaves it open).
        **options: The :class:`SqliteBackend` options, with a path only.
    """

    kind = "sqlite"
    stores_schema = True

    def describe(self) -> dict[str, Any]:
        """What traces may say of it: ``db.system.name`` (never the file's path)."""
        return {"db.system.name": "sqlite"}

    def __init__(self, store: str | os.PathLike[str] | SqliteBackend, **options: Any) -> None:
        if isinstance(store, SqliteBackend):
            if options:
                raise UsageError("options go to the SqliteBackend you pass, not here")
            self.store, self._owned = store, False
        else:
            self.store, self._owned = SqliteBackend(store, **options), True

    def __repr__(self) -> str:
        return f"<AsyncSqliteBackend {self.store.path!r}>"

    async def load(self, user_id: str) -> Snapshot | None:
        """Return the user's document, or ``None``."""
        return await asyncio.to_thread(self.store.load, user_id)

    async def apply(self, user_id: str, write: Write) -> Outcome:
        """Apply ``write`` atomically."""
        return await asyncio.to_thread(self.store.apply, user_id, write)

    async def aclose(self) -> None:
        """Close the store if this backend opened it."""
        if self._owned:
            await asyncio.to_thread(self.store.close)

    async def users(self, prefix: str = "", *, batch: int = 500) -> AsyncIterator[str]:
        """See :meth:`SqliteBackend.users` (each page read in a worker thread)."""
        pages = self.store.users(prefix, batch=batch)
        done = object()
        while True:
            user_id = await asyncio.to_thread(next, pages, done)
            if user_id is done:
                return
            yield str(user_id)

    async def erase(self, user_id: str) -> list[str]:
        """See :meth:`SqliteBackend.erase`."""
        return await asyncio.to_thread(self.store.erase, user_id)

    async def purge(self) -> int:
        """See :meth:`SqliteBackend.purge`."""
        return await asyncio.to_thread(self.store.purge)

    async def schedule(self, user_id: str, at_ms: int, *, earlier_only: bool = True) -> None:
        """See :meth:`SqliteBackend.schedule`."""
        await asyncio.to_thread(self.store.schedule, user_id, at_ms, earlier_only=earlier_only)

    async def unschedule(self, user_id: str) -> None:
        """See :meth:`SqliteBackend.unschedule`."""
        await asyncio.to_thread(self.store.unschedule, user_id)

    async def due(self, now_ms: int, limit: int = 100) -> list[tuple[str, int]]:
        """See :meth:`SqliteBackend.due`."""
        return await asyncio.to_thread(self.store.due, now_ms, limit)

    async def try_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """One attempt; a lock taken by an attempt whose caller was cancelled is given back."""
        store = self.store
        attempt = asyncio.ensure_future(
            asyncio.to_thread(store.try_lock, user_id, name, token, lease)
        )
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            loop = asyncio.get_running_loop()

            def give_back(done: asyncio.Future[bool]) -> None:
                if not done.cancelled() and done.exception() is None and done.result():
                    loop.run_in_executor(None, store.unlock, user_id, name, token)

            attempt.add_done_callback(give_back)
            raise

    async def unlock(self, user_id: str, name: str, token: str) -> bool:
        """See :meth:`SqliteBackend.unlock`."""
        return await asyncio.to_thread(self.store.unlock, user_id, name, token)

    async def renew_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """See :meth:`SqliteBackend.renew_lock`."""
        return await asyncio.to_thread(self.store.renew_lock, user_id, name, token, lease)

    def lock(
        self, user_id: str, name: str, *, lease: float, wait: float
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """The asyncio twin of :meth:`SqliteBackend.lock` (polls with ``asyncio.sleep``)."""
        return hold_lease_async(self, user_id, name, lease=lease, wait=wait)
