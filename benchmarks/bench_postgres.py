"""Updates per second on the PostgreSQL backend against the naive write, in one run (printed).

    python benchmarks/bench_postgres.py [--ops 5000] [--users 100] [--threads 4] [--dsn DSN]

Without ``--dsn`` it starts a throwaway PostgreSQL (tests/servers.py: initdb and
pg_ctl from PATH) and removes it afterwards; never the server on port 5432 unless
you pass it. Each line is the median of ``--repeat`` runs, interleaved so that
every contender meets the same server state:

- naive: ``UPDATE t SET doc = doc || %s::jsonb WHERE user_id = %s`` on a ``jsonb``
  table, autocommit (one round trip, no op id, no version, no size limit);
- chatstate: ``StateService.update`` (the row cached: one round trip);
- chatstate, no cache: ``cache_size=0``, every write ``SELECT ... FOR UPDATE``
  then ``UPDATE`` in a transaction (two pipelined round trips);
- the same three with ``--threads`` threads at once on distinct users.
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


def _patch(i: int) -> dict[str, object]:
    return {"step": i, "cart": {"apples": i % 7}}


def _naive(dsn: str) -> Callable[[int, int, int], float]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_naive")
        conn.execute("CREATE TABLE bench_naive (user_id text PRIMARY KEY, doc jsonb NOT NULL)")

    def run(ops: int, users: int, seed: int) -> float:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO bench_naive SELECT 'user-' || n, '{}' FROM generate_series(0, %s) n "
                "ON CONFLICT DO NOTHING",
                (users + seed,),
            )
            start = time.perf_counter()
            for i in range(ops):
                conn.execute(
                    "UPDATE bench_naive SET doc = doc || %s::jsonb WHERE user_id = %s",
                    (json.dumps(_patch(i)), f"user-{(i % users) + seed}"),
                )
            return time.perf_counter() - start

    return run


def _chatstate(dsn: str, **options: object) -> Callable[[int, int, int], float]:
    def run(ops: int, users: int, seed: int) -> float:
        with StateService(PostgresBackend(dsn, table_prefix="bench", **options)) as svc:  # type: ignore[arg-type]
            for u in range(users):
                svc.update(f"user-{u + seed}", {"warm": True})
            start = time.perf_counter()
            for i in range(ops):
                svc.update(f"user-{(i % users) + seed}", _patch(i))
            return time.perf_counter() - start

    return run


def _threaded(
    run: Callable[[int, int, int], float], threads: int
) -> Callable[[int, int, int], float]:
    def go(ops: int, users: int, seed: int) -> float:
        per = ops // threads
        took: list[float] = []
        workers = [
            threading.Thread(target=lambda t=t: took.append(run(per, users, seed + 1000 * (t + 1))))
            for t in range(threads)
        ]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return time.perf_counter() - start

    return go


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
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dsn", help="an existing server (default: a throwaway one)")
    args = parser.parse_args()
    with server_dsn(args.dsn) as dsn:
        PostgresBackend(dsn, table_prefix="bench").install()
        contenders = {
            "naive UPDATE doc = doc || patch": _naive(dsn),
            "chatstate update": _chatstate(dsn),
            "chatstate update, cache_size=0": _chatstate(dsn, cache_size=0),
        }
        for name, run in list(contenders.items()):
            contenders[f"{name}, {args.threads} threads"] = _threaded(run, args.threads)
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for run in contenders.values():
            run(200, args.users, 0)  # warm up
        for _ in range(args.repeat):
            for name, run in contenders.items():
                times[name].append(run(args.ops, args.users, 0))
        rates = {name: args.ops / statistics.median(t) for name, t in times.items()}
        with psycopg.connect(dsn) as conn:
            version = conn.execute("SHOW server_version").fetchone()
        server_version = version[0] if version else "?"
        print(f"PostgreSQL {server_version}, {args.ops} updates on {args.users} users")
        print(f"median of {args.repeat} interleaved runs")
        for name, rate in rates.items():
            base = "naive UPDATE doc = doc || patch"
            if name.endswith("threads"):
                base += f", {args.threads} threads"
            print(f"{name:48} {rate:8.0f} updates/s  {rate / rates[base]:.2f}x naive")


if __name__ == "__main__":
    main()
