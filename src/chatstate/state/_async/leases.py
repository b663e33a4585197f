"""A lock held as a lease of a store, renewed while held: the ``lock()`` of SQLite and Redis.

This module is the one body of both twins: ``_sync/leases.py`` (``hold_lease_sync``)
is generated from it by ``tools/unasync.py``. Edit this one, then ``make unasync``.

The lease says how long a lock outlives a holder that died, or whose release
failed (the store unreachable at that moment): kept short, it would also lapse
under a holder that legitimately works longer, so a store that can renew a
lease (``renew_lock``) has it renewed every third of the lease while the block
runs (:mod:`chatstate._heartbeat`). A dead holder stops renewing and the lock is
free within one lease; a slow live one keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

from chatstate._heartbeat import heartbeat_async
from chatstate._twins import monotonic_async
from chatstate.exceptions import LockLostError, LockTimeoutError

__all__ = ["AsyncLeaseStore", "hold_lease_async"]

log = logging.getLogger("chatstate.state")


class AsyncLeaseStore(Protocol):
    """A store that takes and gives back leased locks, one attempt at a time.

    It may also renew them (:class:`AsyncRenewing`). Without that a lock lapses
    ``lease`` after it was taken, however long its holder works.
    """

    async def try_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """Take the lock for ``token`` if it is free or its holder's lease ran out."""
        ...

    async def unlock(self, user_id: str, name: str, token: str) -> bool:
        """Release the lock held under ``token``; False if it was no longer ours (lapsed)."""
        ...


@runtime_checkable
class AsyncRenewing(Protocol):
    """A lease store that also renews the locks it holds."""

    async def renew_lock(self, user_id: str, name: str, token: str, lease: float) -> bool:
        """Extend the lock held under ``token`` to ``lease`` seconds from now.

        False, changing nothing, when it is no longer held under that token (it
        is never taken back).
        """
        ...


class AsyncHeldLease:
    """A held lock, as its heartbeat renews it."""

    __slots__ = ("__weakref__", "lease", "lost", "name", "renew", "stopped", "token", "user_id")

    def __init__(self, renew: Any, user_id: str, name: str, token: str, lease: float) -> None:
        self.renew = renew
        self.user_id = user_id
        self.name = name
        self.token = token
        self.lease = lease
        self.lost = False  # a renewal found the lock no longer ours
        self.stopped = False  # the block ended: a renewal that ends later proves nothing

    async def beat(self) -> bool:
        """Renew once; False (stop) when the lock is no longer ours."""
        if self.stopped:
            return False
        ours = bool(await self.renew(self.user_id, self.name, self.token, self.lease))
        if not ours and not self.stopped:
            self.lost = True
        return ours


@contextlib.asynccontextmanager
async def hold_lease_async(
    store: AsyncLeaseStore, user_id: str, name: str, *, lease: float, wait: float
) -> AsyncIterator[None]:
    """Hold ``store``'s lock ``name`` of the user, polling until ``wait`` runs out.

    While the block runs, the lease is renewed every third of it (when the
    store can renew), so the lock lapses one lease after its holder died or
    failed to release it, never under a live one.

    Raises:
        LockTimeoutError: the lock was not free within ``wait`` seconds.
        LockLostError: the lease ran out while the lock was held (its renewals
            failed for longer than the lease, or it was erased); raised when
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
    renew = store.renew_lock if isinstance(store, AsyncRenewing) else None
    held = AsyncHeldLease(renew, user_id, name, token, lease)
    beat = None if renew is None else heartbeat_async(held, AsyncHeldLease.beat, lease / 3)
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        held.stopped = True
        if beat is not None:
            beat.stop()
        try:
            ours = await store.unlock(user_id, name, token)
        except Exception:
            if not failed:
                raise
            # The block's own error matters more; the lock lapses within one lease.
            log.warning("could not release the %r lock of a failed block", name)
            ours = True
        if (held.lost or not ours) and not failed:
            raise _lock_lost(name, lease)


def _lock_lost(name: str, lease: float) -> LockLostError:
    return LockLostError(
        f"the {name!r} lock expired while held (lease {lease} s, renewed while it was "
        "held: the store was out of reach longer than that, or the lock was erased); "
        "another holder may have run at the same time"
    )
