r"""What both PostgreSQL twins share, with no I/O: tables, statements, rows, the error table.

One row per user in ``<prefix>_users`` holds the document, the claim and the
operation log's counters; the log's records (one per remembered op id) are rows
of ``<prefix>_ops``, keyed by user and sequence number. Every change of a
user's row replaces ``rev``, a random 63-bit revision, and every change of the
user's records comes with one. A backend keeps the rows it last read or wrote
(records included) in a small cache; a write is computed by
:func:`~chatstate.state.backend.apply_write` on the cached row and stored with
one statement: ``UPDATE ... WHERE rev = <cached rev>``, with the new record's
``INSERT`` and the trim's ``DELETE`` as parts of it that apply only if the
``UPDATE`` did. One round trip, atomic, applied only to exactly the row it was
computed from. When the row changed meanwhile (another process wrote), nothing
is written and the write is made again under ``SELECT ... FOR UPDATE`` in a
transaction (two round trips, pipelined), which refreshes the cache. Because
``rev`` is random and never reused, a row deleted and made again never matches
a stale cache entry.

Why the records are not in the row (they were, as one ``json`` column): a log
of 100 ids is 4.5 KB, which every write rewrote; the row then no longer fit
twice in a page, so no update was HOT, and each wrote about 4.7 KB of WAL
against the naive ``doc || patch`` update's 196 bytes. A record of its own is
one small insert (and a trim, one ``DELETE`` every 24 writes).

The document column is ``json``, not ``jsonb``: ``jsonb`` stores numbers as
``numeric`` (``-0.0`` comes back as ``0.0``, ``1e16`` as the integer
``10000000000000000``) and refuses ``"\u0000"``, while chatstate promises every
JSON value back exactly as written. ``doc::jsonb`` works in queries.
"""

# ruff: noqa: S608 - every name in the SQL is checked by _IDENTIFIER and quoted; values are bound

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from threading import Lock
from typing import Any, Final

import attrs
import psycopg
import psycopg_pool

from chatstate.exceptions import (
    BackendAuthenticationError,
    BackendError,
    BackendPermissionError,
    BackendUnavailable,
    ConfigurationError,
    CorruptStateError,
    OutcomeUnknown,
    StateError,
    StoreBusyError,
    StoreFullError,
    UsageError,
)
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
)
from chatstate.typing import JSONObject

__all__ = [
    "DEFAULT_PREFIX",
    "DEFAULT_SCHEMA",
    "SCHEMA_VERSION",
    "Plan",
    "Row",
    "RowCache",
    "Tables",
    "check_conninfo",
    "connect_error",
    "install_sql",
    "translate",
]

SCHEMA_VERSION: Final = 1
"""The version of the tables this chatstate reads and writes (``<prefix>_meta``)."""
DEFAULT_SCHEMA: Final = "public"
"""The schema the tables live in unless ``schema=`` says otherwise."""
DEFAULT_PREFIX: Final = "chatstate"
"""The start of the tables' names unless ``table_prefix=`` says otherwise."""

_IDENTIFIER: Final = re.compile(r"[a-z_][a-z0-9_]{0,39}")

# The columns of a user's row, in the order every statement reads and writes them.
_COLUMNS: Final = (
    "rev",
    "doc",
    "version",
    "size",
    "schema",
    "expires_at",
    "ops_seq",
    "ops_floor",
    "ops_expires_at",
    "lease_nonce",
    "lease_expires_at",
    "lease_op_key",
)


def _identifier(what: str, value: object) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ConfigurationError(
            f"{what} must be a lowercase SQL name (a-z, 0-9, _; at most 40), not {value!r}"
        )
    if what == "schema" and value.startswith("pg_"):
        raise ConfigurationError(
            f"schema must not start with pg_ (PostgreSQL keeps those names), not {value!r}"
        )
    return value


