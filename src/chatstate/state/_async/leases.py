"""A lock held as a leased row of a store and polled for: the ``lock()`` of the SQLite twins.

This module is the one body of both twins: ``_sync/leases.py`` (``hold_lease_sync``)
is generated from it by ``tools/unasync.py``. Edit this one, then ``make unasync``.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from typing import Protocol

from chatstate._twins import monotonic_async
from chatstate.exceptions import LockLostError, LockTimeoutError

__all__ = ["AsyncLeaseStore", "hold_lease_async"]


class AsyncLeaseStore(Protocol):
    """A store that takes and gives back leased locks, one attempt at a time."""

    async def try_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """Take the lock for ``token`` if it is free or its holder's lease ran out."""
        ...

    async def unlock(self, user_id: str, name: str, token: str) -> bool:
        """Release the lock held under ``token``; False if it was no longer ours (lapsed)."""
        ...


@contextlib.asynccontextmanager
async def hold_lease_async(
    store: AsyncLeaseStore, user_id: str, name: str, *, lease: float, wait: float
) -> AsyncIterator[None]:
    """Hold ``store``'s lock ``name`` of the user, polling until ``wait`` runs out.

    Raises:
        LockTimeoutError: the lock was not free within ``wait`` seconds.
        LockLostError: the lease ran out while the lock was held; raised when
            the block ends without an error of its own.
    """
    token = secrets.token_hex(16)
    give_up = monotonic_async() + max(wait, 0)
    pause = 0.002
    while not await store.try_lock(user_id, name, token, lease):
        left = give_up - monotonic_async()
        if left <= 0:
            raise LockTimeoutError(f"another holder kept the {name!r} lock for {wait} s")
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, 0.05)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        try:
            ours = await store.unlock(user_id, name, token)
        except Exception:
            if not failed:
                raise
            ours = True  # the block's own error matters more; the lease lapses anyway
        if not ours and not failed:
            raise _lock_lost(name, lease)


def _lock_lost(name: str, lease: float) -> LockLostError:
    return LockLostError(
        f"the {name!r} lock expired while held (lease {lease} s); "
        "another holder may have run at the same time"
    )
