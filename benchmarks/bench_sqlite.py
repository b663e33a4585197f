"""Updates per second on the SQLite backend (printed, not asserted).

    python benchmarks/bench_sqlite.py [--ops 5000] [--users 100] [--processes 4]
                                      [--synchronous NORMAL]

One process, then several at once, each calling StateService.update on one file
in a temp directory (every update is one BEGIN IMMEDIATE transaction).
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path
from typing import Any

from chatstate.state import StateService
from chatstate.state._sqlite import SqliteBackend

_barrier: Any = None


def _init(barrier: Any) -> None:
    global _barrier  # noqa: PLW0603
    _barrier = barrier


def _run(path: str, ops: int, users: int, synchronous: Any, seed: int) -> tuple[float, float]:
    with StateService(SqliteBackend(path, synchronous=synchronous, busy_timeout=60)) as svc:
        svc.get("warm-up")
        if _barrier is not None:
            _barrier.wait()
        start = time.time()
        for i in range(ops):
            svc.update(f"user-{(i + seed) % users}", {"step": i, "cart": {"apples": i % 7}})
        return start, time.time()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=5000)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "bench.db")
        SqliteBackend(path).close()
        _run(path, 200, args.users, args.synchronous, 0)  # warm up
        start, end = _run(path, args.ops, args.users, args.synchronous, 0)
        took = end - start
        print(
            f"1 process:   {args.ops / took:7.0f} updates/s ({took / args.ops * 1e6:.0f} us each)"
        )
        per = args.ops // args.processes
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(
            args.processes, initializer=_init, initargs=(ctx.Barrier(args.processes),)
        ) as pool:
            spans = pool.starmap(
                _run,
                [(path, per, args.users, args.synchronous, n) for n in range(args.processes)],
                chunksize=1,
            )
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        total = per * args.processes
        print(f"{args.processes} processes: {total / wall:7.0f} updates/s in all")


if __name__ == "__main__":
    main()
