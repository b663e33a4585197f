"""Locks by key that are kept only while someone holds or waits for them.

A table of one lock per user would grow with every user ever seen; these tables
drop a key's lock as soon as its last holder and waiter are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Hashable, Iterator
from typing import Any

from chatstate.exceptions import LockTimeoutError

__all__ = ["AsyncKeyedLocks", "KeyedLocks"]


class KeyedLocks:
    """Thread locks by key, each kept only while someone holds or waits for it."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[Hashable, list[Any]] = {}  # key -> [lock, users]

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.contextmanager
    def hold(self, key: Hashable, wait: float, what: str) -> Iterator[None]:
        with self._guard:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = [threading.Lock(), 0]
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=max(wait, 0)):
                raise LockTimeoutError(f"another holder kept the {what!r} lock for {wait} s")
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._guard:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._locks[key]


class AsyncKeyedLocks:
    """The asyncio twin of :class:`KeyedLocks` (tasks of one event loop per key)."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable, wait: float, what: str) -> AsyncIterator[None]:
        full = (id(asyncio.get_running_loop()), key)
        entry = self._locks.get(full)
        if entry is None:
            entry = self._locks[full] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            lock = entry[0]
            # Always under the timeout: a lock just released may still have a woken
            # waiter queued, and acquire() then waits behind it (free, it returns at
            # once without waiting, so the timeout costs nothing).
            try:
                async with asyncio.timeout(max(wait, 0)):  # not wait_for: see _pipeline
                    await lock.acquire()
            except TimeoutError:
                raise LockTimeoutError(
                    f"another holder kept the {what!r} lock for {wait} s"
                ) from None
            try:
                yield
            finally:
                entry[0].release()
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[full]
