"""``chatstate bench`` (Redis only): updates/s and gets/s against the server."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from collections.abc import Callable
from typing import Any

from chatstate.cli._backends import RedisStore, redis_store
from chatstate.cli._console import Console
from chatstate.cli._errors import CommandLineError
from chatstate.state import AsyncStateService, StateData
from chatstate.state.redis import AsyncRedisBackend, map_redis_errors

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--count, --users and --concurrency."""
    parser.add_argument("--count", type=int, default=2000, metavar="N", help="calls of each kind")
    parser.add_argument("--users", type=int, default=100, metavar="N", help="distinct users")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="asyncio tasks at once (1: the sync service)",
    )


def run(args: argparse.Namespace, console: Console) -> int:
    """Time updates and gets against the server, then remove what the benchmark wrote."""
    if args.count < 1 or args.users < 1 or args.concurrency < 1:
        raise CommandLineError("--count, --users and --concurrency must be at least 1")
    where = redis_store(args)
    run_id = secrets.token_hex(4)
    users = [f"chatstate-bench-{run_id}-{i}" for i in range(args.users)]
    patch = {"step": "menu", "profile": {"name": "Ana", "lang": "es"}, "n": 0}
    try:
        if args.concurrency == 1:
            results = _bench_sync(where, args, console, users, patch)
        else:
            results = asyncio.run(_bench_async(where, args, console, users, patch))
    finally:
        _cleanup(where, users)
    for name, seconds in results:
        callers = f"{args.concurrency} caller{'s' if args.concurrency > 1 else ''}"
        console.out(
            f"{name:<8} {args.count / seconds:9.0f}/s  "
            f"({args.count} in {seconds:.2f} s, {callers}, {args.users} users)"
        )
    return 0


def _bench_sync(
    where: RedisStore,
    args: argparse.Namespace,
    console: Console,
    users: list[str],
    patch: dict[str, Any],
) -> list[tuple[str, float]]:
    results = []
    # No key secret: the keys are named by the ids, so that _cleanup finds them.
    with where.listing_service(StateData(), by_tag=False) as svc:
        calls: list[tuple[str, Callable[[int], object]]] = [
            ("updates", lambda i: svc.update(users[i % len(users)], {**patch, "n": i})),
            ("gets", lambda i: svc.get(users[i % len(users)])),
        ]
        for name, call in calls:
            start = time.perf_counter()
            for i in range(args.count):
                call(i)
                console.progress(f"{name} {i + 1}/{args.count}")
            results.append((name, time.perf_counter() - start))
    return results


async def _bench_async(
    where: RedisStore,
    args: argparse.Namespace,
    console: Console,
    users: list[str],
    patch: dict[str, Any],
) -> list[tuple[str, float]]:
    backend = AsyncRedisBackend.from_url(
        where.url, namespace=where.namespace, cluster=where.cluster
    )
    results = []
    done = 0
    async with AsyncStateService(backend) as svc:
        for name in ("updates", "gets"):
            done = 0

            async def caller(worker: int, name: str = name) -> None:
                nonlocal done
                for i in range(worker, args.count, args.concurrency):
                    user = users[i % len(users)]
                    if name == "updates":
                        await svc.update(user, {**patch, "n": i})
                    else:
                        await svc.get(user)
                    done += 1
                    console.progress(f"{name} {done}/{args.count}")

            start = time.perf_counter()
            await asyncio.gather(*(caller(w) for w in range(args.concurrency)))
            results.append((name, time.perf_counter() - start))
    return results


def _cleanup(where: RedisStore, users: list[str]) -> None:
    with where.client() as client, map_redis_errors("DEL"):
        for user in users:
            client.delete(*where.keys.keys(user))
