"""What one write's statement costs on PostgreSQL, in SQL alone, against the naive write (printed).

    python benchmarks/bench_postgres_sql.py [--ops 200] [--rounds 30] [--users 100] [--dsn DSN]

No chatstate code runs in the timed loops: each contender sends its statement on one
autocommit connection, with parameters built the same way, so the differences are the
server's (and psycopg's) only. This is how docs/performance.md bounds what the PostgreSQL
backend can reach against ``UPDATE t SET doc = doc || $1``:

- naive: that ``UPDATE`` on a ``jsonb`` table;
- bare update: the user's row of chatstate's layout, its 12 columns set by a plain ``UPDATE``;
- in a WITH: the same ``UPDATE`` as ``WITH u AS (... RETURNING 1) SELECT count(*) FROM u``;
- with the record: and the op record's ``INSERT ... SELECT ... FROM u`` (what the backend sends);
- PL/pgSQL: a function doing the ``UPDATE`` and the ``INSERT``;
- pipelined: the ``UPDATE`` and a guarded ``INSERT`` sent together, one round trip;
- slot upsert: the record upserted into slot ``seq % 128`` (no trim, no index insert).

Every round runs a slice of ``--ops`` writes of each contender in turn, so that the
server's slow moments fall on all of them alike; a ratio is the median of the rounds'
ratios to the naive write of the same round. Without ``--dsn`` it starts a throwaway
PostgreSQL (tests/servers.py) and removes it after.
"""

# ruff: noqa: S608 - every name in the SQL is a constant of this script; values are bound

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from bench_postgres import server_dsn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

_COLUMNS = (
    "rev = %s, doc = %s, version = %s, size = %s, schema = %s, expires_at = %s, ops_seq = %s, "
    "ops_floor = %s, ops_expires_at = %s, lease_nonce = %s, lease_expires_at = %s, "
    "lease_op_key = %s"
)
_HOWS = ("bare update", "in a WITH", "with the record", "PL/pgSQL", "pipelined", "slot upsert")


def _tables(how: str) -> tuple[str, str]:
    """The users' and the records' table of one contender (each writes its own)."""
    n = _HOWS.index(how)
    return f"sql_users_{n}", f"sql_ops_{n}"


def _setup(conn: psycopg.Connection[Any], users: int) -> None:
    conn.execute("DROP FUNCTION IF EXISTS sql_store")
    conn.execute("DROP TABLE IF EXISTS sql_naive, sql_slots")
    conn.execute("CREATE TABLE sql_naive (user_id text PRIMARY KEY, doc jsonb NOT NULL)")
    ids = f"SELECT 'user-' || n, %s FROM generate_series(0, {users}) n"
    conn.execute(f"INSERT INTO sql_naive (user_id, doc) {ids}", ("{}",))
    for how in _HOWS:
        table, ops = _tables(how)
        conn.execute(f"DROP TABLE IF EXISTS {table}, {ops}")
        conn.execute(
            f'CREATE TABLE {table} (user_id text COLLATE "C" PRIMARY KEY, rev bigint NOT NULL, '
            "doc json, version bigint, size bigint, schema integer, expires_at bigint, "
            "ops_seq bigint, ops_floor bigint, ops_expires_at bigint, lease_nonce text, "
            "lease_expires_at bigint, lease_op_key text) WITH (fillfactor = 80)"
        )
        conn.execute(
            f'CREATE TABLE {ops} (user_id text COLLATE "C", seq bigint, op_key text, '
            "version bigint, nonce text, digest text, PRIMARY KEY (user_id, seq))"
        )
        conn.execute(f"INSERT INTO {table} (user_id, rev) {ids}", (0,))
    conn.execute(
        'CREATE TABLE sql_slots (user_id text COLLATE "C", slot integer, seq bigint, '
        "op_key text, version bigint, nonce text, digest text, PRIMARY KEY (user_id, slot))"
    )
    table, ops = _tables("PL/pgSQL")
    conn.execute(f"""CREATE FUNCTION sql_store(p_user text, p_old bigint, p_rev bigint,
        p_doc json, p_version bigint, p_size bigint, p_schema integer, p_expires bigint,
        p_seq bigint, p_floor bigint, p_ops_expires bigint, p_nonce text, p_lease bigint,
        p_op_key text, r_key text, r_version bigint, r_nonce text, r_digest text)
        RETURNS boolean LANGUAGE plpgsql AS $$
        BEGIN
          UPDATE {table} SET rev = p_rev, doc = p_doc, version = p_version, size = p_size,
            schema = p_schema, expires_at = p_expires, ops_seq = p_seq, ops_floor = p_floor,
            ops_expires_at = p_ops_expires, lease_nonce = p_nonce, lease_expires_at = p_lease,
            lease_op_key = p_op_key WHERE user_id = p_user AND rev = p_old;
          IF NOT FOUND THEN RETURN false; END IF;
          INSERT INTO {ops} VALUES (p_user, p_seq, r_key, r_version, r_nonce, r_digest);
          RETURN true;
        END $$""")


