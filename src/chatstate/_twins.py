"""Where the sync and asyncio twins must differ: one helper pair per difference.

The asyncio source (each ``_async/`` module) calls the ``*_async`` variant;
``tools/unasync.py`` renames the call to the ``*_sync`` variant in the generated
twin. So each difference, and the reason for it, is written here once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

from chatstate.exceptions import UsageError

__all__ = [
    "gathered_async",
    "gathered_sync",
    "monotonic_async",
    "monotonic_sync",
    "resolved_async",
    "resolved_sync",
    "run_sync",
]

T = TypeVar("T")


async def resolved_async(result: T | Awaitable[T]) -> T:
    """What a user's callable returned, awaited if it was a coroutine function.

    The asyncio twins take plain and coroutine functions alike (a transaction
    function, a token refresh), so they await whatever is awaitable.
    """
    if inspect.isawaitable(result):
        return await result
    return result


def resolved_sync(result: T) -> T:
    """What a user's callable returned: the sync twins take plain functions only."""
    return result


def monotonic_async() -> float:
    """The running event loop's clock: the one its sleeps and timeouts follow."""
    return asyncio.get_running_loop().time()


def monotonic_sync() -> float:
    """The monotonic clock ``time.sleep`` waits on."""
    return time.monotonic()


async def gathered_async(calls: Iterable[Awaitable[T]]) -> list[T]:
    """The results of ``calls``, in order, awaited concurrently.

    Independent reads (the Redis backend's deadline shards, each its own hash
    slot) then cost one round trip together, or one pipeline, not one each.
    """
    return list(await asyncio.gather(*calls))


def gathered_sync(calls: Iterable[T]) -> list[T]:
    """The results of ``calls``, in order: a thread makes them one after another.

    ``calls`` is a generator, so each call runs as it is reached and the first
    to fail stops the rest, as a plain loop would.
    """
    return list(calls)


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end, without an event loop.

    The sync ``Router`` runs the router's one asyncio body so: over a sync
    service nothing in it awaits anything that suspends.
    """
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise UsageError(
        "something async (a validator, prompt, hook or handler returning an awaitable) "
        "ran under the sync Router: use AsyncRouter"
    )
