"""Where the sync and asyncio twins must differ: one helper pair per difference.

The asyncio source (each ``_async/`` module) calls the ``*_async`` variant;
``tools/unasync.py`` renames the call to the ``*_sync`` variant in the generated
twin. So each difference, and the reason for it, is written here once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable
from typing import TypeVar

__all__ = ["monotonic_async", "monotonic_sync", "resolved_async", "resolved_sync"]

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