@attrs.frozen
class Tables:
    """The tables of one bot (a schema and a table prefix), and every statement on them.

    Args:
        schema: The PostgreSQL schema the tables live in.
        prefix: The start of every table's name.

    Raises:
        ConfigurationError: a name is not a plain lowercase SQL name.
    """

    schema: str = attrs.field(default=DEFAULT_SCHEMA)
    prefix: str = attrs.field(default=DEFAULT_PREFIX)
    _stored: dict[tuple[str, bool, bool], str] = attrs.field(
        factory=dict, init=False, eq=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        _identifier("schema", self.schema)
        _identifier("table_prefix", self.prefix)

    def name(self, table: str) -> str:
        """The qualified name of one table (``"public"."chatstate_users"``)."""
        return f'"{self.schema}"."{self.prefix}_{table}"'

    @property
    def users(self) -> str:
        """One row per user: the document, the claim and the operation log's counters."""
        return self.name("users")

    @property
    def ops(self) -> str:
        """The operation log's records: one row per remembered op id."""
        return self.name("ops")

    @property
    def locks(self) -> str:
        """One row per held lock."""
        return self.name("locks")

    @property
    def deadlines(self) -> str:
        """The deadline index: one row per user with a deadline."""
        return self.name("deadlines")

    @property
    def meta(self) -> str:
        """The version of the tables."""
        return self.name("meta")

    def install(self) -> list[str]:
        """The statements that create the tables (each ``IF NOT EXISTS``), in order."""
        return [
            f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"',
            # Times are milliseconds of the backends' clock. doc is NULL while only the
            # operation log is kept (after a delete, or once the document expired).
            # ops_seq: the sequence number of the newest record; ops_floor: no record
            # at or below it is stored. fillfactor leaves room in each page for the
            # row's next version (a HOT update: no index write).
            f"""CREATE TABLE IF NOT EXISTS {self.users} (
                user_id text COLLATE "C" PRIMARY KEY,
                rev bigint NOT NULL,
                doc json,
                version bigint NOT NULL DEFAULT 0,
                size bigint NOT NULL DEFAULT 0,
                schema integer NOT NULL DEFAULT 1,
                expires_at bigint,
                ops_seq bigint NOT NULL DEFAULT 0,
                ops_floor bigint NOT NULL DEFAULT 0,
                ops_expires_at bigint NOT NULL DEFAULT 0,
                lease_nonce text,
                lease_expires_at bigint,
                lease_op_key text
            ) WITH (fillfactor = 80)""",
            # A record lives while its user's row says the log does (ops_expires_at);
            # the write that starts a new log deletes the old one's records.
            f"""CREATE TABLE IF NOT EXISTS {self.ops} (
                user_id text COLLATE "C" NOT NULL,
                seq bigint NOT NULL,
                op_key text COLLATE "C" NOT NULL,
                version bigint NOT NULL,
                nonce text NOT NULL,
                digest text NOT NULL,
                PRIMARY KEY (user_id, seq)
            )""",
            f"""CREATE TABLE IF NOT EXISTS {self.locks} (
                user_id text COLLATE "C" NOT NULL,
                name text COLLATE "C" NOT NULL,
                token text NOT NULL,
                expires_at bigint NOT NULL,
                PRIMARY KEY (user_id, name)
            )""",
            f"""CREATE TABLE IF NOT EXISTS {self.deadlines} (
                user_id text COLLATE "C" PRIMARY KEY,
                at_ms bigint NOT NULL
            )""",
            (
                f'CREATE INDEX IF NOT EXISTS "{self.prefix}_deadlines_at" '
                f"ON {self.deadlines} (at_ms, user_id)"
            ),
            f"""CREATE TABLE IF NOT EXISTS {self.meta} (
                name text PRIMARY KEY,
                value bigint NOT NULL
            )""",
            (
                f"INSERT INTO {self.meta} (name, value) VALUES ('schema', {SCHEMA_VERSION}) "
                "ON CONFLICT (name) DO NOTHING"
            ),
        ]

    @property
    def install_lock(self) -> str:
        """Serialises concurrent installs (``CREATE ... IF NOT EXISTS`` races otherwise)."""
        key = f"chatstate install {self.schema}.{self.prefix}"
        return f"SELECT pg_advisory_xact_lock(hashtext('{key}'))"

    @property
    def schema_exists(self) -> str:
        """Whether the schema exists (``CREATE SCHEMA`` checks rights even when it does)."""
        return "SELECT 1 FROM pg_namespace WHERE nspname = %s"

    @property
    def version(self) -> str:
        """The tables' version."""
        return f"SELECT value FROM {self.meta} WHERE name = 'schema'"

    # -- a user's row ----------------------------------------------------------------

    @property
    def select(self) -> str:
        """A user's row and its records, as of one snapshot (``doc`` as text: decoded exactly)."""
        return (
            f"SELECT {_SELECTED}, (SELECT {_RECORDS} FROM {self.ops} o "
            f"WHERE o.user_id = u.user_id AND {_LIVE}) FROM {self.users} u WHERE u.user_id = %s"
        )

    @property
    def select_for_update(self) -> str:
        """A user's row, locked until the transaction ends (its records: :attr:`select_ops`)."""
        return f"SELECT {_SELECTED}, NULL FROM {self.users} u WHERE u.user_id = %s FOR UPDATE"

    @property
    def select_ops(self) -> str:
        """A user's records, read in a statement of its own after the row is locked.

        Not a sub-select of :attr:`select_for_update`: when that statement waited
        for another writer, it returns the row that writer committed, while a
        sub-select would still read the records as they were before.
        """
        return (
            f"SELECT {_RECORDS} FROM {self.ops} o JOIN {self.users} u ON u.user_id = o.user_id "
            f"WHERE o.user_id = %s AND {_LIVE}"
        )

    @property
    def placeholder(self) -> str:
        """An empty row to lock when the user has none (it never outlives the transaction)."""
        return f"INSERT INTO {self.users} (user_id, rev) VALUES (%s, 0) ON CONFLICT DO NOTHING"

    def store(self, how: str, *, record: bool, trim: bool) -> str:
        """One statement that stores a planned row: says 1 if it was stored, else 0.

        ``how`` is ``"update"`` (only if the row is still the revision the write
        was computed from), ``"insert"`` (a new row, unless another writer made one
        first) or ``"delete"`` (the row and every record, at that revision).
        ``record`` inserts the write's record; ``trim`` deletes the records at or
        below ``%(floor)s``. Both happen only when the row's change did.
        """
        key = (how, record, trim)
        found = self._stored.get(key)
        if found is not None:
            return found
        marks = ", ".join(f"%({c})s" for c in _COLUMNS)
        if how == "update":
            sets = ", ".join(f"{c} = %({c})s" for c in _COLUMNS)
            change = (
                f"UPDATE {self.users} SET {sets} "
                "WHERE user_id = %(user_id)s AND rev = %(old_rev)s RETURNING 1"
            )
        elif how == "insert":
            change = (
                f"INSERT INTO {self.users} (user_id, {', '.join(_COLUMNS)}) "
                f"VALUES (%(user_id)s, {marks}) ON CONFLICT DO NOTHING RETURNING 1"
            )
        else:
            change = (
                f"DELETE FROM {self.users} WHERE user_id = %(user_id)s AND rev = %(old_rev)s "
                "RETURNING 1"
            )
        parts = [f"u AS ({change})"]
        if record:
            parts.append(
                f"r AS (INSERT INTO {self.ops} (user_id, seq, op_key, version, nonce, digest) "
                "SELECT %(user_id)s, %(r_seq)s, %(r_key)s, %(r_version)s, %(r_nonce)s, "
                "%(r_digest)s FROM u)"
            )
        if trim or how == "delete":
            below = "" if how == "delete" else " AND seq <= %(floor)s"
            parts.append(
                f"t AS (DELETE FROM {self.ops} WHERE user_id = %(user_id)s{below} "
                "AND EXISTS (SELECT FROM u))"
            )
        sql = f"WITH {', '.join(parts)} SELECT count(*) FROM u"
        self._stored[key] = sql
        return sql

    @property
    def revision(self) -> str:
        """The row's revision (a write that changes nothing checks its row is current)."""
        return f"SELECT rev FROM {self.users} WHERE user_id = %s"

    def users_page(self, *, after: bool, bounded: bool) -> str:
        """One page of live user ids from a prefix, in byte order."""
        where = ["user_id >= %(start)s", "starts_with(user_id, %(prefix)s)"]
        if after:
            where.append("user_id > %(after)s")
        if bounded:
            where.append("user_id < %(end)s")
        where += ["doc IS NOT NULL", "(expires_at IS NULL OR expires_at > %(now)s)"]
        return (
            f"SELECT user_id FROM {self.users} WHERE {' AND '.join(where)} "
            "ORDER BY user_id LIMIT %(batch)s"
        )

    @property
    def lock_row(self) -> str:
        """Take a user's row lock in a transaction, so that what follows sees every record.

        :attr:`erase` runs after it: a statement that waited for a writer's row lock
        deletes the row the writer committed, but its other parts read the records as
        they were before, and would leave the writer's new record behind.
        """
        return f"SELECT FROM {self.users} WHERE user_id = %s FOR UPDATE"

    @property
    def erase(self) -> str:
        """Everything of one user removed (after :attr:`lock_row`); says which parts were live."""
        return f"""WITH
            u AS (DELETE FROM {self.users} WHERE user_id = %(user_id)s RETURNING
                doc IS NOT NULL AND (expires_at IS NULL OR expires_at > %(now)s) AS doc,
                ops_expires_at > %(now)s AS ops,
                coalesce(lease_expires_at > %(now)s, false) AS claim),
            o AS (DELETE FROM {self.ops} WHERE user_id = %(user_id)s RETURNING 1),
            l AS (DELETE FROM {self.locks} WHERE user_id = %(user_id)s
                RETURNING expires_at > %(now)s AS live),
            d AS (DELETE FROM {self.deadlines} WHERE user_id = %(user_id)s RETURNING 1)
            SELECT coalesce((SELECT doc FROM u), false),
                coalesce((SELECT ops FROM u), false) AND EXISTS (SELECT FROM o),
                coalesce((SELECT claim FROM u), false), coalesce((SELECT bool_or(live) FROM l),
                false), EXISTS (SELECT FROM d)"""

    @property
    def purge(self) -> str:
        """Delete what has expired everywhere; count the documents and the locks it removed.

        A user's row goes with its records once nothing in it lives on. A row
        whose document expired while its log or claim lives on keeps them and
        loses the document (``doc`` set to ``NULL``, ``rev`` to the fresh
        ``%(rev)s``, so no cached copy matches): expired content is gone from
        the table at the purge, as it is on the other backends, not kept until
        the log expires too. The records of an expired
        log whose document lives on stay until the user's next write deletes
        them (deciding that here would race a write that renews the log).
        """
        gone = (
            "ops_expires_at <= %(now)s AND (lease_expires_at IS NULL OR "
            "lease_expires_at <= %(now)s)"
        )
        return f"""WITH
            u AS (DELETE FROM {self.users} WHERE (doc IS NULL OR expires_at <= %(now)s)
                AND {gone} RETURNING user_id),
            o AS (DELETE FROM {self.ops} WHERE user_id IN (SELECT user_id FROM u)),
            d AS (UPDATE {self.users} SET doc = NULL, version = 0, size = 0, schema = 1,
                expires_at = NULL, rev = %(rev)s
                WHERE doc IS NOT NULL AND expires_at <= %(now)s AND NOT ({gone})
                RETURNING 1),
            l AS (DELETE FROM {self.locks} WHERE expires_at <= %(now)s RETURNING 1)
            SELECT (SELECT count(*) FROM u) + (SELECT count(*) FROM d) + (SELECT count(*) FROM l)"""

    # -- locks and deadlines -----------------------------------------------------------

    @property
    def try_lock(self) -> str:
        """Take a lock that is free or lapsed (one row inserted or updated: taken)."""
        return (
            f"INSERT INTO {self.locks} AS l (user_id, name, token, expires_at) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (user_id, name) DO UPDATE "
            "SET token = excluded.token, expires_at = excluded.expires_at "
            "WHERE l.expires_at <= %s"
        )

    @property
    def renew_lock(self) -> str:
        """Extend a lock still held under its token."""
        return (
            f"UPDATE {self.locks} SET expires_at = %s "
            "WHERE user_id = %s AND name = %s AND token = %s AND expires_at > %s"
        )

    @property
    def unlock(self) -> str:
        """Release a lock; says whether it was still live."""
        return (
            f"DELETE FROM {self.locks} WHERE user_id = %s AND name = %s AND token = %s "
            "RETURNING expires_at > %s"
        )

    def schedule(self, *, earlier_only: bool) -> str:
        """Set a user's deadline (with ``earlier_only``, never later than it is)."""
        sql = (
            f"INSERT INTO {self.deadlines} AS d (user_id, at_ms) VALUES (%s, %s) "
            "ON CONFLICT (user_id) DO UPDATE SET at_ms = excluded.at_ms"
        )
        return sql + " WHERE excluded.at_ms < d.at_ms" if earlier_only else sql

    @property
    def unschedule(self) -> str:
        """Remove a user's deadline."""
        return f"DELETE FROM {self.deadlines} WHERE user_id = %s"

    @property
    def due(self) -> str:
        """The due deadlines, earliest first: a plain MVCC read, which waits on no lock."""
        return (
            f"SELECT user_id, at_ms FROM {self.deadlines} WHERE at_ms <= %s "
            "ORDER BY at_ms, user_id LIMIT %s"
        )


_SELECTED: Final = ", ".join(f"u.{c}::text" if c == "doc" else f"u.{c}" for c in _COLUMNS)
# A user's records as one JSON array of [op_key, seq, version, nonce, digest], oldest first.
# A record belongs to the row's log only between its floor and its newest number; anything
# else (a record a race left behind) is never read, and a new row's numbers start at a
# random base, so such a record cannot take a new one's key either.
_LIVE: Final = "o.seq > u.ops_floor AND o.seq <= u.ops_seq"
_RECORDS: Final = (
    "coalesce(json_agg(json_build_array(o.op_key, o.seq, o.version, o.nonce, o.digest) "
    "ORDER BY o.seq), '[]')::text"
)


def install_sql(schema: str = DEFAULT_SCHEMA, table_prefix: str = DEFAULT_PREFIX) -> str:
    """The SQL that creates chatstate's tables, for a DBA to run by hand.

    The backend runs the same statements on first use (``create=True``) or in
    :meth:`~chatstate.state.postgres.PostgresBackend.install`.

    Args:
        schema: The schema the tables live in.
        table_prefix: The start of every table's name.

    Returns:
        The statements, each ending with ``;``.
    """
    tables = Tables(schema, table_prefix)
    return "".join(f"{statement};\n" for statement in tables.install())


# -- rows ------------------------------------------------------------------------------


@attrs.frozen
class Row:
    """A user's row as stored (``rev`` is ``None`` when there is none), with its records.

    ``ops`` is the records as the server sent them (a JSON array, decoded when a
    write needs them), or as this process wrote them (a dict: the next write on
    the cached row copies it instead of parsing).
    """

    rev: int | None = None
    doc: str | None = None
    version: int = 0
    size: int = 0
    schema: int = 1
    expires_at: int | None = None
    ops_seq: int = 0
    ops_floor: int = 0
    ops_expires_at: int = 0
    lease_nonce: str | None = None
    lease_expires_at: int | None = None
    lease_op_key: str | None = None
    ops: str | dict[str, OpRecord] = attrs.field(default="[]", eq=False, repr=False)

    @classmethod
    def read(cls, found: tuple[Any, ...] | None, ops: str | None = None) -> Row:
        """The row a ``SELECT`` of :data:`_SELECTED` and the records returned (``None``: no row)."""
        if found is None:
            return NO_ROW
        rev, doc, version, size, schema, expires_at, seq, floor, expiry, *lease, text = found
        return cls(
            rev, doc, version, size, schema, expires_at, seq, floor, expiry,
            lease[0], lease[1], lease[2], ops if ops is not None else text or "[]",
        )  # fmt: skip

    def params(self, user_id: str) -> dict[str, Any]:
        """The row's columns as the parameters of :meth:`Tables.store`."""
        return {
            "user_id": user_id,
            "rev": self.rev,
            "doc": self.doc,
            "version": self.version,
            "size": self.size,
            "schema": self.schema,
            "expires_at": self.expires_at,
            "ops_seq": self.ops_seq,
            "ops_floor": self.ops_floor,
            "ops_expires_at": self.ops_expires_at,
            "lease_nonce": self.lease_nonce,
            "lease_expires_at": self.lease_expires_at,
            "lease_op_key": self.lease_op_key,
        }


NO_ROW: Final = Row()


@attrs.frozen
class Plan:
    """How to store what a write did to a row: the statement's kind, parts and parameters."""

    how: str
    """``"update"``, ``"insert"`` or ``"delete"`` (see :meth:`Tables.store`)."""
    row: Row
    """The row to cache once stored (``NO_ROW`` after a delete)."""
    params: dict[str, Any]
    record: bool
    trim: bool


# Python's json writes ints exactly and floats by repr, which reads back bit for bit. One
# encoder for every write: json.dumps with options builds a new one per call.
_dumps: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _corrupt(user_id: str, why: str) -> CorruptStateError:
    return CorruptStateError(f"{why} (user {user_id!r}); nothing was written", key=user_id)


def _decode_doc(user_id: str, text: str) -> JSONObject:
    try:
        doc = json.loads(text)
    except ValueError:
        doc = None
    if type(doc) is not dict:
        raise _corrupt(user_id, "the stored document is not a JSON object")
    return doc


def live_snapshot(user_id: str, row: Row, now: int) -> tuple[Snapshot | None, int | None]:
    """The row's document if it is live (decoded when read), and its expiry."""
    if row.doc is None or (row.expires_at is not None and row.expires_at <= now):
        return None, None
    text = row.doc
    return Snapshot.lazy(
        row.version, lambda: _decode_doc(user_id, text), row.schema
    ), row.expires_at


def _decode_log(user_id: str, row: Row, now: int) -> OpLog:
    """The row's log, its records dropped if it expired.

    Its sequence goes on from the row's even then, so that a new log's records
    never share a number with an old one's still stored; a row with no log yet
    starts from a random base (:func:`new_seq_base`).
    """
    log = OpLog()
    log.seq = row.ops_seq or new_seq_base()
    ops = row.ops
    try:
        if row.ops_expires_at <= now:
            pass
        elif isinstance(ops, dict):
            log.records = dict(ops)
        else:
            raw = json.loads(ops)
            if type(raw) is not list:
                raise _corrupt(user_id, "the stored operation log is unreadable")
            log.records = {
                str(r[0]): OpRecord(int(r[1]), int(r[2]), str(r[3]), str(r[4])) for r in raw
            }
        if row.lease_expires_at is not None and row.lease_expires_at > now:
            log.lease = Lease(str(row.lease_nonce), row.lease_expires_at, str(row.lease_op_key))
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise _corrupt(user_id, "the stored operation log is unreadable") from exc
    return log


def plan(  # noqa: C901, PLR0912 - one branch per part of the row
    user_id: str, row: Row, write: Write, now: int
) -> tuple[Outcome, Plan | object]:
    """What ``write`` does to ``row`` at ``now``: the outcome and how to store it.

    The plan is :data:`UNCHANGED` when nothing changes. Else it deletes the row
    (no live document, no operation ids, no claim), inserts it (there was none)
    or updates it, with a new random ``rev``; with the write's new record, and
    with a trim of the records the log no longer holds.
    """
    current, expires_at = live_snapshot(user_id, row, now)
    try:
        log = _decode_log(user_id, row, now)
    except CorruptStateError:
        op = write.operation
        if not (isinstance(op, Delete) and op.force):
            raise
        log = OpLog()  # a forced delete replaces a corrupt log
        log.seq = row.ops_seq or new_seq_base()
    known = write.op_key in log.records
    result = apply_write(current, log, write, now, row.size if current is not None else None)
    if result.data is UNCHANGED and not result.log_changed:
        return result.outcome, UNCHANGED
    if result.data is UNCHANGED:
        doc: str | None = row.doc if current is not None else None
        version, size, schema = (row.version, row.size, row.schema) if doc else (0, 0, 1)
    elif result.data is None:
        doc, version, size, schema, expires_at = None, 0, 0, 1, None
    else:
        doc, version, size = _dumps(result.data), result.outcome.version, result.size
        schema = result.schema
        if write.ttl_ms is not None:
            expires_at = now + write.ttl_ms
    if doc is None:
        expires_at = None
    records = log.records
    floor = row.ops_floor
    claim: tuple[str | None, int | None, str | None]
    if result.log_changed:
        ops_expires_at = row.ops_expires_at if row.ops_expires_at > now else 0
        if not isinstance(write.operation, Acquire | Release):
            # As on Redis: recorded ids live dedupe_ms after the last one; a claim
            # lives by its own lease and keeps nothing else alive.
            ops_expires_at = now + write.dedupe_ms
        lease = log.lease
        claim = (
            (None, None, None) if lease is None else (lease.nonce, lease.expires_ms, lease.op_key)
        )
        # Every record below the oldest kept one goes (the trim, or a whole expired
        # log); the floor says what is gone already. The records are in sequence
        # order (read ORDER BY seq, appended, trimmed in order), so the oldest is first.
        floor = next(iter(records.values())).seq - 1 if records else log.seq
    else:
        ops_expires_at = row.ops_expires_at
        claim = (row.lease_nonce, row.lease_expires_at, row.lease_op_key)
    trim = floor > row.ops_floor
    if doc is None and not records and (claim[1] is None or claim[1] <= now):
        if row.rev is None:
            return result.outcome, UNCHANGED
        return result.outcome, Plan(
            "delete", NO_ROW, {"user_id": user_id, "old_rev": row.rev}, record=False, trim=True
        )
    new = Row(
        new_rev(), doc, version, size, schema, expires_at, log.seq, max(floor, row.ops_floor),
        ops_expires_at, claim[0], claim[1], claim[2], records,
    )  # fmt: skip
    params = new.params(user_id)
    added = records.get(write.op_key) if not known else None
    if added is not None:
        params.update(r_seq=added.seq, r_key=write.op_key, r_version=added.version,
                      r_nonce=added.nonce, r_digest=added.digest)  # fmt: skip
    if trim:
        params["floor"] = floor
    if row.rev is None:
        return result.outcome, Plan("insert", new, params, record=added is not None, trim=trim)
    params["old_rev"] = row.rev
    return result.outcome, Plan("update", new, params, record=added is not None, trim=trim)


def new_seq_base() -> int:
    """Where a new row's log numbers its records from: random, 60 bits at most."""
    return secrets.randbits(40) << 20


def new_rev() -> int:
    """A fresh random revision (63 bits: a bigint)."""
    return secrets.randbits(63) | 1  # never 0: the rev of a placeholder row


class RowCache:
    """The rows a backend last read or wrote, least recently used dropped first.

    Thread-safe (a short lock, never held across I/O). A stale entry costs one
    failed ``UPDATE ... WHERE rev = ...``, never a wrong write.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._rows: OrderedDict[str, Row] = OrderedDict()
        self._lock = Lock()

    def get(self, user_id: str) -> Row | None:
        """The cached row (``NO_ROW`` when the user had none), or ``None`` if not cached."""
        with self._lock:
            row = self._rows.get(user_id)
            if row is not None:
                self._rows.move_to_end(user_id)
            return row

    def put(self, user_id: str, row: Row) -> None:
        """Remember ``row`` as the user's current one."""
        if self._size <= 0:
            return
        with self._lock:
            self._rows[user_id] = row
            self._rows.move_to_end(user_id)
            while len(self._rows) > self._size:
                self._rows.popitem(last=False)

    def drop(self, user_id: str) -> None:
        """Forget the user's row."""
        with self._lock:
            self._rows.pop(user_id, None)

    def clear(self) -> None:
        """Forget every row."""
        with self._lock:
            self._rows.clear()


# -- errors ----------------------------------------------------------------------------


@attrs.frozen
class _Translation:
    """One row of the error table: which driver errors, and what chatstate says of them.

    ``sent``: the connection broke after a statement may have reached the server,
    so a write may have been applied (it is re-sent; failing that, it is
    :class:`~chatstate.exceptions.OutcomeUnknown`), and a read may be sent again.
    """

    types: tuple[type[BaseException], ...]
    error: type[StateError]
    why: str
    sqlstate: str = ""
    then: str = ""
    sent: bool = False


_RIGHTS: Final = "the database user lacks a right chatstate needs (docs/postgres.md, Rights)"

# The first row that matches wins: sqlstate classes first, then driver types.
_TRANSLATIONS: Final = (
    _Translation(
        (psycopg_pool.PoolTimeout, psycopg_pool.TooManyRequests),
        BackendUnavailable,
        "no connection within pool_timeout (the server is down, refuses the credentials, "
        "or every connection is in use)",
        then="nothing was sent",
    ),
    _Translation((psycopg.Error,), BackendAuthenticationError, "the server refused the "
                 "credentials ({detail})", sqlstate="28"),
    _Translation((psycopg.Error,), BackendPermissionError, _RIGHTS + ": {detail}",
                 sqlstate="42501"),
    _Translation((psycopg.Error,), BackendError, "chatstate's tables are missing ({detail})",
                 sqlstate="42P01", then="create them with install() or create=True"),
    _Translation((psycopg.Error,), StoreFullError, "the server is out of disk or memory "
                 "({detail})", sqlstate="531", then="nothing was written"),
    _Translation((psycopg.Error,), StoreFullError, "the server is out of memory ({detail})",
                 sqlstate="532", then="nothing was written"),
    _Translation((psycopg.Error,), BackendUnavailable, "the server has no connection slot left "
                 "({detail})", sqlstate="53300", then="nothing was sent"),
    _Translation((psycopg.Error,), StoreBusyError, "the statement was cancelled or timed out "
                 "({detail})", sqlstate="57014", then="nothing was written"),
    _Translation((psycopg.Error,), StoreBusyError, "a lock was not available ({detail})",
                 sqlstate="55P03", then="nothing was written"),
    _Translation((psycopg.Error,), StoreBusyError, "the transaction was rolled back "
                 "({detail})", sqlstate="40", then="nothing was written"),
    _Translation((psycopg.Error,), BackendUnavailable, "the server is a read-only standby "
                 "(a failover in progress?)", sqlstate="25006", then="nothing was written"),
    _Translation((psycopg.Error,), BackendUnavailable, "the server is shutting down or "
                 "starting ({detail})", sqlstate="57P", sent=True),
    _Translation((psycopg.Error,), BackendUnavailable, "the connection failed ({detail})",
                 sqlstate="08", sent=True),
    _Translation((psycopg.OperationalError,), BackendUnavailable, "cannot reach the server "
                 "({detail})", sent=True),
    _Translation((psycopg.Error,), BackendError, "the server answered with an error: {detail}"),
    _Translation((psycopg_pool.PoolClosed,), BackendError, "the connection pool is closed"),
)  # fmt: skip

TRANSLATED: Final = (psycopg.Error, psycopg_pool.PoolTimeout, psycopg_pool.PoolClosed)
"""The errors :func:`translate` knows; any other (a bug) passes through."""

_PASSWORDS: Final = (
    re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE),
    re.compile(r"(postgres(?:ql)?://[^:@/\s]*:)([^@\s]+)(@)"),
)


