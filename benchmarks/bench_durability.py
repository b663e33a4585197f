"""What waiting for durability costs per write, on a throwaway primary and replica.

    python benchmarks/bench_durability.py [--kind valkey|redis] [--writes 2000]
        [--tasks 64] [--json]

Starts a primary (``appendonly yes``, ``appendfsync always``) and one replica of
``--kind`` on random loopback ports (never 6379), and times ``update`` of a small
patch with ``durability`` off, ``Durability(replicas=1)`` (``WAIT 1``) and
``Durability(replicas=0, aof=True)`` (``WAITAOF 1 0``: Redis 7.2+ or Valkey; the
row is skipped on an older server): one thread writing one at a time (the
latency of one write) and ``--tasks`` asyncio tasks of one pipelined
``AsyncRedisBackend`` (a batch waits once). Every mode runs on the same servers in
the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import servers
from chatstate import AsyncStateService, StateService
from chatstate.exceptions import ConfigurationError
from chatstate.state import AsyncRedisBackend, RedisBackend
from chatstate.state.redis import Durability

MODES: dict[str, Durability | None] = {
    "off": None,
    "replicas=1": Durability(replicas=1, timeout=1.0),
    "aof": Durability(replicas=0, aof=True, timeout=1.0),
}


def one_thread(url: str, durability: Durability | None, writes: int, tag: str) -> dict[str, Any]:
    svc = StateService(RedisBackend.from_url(url, durability=durability))
    times = []
    for i in range(writes):
        start = time.perf_counter()
        svc.update(f"{tag}-{i % 100}", {"step": i, "name": "x" * 20})
        times.append(time.perf_counter() - start)
    svc.close()
    times.sort()
    return {
        "mean_us": round(statistics.fmean(times) * 1e6),
        "p50_us": round(times[len(times) // 2] * 1e6),
        "p99_us": round(times[int(len(times) * 0.99)] * 1e6),
    }


async def many_tasks(
    url: str, durability: Durability | None, writes: int, tasks: int, tag: str
) -> float:
    svc = AsyncStateService(AsyncRedisBackend.from_url(url, durability=durability))
    per = writes // tasks

    async def task(t: int) -> None:
        for i in range(per):
            await svc.update(f"{tag}-{t}", {"step": i})

    start = time.perf_counter()
    await asyncio.gather(*(task(t) for t in range(tasks)))
    elapsed = time.perf_counter() - start
    await svc.aclose()
    return per * tasks / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="valkey", choices=servers.KINDS)
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    primary = servers.start_server(args.kind, "--appendonly", "yes", "--appendfsync", "always")
    replica = servers.start_server(args.kind, "--replicaof", "127.0.0.1", str(primary.port))
    try:
        while replica.client().info("replication").get("master_link_status") != "up":
            time.sleep(0.05)
        version = primary.client().info("server")
        rows: dict[str, Any] = {}
        for name, durability in MODES.items():
            try:
                row: dict[str, Any] = one_thread(primary.url, durability, args.writes, name)
                row["async_writes_per_s"] = round(
                    asyncio.run(many_tasks(primary.url, durability, args.writes, args.tasks, name))
                )
            except ConfigurationError as exc:
                row = {"skipped": str(exc)}
            rows[name] = row
        result = {
            "server": f"{args.kind} {version.get('valkey_version') or version['redis_version']}",
            "primary": "appendonly yes, appendfsync always; one replica; loopback",
            "writes": args.writes,
            "tasks": args.tasks,
            "modes": rows,
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(result["server"], "-", result["primary"])
            for name, row in rows.items():
                print(f"{name:>12}: {row}")
    finally:
        replica.cleanup()
        primary.cleanup()


if __name__ == "__main__":
    main()
