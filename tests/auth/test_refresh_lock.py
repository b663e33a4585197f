"""The token-refresh lock: a short lease, renewed while its holder lives (issue 17).

A live worker once waited 26.4 s for a refresh lock whose holder's release had
failed: the lease was 30 s. Now the lease is 5 s and renewed every third of it
while the refresh runs, so a holder that died (or could not release) holds the
user about one lease at most, and a slow live one keeps its lock.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import redis

from chatstate import (
    AsyncRedisBackend,
    AsyncStateService,
    CachedUser,
    RedisBackend,
    StateData,
    StateService,
)
from chatstate.auth import aget_valid_token, get_valid_token
from chatstate.exceptions import LockTimeoutError
from chatstate.state import AsyncCachedUser
from conftest import register_secret

pytestmark = pytest.mark.redis

RULES = StateData(preserved=["jwt_token"])
KEY = "refresh-lock-test-key-0123456789abcdef"
LEASE = 0.75  # short, so that a test outlives several leases in a second or two


def _token() -> str:
    claims = {"sub": "ana", "exp": int(time.time()) + 3600, "jti": uuid.uuid4().hex}
    return register_secret(jwt.encode(claims, KEY, algorithm="HS256"))


def _lock_key(backend: Any, user_id: str) -> str:
    return f"{backend.keys(user_id)[0]}:lock:jwt-refresh"


# -- the default lease -------------------------------------------------------------------


def test_the_refresh_lock_lease_is_5_s_by_default(redis_url: str, namespace: str) -> None:
    """get_valid_token's lock lapses 5 s after its holder stops renewing it, not 30 s."""
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    client = redis.Redis.from_url(redis_url)
    seen: list[int] = []

    def refresh(_old: str | None) -> str:
        seen.append(client.pttl(_lock_key(svc.manager.backend, "ana")))
        return _token()

    try:
        get_valid_token(CachedUser("ana", svc), refresh)
    finally:
        client.close()
        svc.close()
    assert len(seen) == 1
    assert 4000 < seen[0] <= 5000


def test_the_async_refresh_lock_lease_is_5_s_by_default(redis_url: str, namespace: str) -> None:
    """The asyncio twin takes the same 5 s lease."""
    client = redis.Redis.from_url(redis_url)
    seen: list[int] = []

    async def main() -> None:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace), RULES)

        async def refresh(_old: str | None) -> str:
            seen.append(client.pttl(_lock_key(svc.manager.backend, "ana")))
            return _token()

        try:
            await aget_valid_token(AsyncCachedUser("ana", svc), refresh)
        finally:
            await svc.aclose()

    try:
        asyncio.run(main())
    finally:
        client.close()
    assert len(seen) == 1
    assert 4000 < seen[0] <= 5000


# -- a live holder keeps it ----------------------------------------------------------------


def _holds_past_its_lease(holder: Any, other: Any) -> None:
    """A block on ``holder`` that runs three leases long keeps ``other`` out throughout."""
    refused = 0
    try:
        with holder.lock("ana", "jwt-refresh", lease=LEASE, wait=1):
            until = time.monotonic() + 3 * LEASE
            while time.monotonic() < until:
                with (
                    pytest.raises(LockTimeoutError),
                    other.lock("ana", "jwt-refresh", lease=LEASE, wait=0),
                ):
                    pass
                refused += 1
                time.sleep(0.05)
        with other.lock("ana", "jwt-refresh", lease=LEASE, wait=0):  # released at the end
            pass
    finally:
        holder.close()
        other.close()
    assert refused > 10


def test_a_slow_live_holder_keeps_the_lock_past_its_lease(redis_url: str, namespace: str) -> None:
    """A block that runs three leases long holds the lock throughout; no LockLostError."""
    _holds_past_its_lease(
        RedisBackend.from_url(redis_url, namespace=namespace),
        RedisBackend.from_url(redis_url, namespace=namespace),
    )


def test_a_slow_live_async_holder_keeps_the_lock_past_its_lease(
    redis_url: str, namespace: str
) -> None:
    """The asyncio twin renews from the event loop while the block awaits."""

    async def main() -> int:
        holder = AsyncRedisBackend.from_url(redis_url, namespace=namespace)
        other = AsyncRedisBackend.from_url(redis_url, namespace=namespace)
        loop = asyncio.get_running_loop()
        refused = 0
        try:
            async with holder.lock("ana", "jwt-refresh", lease=LEASE, wait=1):
                until = loop.time() + 3 * LEASE
                while loop.time() < until:
                    with pytest.raises(LockTimeoutError):
                        async with other.lock("ana", "jwt-refresh", lease=LEASE, wait=0):
                            pass
                    refused += 1
                    await asyncio.sleep(0.05)
            async with other.lock("ana", "jwt-refresh", lease=LEASE, wait=0):
                pass
        finally:
            await holder.aclose()
            await other.aclose()
        return refused

    assert asyncio.run(main()) > 10


# -- a holder that dies frees it within one lease ---------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from chatstate import AsyncRedisBackend, AsyncStateService, CachedUser, RedisBackend
    from chatstate import StateData, StateService
    from chatstate.auth import aget_valid_token, get_valid_token
    from chatstate.state import AsyncCachedUser

    url, namespace, twin, lease = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    rules = StateData(preserved=["jwt_token"])

    if twin == "sync":
        def refresh(old):
            print("holding", flush=True)
            time.sleep(3600)  # a refresh that never ends: the process is killed in it

        svc = StateService(RedisBackend.from_url(url, namespace=namespace), rules)
        get_valid_token(CachedUser("ana", svc), refresh, lock_timeout=lease)
    else:
        async def refresh(old):
            print("holding", flush=True)
            await asyncio.sleep(3600)

        async def main():
            svc = AsyncStateService(AsyncRedisBackend.from_url(url, namespace=namespace), rules)
            await aget_valid_token(AsyncCachedUser("ana", svc), refresh, lock_timeout=lease)

        asyncio.run(main())
    """
)


def _wait_for_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "the child never took the lock"
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("twin", ["sync", "async"])
def test_a_refresh_lock_whose_holder_was_killed_frees_within_one_lease(
    redis_url: str, namespace: str, twin: str
) -> None:
    """A child SIGKILLed mid-refresh frees the lock within one lease (renewed while it lived)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, redis_url, namespace, twin, str(LEASE)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    client = redis.Redis.from_url(redis_url)
    svc = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    key = _lock_key(svc.manager.backend, "ana")
    try:
        assert _wait_for_line(proc, 30) == "holding"
        holder = client.get(key)
        assert holder is not None
        until = time.monotonic() + 2 * LEASE  # alive: renewed past its lease
        while time.monotonic() < until:
            assert client.get(key) == holder
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        died = time.monotonic()
        left = client.pttl(key)
        assert 0 < left <= LEASE * 1000  # still held, for at most one lease
        new = _token()
        assert get_valid_token(CachedUser("ana", svc), lambda _old: new, wait=10) == new
        waited = time.monotonic() - died
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
        client.close()
        svc.close()
    assert waited <= LEASE + 0.5


def test_a_slow_live_sqlite_holder_keeps_the_lock_past_its_lease(tmp_path: Path) -> None:
    """On SQLite too, a block that runs three leases long holds the lock throughout."""
    from chatstate.state import SqliteBackend

    _holds_past_its_lease(SqliteBackend(tmp_path / "l.db"), SqliteBackend(tmp_path / "l.db"))
    store = SqliteBackend(tmp_path / "l.db")
    assert store.renew_lock("ana", "gone", "no-such-token", LEASE) is False  # never takes one
    store.close()