def _patch(i: int) -> dict[str, object]:
    return {"step": i, "cart": {"apples": i % 7}}


def _naive(conn: psycopg.Connection[Any], users: int) -> Callable[[int], float]:
    def run(ops: int) -> float:
        start = time.perf_counter()
        for i in range(ops):
            conn.execute(
                "UPDATE sql_naive SET doc = doc || %s::jsonb WHERE user_id = %s",
                (json.dumps(_patch(i)), f"user-{i % users}"),
            )
        return time.perf_counter() - start

    return run


def _layout(conn: psycopg.Connection[Any], users: int, how: str) -> Callable[[int], float]:
    revs = {f"user-{u}": 0 for u in range(users)}
    seqs = dict.fromkeys(revs, 0)
    table, ops = _tables(how)
    insert = f"INSERT INTO {ops} (user_id, seq, op_key, version, nonce, digest)"

    def write(i: int) -> None:
        user = f"user-{i % users}"
        seqs[user] += 1
        seq, rev = seqs[user], secrets.randbits(62)
        doc = json.dumps({"warm": True, **_patch(i)})
        row = [rev, doc, seq, len(doc), 1, None, seq, max(0, seq - 124), 10**13, None, None, None]
        key = secrets.token_urlsafe(9)
        record = [user, seq, key, seq, "n0nce-ab", ""]
        update = f"UPDATE {table} SET {_COLUMNS} WHERE user_id = %s AND rev = %s"
        if how == "bare update":
            assert conn.execute(update, [*row, user, revs[user]]).rowcount == 1
        elif how == "PL/pgSQL":
            args = [user, revs[user], *row, key, seq, "n0nce-ab", ""]
            cur = conn.execute(f"SELECT sql_store({', '.join(['%s'] * len(args))})", args)
            assert cur.fetchone() == (True,)
        elif how == "pipelined":
            with conn.pipeline():
                cur = conn.execute(update, [*row, user, revs[user]])
                conn.execute(
                    f"{insert} SELECT %s, %s, %s, %s, %s, %s WHERE EXISTS "
                    f"(SELECT FROM {table} WHERE user_id = %s AND rev = %s)",
                    [*record, user, rev],
                )
            assert cur.rowcount == 1
        else:
            sql = f"WITH u AS ({update} RETURNING 1)"
            values: list[Any] = [*row, user, revs[user]]
            if how == "with the record":
                sql += f", r AS ({insert} SELECT %s, %s, %s, %s, %s, %s FROM u)"
                values += record
            elif how == "slot upsert":
                sql += (
                    ", r AS (INSERT INTO sql_slots (user_id, slot, seq, op_key, version, nonce, "
                    "digest) SELECT %s, %s, %s, %s, %s, %s, %s FROM u ON CONFLICT (user_id, slot) "
                    "DO UPDATE SET seq = excluded.seq, op_key = excluded.op_key, "
                    "version = excluded.version, nonce = excluded.nonce, digest = excluded.digest)"
                )
                values += [user, seq % 128, *record[1:]]
            cur = conn.execute(sql + " SELECT count(*) FROM u", values)
            assert cur.fetchone() == (1,)
        revs[user] = rev

    def run(count: int) -> float:
        start = time.perf_counter()
        for i in range(count):
            write(i)
        took = time.perf_counter() - start
        # The trim the backend makes every 24 writes, made here after the timed loop.
        conn.execute(f"DELETE FROM {ops} o USING {table} u WHERE o.user_id = u.user_id "
                     "AND o.seq <= u.ops_seq - 100")  # fmt: skip
        return took

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200, help="writes per contender and round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--dsn", help="an existing server (default: a throwaway one)")
    args = parser.parse_args()
    with server_dsn(args.dsn) as dsn:
        with psycopg.connect(dsn, autocommit=True) as conn:
            _setup(conn, args.users)
            contenders: dict[str, Callable[[int], float]] = {"naive": _naive(conn, args.users)}
            for how in _HOWS:
                contenders[how] = _layout(conn, args.users, how)
            for run in contenders.values():
                run(200)  # warm up: prepared statements, the tables' pages
            times: dict[str, list[float]] = {name: [] for name in contenders}
            for _ in range(args.rounds):
                for name, run in contenders.items():
                    times[name].append(run(args.ops) / args.ops * 1e6)
        print(f"{args.rounds} rounds of {args.ops} writes per contender on {args.users} users")
        for name, took in times.items():
            ratios = [b / t for b, t in zip(times["naive"], took, strict=True)]
            low, high = min(took), max(took)
            print(
                f"{name:16} {statistics.median(took):6.0f} us/write ({low:.0f} to {high:.0f})"
                f"  {statistics.median(ratios):.2f}x naive"
            )


if __name__ == "__main__":
    main()
