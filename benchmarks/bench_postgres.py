"""Updates per second on the PostgreSQL backend against the naive write, in one run (printed).

    python benchmarks/bench_postgres.py [--ops 200] [--rounds 30] [--users 100] [--threads 4]
                                        [--dsn DSN]

Without ``--dsn`` it starts a throwaway PostgreSQL (tests/servers.py: initdb and
pg_ctl from PATH) and removes it afterwards; never the server on port 5432 unless
you pass it. The contenders:

- naive: ``UPDATE t SET doc = doc || %s::jsonb WHERE user_id = %s`` on a ``jsonb``
  table, autocommit (one round trip, no op id, no version, no size limit);
- chatstate: ``StateService.update`` (the row cached: one round trip);
- chatstate, no cache: ``cache_size=0``, every write ``SELECT ... FOR UPDATE``
  then ``UPDATE`` in a transaction (two pipelined round trips);
- the same three with ``--threads`` threads at once on distinct users.

Each contender keeps its connections and services for the whole run, as a bot
does. Every round runs a slice of ``--ops`` writes of each contender in turn, so
that the server's slow moments (a checkpoint, an fsync that takes three times
as long) fall on all of them alike; a ratio is the median of the rounds' ratios
to the naive write of the same round, and a rate the median of the slices'.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg

from chatstate.state import StateService
from chatstate.state.postgres import PostgresBackend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

Writer = Callable[[int], float]
"""Make ``ops`` writes, say how long they took (seconds)."""


def _patch(i: int) -> dict[str, object]:
    return {"step": i, "cart": {"apples": i % 7}}


def _naive(dsn: str, users: list[str]) -> Writer:
    conn = psycopg.connect(dsn, autocommit=True)
    conn.execute(
        "INSERT INTO bench_naive SELECT u, '{}' FROM unnest(%s::text[]) u ON CONFLICT DO NOTHING",
        (users,),
    )

    def run(ops: int) -> float:
        start = time.perf_counter()
        for i in range(ops):
            conn.execute(
                "UPDATE bench_naive SET doc = doc || %s::jsonb WHERE user_id = %s",
                (json.dumps(_patch(i)), users[i % len(users)]),
            )
        return time.perf_counter() - start

    return run


def _chatstate(dsn: str, users: list[str], **options: object) -> Writer:
    svc = StateService(PostgresBackend(dsn, table_prefix="bench", **options))  # type: ignore[arg-type]
    for user in users:
        svc.update(user, {"warm": True})

    def run(ops: int) -> float:
        start = time.perf_counter()
        for i in range(ops):
            svc.update(users[i % len(users)], _patch(i))
        return time.perf_counter() - start

    return run


def _threaded(make: Callable[[list[str]], Writer], users: list[str], threads: int) -> Writer:
    """``threads`` writers at once, each on its own users; the time until the last is done."""
    writers = [make([f"{u}-t{t}" for u in users]) for t in range(threads)]

    def run(ops: int) -> float:
        workers = [threading.Thread(target=w, args=(ops // threads,)) for w in writers]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return time.perf_counter() - start

    return run


@contextlib.contextmanager
def server_dsn(dsn: str | None) -> Iterator[str]:
    """``dsn``, or the DSN of a throwaway PostgreSQL (tests/servers.py) removed afterwards."""
    if dsn is not None:
        yield dsn
        return
    import servers

    server = servers.start_postgres()
    try:
        yield server.dsn
    finally:
        server.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=200, help="writes per contender and round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--dsn", help="an existing server (default: a throwaway one)")
    args = parser.parse_args()
    users = [f"user-{u}" for u in range(args.users)]
    naive = "naive UPDATE doc = doc || patch"
    with server_dsn(args.dsn) as dsn:
        PostgresBackend(dsn, table_prefix="bench").install()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS bench_naive")
            conn.execute("CREATE TABLE bench_naive (user_id text PRIMARY KEY, doc jsonb NOT NULL)")
            version = conn.execute("SHOW server_version").fetchone()
        makers: dict[str, Callable[[list[str]], Writer]] = {
            naive: lambda us: _naive(dsn, us),
            "chatstate update": lambda us: _chatstate(dsn, us),
            "chatstate update, cache_size=0": lambda us: _chatstate(dsn, us, cache_size=0),
        }
        contenders: dict[str, Writer] = {}
        for n, (name, make) in enumerate(makers.items()):
            contenders[name] = make([f"{u}-c{n}" for u in users])
        for n, (name, make) in enumerate(makers.items()):
            threaded = _threaded(make, [f"{u}-c{n}" for u in users], args.threads)
            contenders[f"{name}, {args.threads} threads"] = threaded
        for run in contenders.values():
            run(args.ops)  # warm up: prepared statements, the tables' pages
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for _ in range(args.rounds):
            for name, run in contenders.items():
                times[name].append(run(args.ops) / args.ops)
        print(f"PostgreSQL {version[0] if version else '?'}, {args.users} users per writer")
        print(f"{args.rounds} rounds of {args.ops} writes per contender, interleaved; medians")
        for name, took in times.items():
            base = naive + (f", {args.threads} threads" if name.endswith("threads") else "")
            ratios = [b / t for b, t in zip(times[base], took, strict=True)]
            rate = 1 / statistics.median(took)
            print(
                f"{name:48} {rate:8.0f} updates/s  {statistics.median(took) * 1e6:6.0f} us"
                f"  {statistics.median(ratios):.2f}x naive"
            )


if __name__ == "__main__":
    main()