def scrub(text: str) -> str:
    """``text`` with any password in a connection string replaced by ``***``."""
    text = _PASSWORDS[0].sub(r"\1***", text)
    return _PASSWORDS[1].sub(r"\1***\3", text)


def translation(exc: BaseException) -> _Translation:
    """The row of the error table that says what ``exc`` (one of ``TRANSLATED``) means."""
    state = getattr(exc, "sqlstate", None) or ""
    for row in _TRANSLATIONS:
        if isinstance(exc, row.types) and (not row.sqlstate or state.startswith(row.sqlstate)):
            return row
    raise TypeError(f"chatstate does not translate {type(exc).__name__}")  # pragma: no cover


def _detail(exc: BaseException) -> str:
    text = scrub(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return text if len(text) <= 200 else text[:197] + "..."


def translate(
    exc: BaseException, what: str, write: Write | None = None, *, unknown: bool = False
) -> StateError:
    """The chatstate error for a driver error, for both twins.

    Args:
        exc: One of :data:`TRANSLATED`.
        what: What was being done (``"apply to 'ana'"``).
        write: The write, when ``exc`` ended one.
        unknown: An earlier attempt of ``write`` may have been applied.
    """
    row = translation(exc)
    why = row.why.format(detail=_detail(exc))
    if write is not None and (row.sent or unknown):
        return OutcomeUnknown(
            f"Failed to {what}: {why}; the write may or may not have been applied: calling "
            "again with the same op_id is safe",
            op_id=write.op_id or write.op_key,
        )
    text = f"{why}; {row.then}" if row.then else why
    return row.error(f"Failed to {what}: {text}")


# What libpq says when the server refuses who connects (a connection error carries no
# SQLSTATE). A server whose messages are translated falls back to BackendUnavailable.
_REFUSED: Final = re.compile(
    r"authentication failed|pg_hba\.conf|role \"[^\"]*\" does not exist"
    r"|is not permitted to log in|no password supplied",
    re.IGNORECASE,
)


def connect_error(exc: psycopg.Error) -> StateError:
    """The chatstate error for a failed connection (nothing was sent on it).

    :class:`~chatstate.exceptions.BackendAuthenticationError` when the server
    refused who connects (a wrong password, no ``pg_hba.conf`` entry or a
    ``reject`` one, an unknown or ``NOLOGIN`` role), else the error table's
    (:class:`~chatstate.exceptions.BackendUnavailable` for a server out of reach).
    """
    row = translation(exc)
    detail = _detail(exc)
    if row.error is BackendAuthenticationError or (
        exc.sqlstate is None and _REFUSED.search(str(exc))
    ):
        return BackendAuthenticationError(
            f"Failed to connect to the server: the server refused the credentials ({detail}); "
            "nothing was sent"
        )
    why = row.why.format(detail=detail)
    error = row.error if row.error is not BackendError else BackendUnavailable
    return error(f"Failed to connect to the server: {why}; nothing was sent")


def may_resend(exc: BaseException) -> bool:
    """True when the connection broke: the statement may be sent again on another one."""
    return translation(exc).sent


def describe_conninfo(conninfo: str) -> dict[str, Any]:
    """``server.address``, ``server.port`` and ``db.namespace`` of a connection string."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        return {}
    out: dict[str, Any] = {}
    if params.get("host"):
        out["server.address"] = str(params["host"])
    if params.get("port"):
        with contextlib.suppress(ValueError):
            out["server.port"] = int(str(params["port"]))
    if params.get("dbname"):
        out["db.namespace"] = str(params["dbname"])
    return out


_LONGEST_SECONDS: Final = 365 * 24 * 3600.0
"""The longest timeout or period an option takes (``inf`` and NaN are refused)."""


# Options whose values libpq checks only when it connects, with what they may be: a
# mistake there is a ConfigurationError when the backend is made, not a BackendUnavailable
# (a call that "cannot reach the server") on the first call.
_CHOICES: Final = {
    "sslmode": {"disable", "allow", "prefer", "require", "verify-ca", "verify-full"},
    "gssencmode": {"disable", "prefer", "require"},
    "channel_binding": {"disable", "prefer", "require"},
    "target_session_attrs": {
        "any", "read-write", "read-only", "primary", "standby", "prefer-standby",
    },
}  # fmt: skip
# (connect_timeout is not among them: the backend's own connect_timeout replaces it.)
_WHOLE_NUMBERS: Final = ("keepalives", "keepalives_idle", "keepalives_interval",
                         "keepalives_count")  # fmt: skip


def _libpq_int(text: str) -> int | None:
    """A whole number as libpq reads one (a sign and spaces around allowed), else None."""
    try:
        return int(text.strip())
    except ValueError:
        return None


def check_conninfo(conninfo: object, pool: type, backend: str) -> None:
    """Raise for a ``conninfo`` argument a backend cannot use, before anything connects.

    ``pool`` is the pool class the backend takes (a twin's). A string must be one
    libpq can parse, not empty (libpq would connect wherever its defaults and
    ``PG*`` variables say, and ``create=True`` make tables there), with ports,
    modes and keepalive settings libpq accepts. The message never quotes the string: libpq's
    own quotes the whole of it, password included, and the pool would log it on
    every attempt.

    Raises:
        ConfigurationError: not a string or a pool; an empty string; one libpq
            cannot read; an option's value libpq would refuse.
        UsageError: a pool of the other twin.
    """
    if isinstance(conninfo, pool):
        return
    if isinstance(conninfo, psycopg_pool.ConnectionPool | psycopg_pool.AsyncConnectionPool):
        raise UsageError(
            f"{backend} needs a psycopg_pool {pool.__name__}, not the "
            f"{type(conninfo).__name__} given: pass an asyncio pool to AsyncPostgresBackend "
            "and a sync one to PostgresBackend"
        )
    if not isinstance(conninfo, str):
        raise ConfigurationError(
            f"conninfo must be a connection string or a psycopg_pool {pool.__name__}, not "
            f"{type(conninfo).__name__}"
        )
    if not conninfo.strip():
        raise ConfigurationError(
            "conninfo is empty (an unset variable?): libpq would connect wherever its "
            "defaults say; pass postgresql:// to take everything from its PG* variables"
        )
    try:
        params = psycopg.conninfo.conninfo_to_dict(conninfo)
    except psycopg.Error:
        raise ConfigurationError(
            "conninfo is not a PostgreSQL connection string (a URL such as "
            "postgresql://user:password@host:5432/dbname, or key=value pairs); it is not "
            "shown, as it may hold a password"
        ) from None
    for name, value in params.items():
        text = str(value)
        if name == "port" and not all(
            not p.strip() or 0 < (_libpq_int(p) or 0) < 65536 for p in text.split(",")
        ):
            why = "a port number (1 to 65535, or a comma-separated list of them)"
        elif name in _WHOLE_NUMBERS and _libpq_int(text) is None:
            why = "a whole number"
        elif name in _CHOICES and text not in _CHOICES[name]:
            why = "one of " + ", ".join(sorted(_CHOICES[name]))
        else:
            continue
        raise ConfigurationError(
            f"the connection string's {name} must be {why} (the value is not shown)"
        )


def check_options(
    *,
    max_connections: object,
    pool_timeout: object,
    connect_timeout: object,
    cache_size: object,
    purge_every: object,
    resolve_attempts: object,
    clock: object,
    create: object,
    prepared_statements: object,
) -> None:
    """Raise :class:`ConfigurationError` for an option out of range."""
    for name, value, least in (("max_connections", max_connections, 1),
                               ("cache_size", cache_size, 0),
                               ("resolve_attempts", resolve_attempts, 0)):  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigurationError(f"{name} must be a whole number >= {least}, not {value!r}")
    for name, value in (("create", create), ("prepared_statements", prepared_statements)):
        if not isinstance(value, bool):
            raise ConfigurationError(f"{name} must be True or False, not {value!r}")
    for name, value in (("pool_timeout", pool_timeout), ("connect_timeout", connect_timeout),
                        ("purge_every", purge_every)):  # fmt: skip
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not 0 < value < _LONGEST_SECONDS
        ):
            raise ConfigurationError(
                f"{name} must be a number of seconds > 0 and below {_LONGEST_SECONDS:.0f} "
                f"(a year), not {value!r}"
            )
    if not callable(clock):
        raise ConfigurationError("clock must be a function returning Unix seconds")


def schema_error(found: int) -> BackendError:
    """The error for tables written by a newer chatstate."""
    return BackendError(
        f"chatstate's PostgreSQL tables were made by a newer chatstate (version {found}, "
        f"this one reads {SCHEMA_VERSION}); nothing was written"
    )


Clock = Callable[[], float]
