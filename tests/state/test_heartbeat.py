"""Heartbeats: an open claim's lease is renewed while it is held, and only then."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable
from typing import Any

from chatstate import AsyncStateService, StateService
from chatstate.state import AsyncMemoryBackend, MemoryBackend


def _lease_end(backend: Any, user_id: str) -> int | None:
    """When the memory backend's claim on ``user_id`` lapses (ms), or None when it is free."""
    store = getattr(backend, "store", backend)  # the async face shares a MemoryBackend
    user = store._users.get(user_id)
    lease = None if user is None else user.log.lease
    return None if lease is None else int(lease.expires_ms)


def _until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` passes (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


async def _until_async(condition: Callable[[], bool], within: float = 10.0) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def test_a_sync_claim_is_renewed_while_open_and_not_after() -> None:
    """The heartbeat thread moves the lease's end while the claim is open; never after commit."""
    backend = MemoryBackend()
    svc = StateService(backend)
    claim = svc.claim("u", "m1", lease=0.3)
    first = _lease_end(backend, "u")
    assert first is not None
    assert _until(lambda: (_lease_end(backend, "u") or 0) > first)
    claim.update({"n": 1})
    claim.commit()
    assert _lease_end(backend, "u") is None
    time.sleep(0.3)  # three beats' time: a late renewal would have taken the claim back
    assert _lease_end(backend, "u") is None


def test_a_claim_without_heartbeat_is_not_renewed() -> None:
    """heartbeat=False: the lease ends where it was set, however long the handler runs."""
    backend = MemoryBackend()
    svc = StateService(backend)
    claim = svc.claim("u", "m1", lease=0.3, heartbeat=False)
    first = _lease_end(backend, "u")
    time.sleep(0.25)
    assert _lease_end(backend, "u") == first
    claim.release()


def test_a_dropped_claim_stops_beating() -> None:
    """A claim dropped without commit or release is renewed no more once collected."""
    backend = MemoryBackend()
    svc = StateService(backend)
    claim = svc.claim("u", "m1", lease=0.3)
    del claim
    gc.collect()
    end = _lease_end(backend, "u")
    time.sleep(0.35)  # past the lease: a renewal would have moved or kept it
    assert _lease_end(backend, "u") in (end, None)
    assert not svc.claim("u", "m2", wait=1).duplicate  # the user is free again


def test_an_async_claim_is_renewed_while_open_and_not_after() -> None:
    """The event loop's timer renews an open async claim, a kept one too, and stops after."""

    async def main() -> None:
        backend = AsyncMemoryBackend()
        svc = AsyncStateService(backend)
        claim = await svc.claim("u", "m1", lease=0.3)
        first = _lease_end(backend, "u")
        assert first is not None
        assert await _until_async(lambda: (_lease_end(backend, "u") or 0) > first)
        await claim.commit(keep=True)
        kept = _lease_end(backend, "u")
        assert kept is not None
        assert await _until_async(lambda: (_lease_end(backend, "u") or 0) > kept)
        await claim.commit()
        assert _lease_end(backend, "u") is None
        await asyncio.sleep(0.3)
        assert _lease_end(backend, "u") is None

    asyncio.run(main())
