"""Sentinel: the backend over a Sentinel-managed master, through a failover."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import pytest
import redis
from redis.sentinel import Sentinel

import servers
from chatstate import AsyncRedisBackend, AsyncStateService, RedisBackend, StateService
from chatstate.exceptions import BackendUnavailable

pytestmark = [pytest.mark.redis, pytest.mark.slow]


def _start_sentinel(kind: str, master_port: int, directory: Path) -> tuple[subprocess.Popen, int]:
    binary = servers.find_binary(kind)
    assert binary is not None
    port = servers.free_port()
    conf = directory / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master_port} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 5000\n"
    )
    with (directory / "sentinel.log").open("ab") as log:
        proc = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=log, stderr=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port, socket_timeout=1).ping():
                return proc, port
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("sentinel did not start")


def _wait(predicate, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def test_sentinel_master_survives_a_failover(server_kind: str, tmp_path: Path) -> None:
    """State written through Sentinel's master is there after a failover, and writes go on."""
    master = servers.start_server(server_kind)
    replica = servers.start_server(server_kind, "--replicaof", "127.0.0.1", str(master.port))
    sentinel_proc, sentinel_port = _start_sentinel(server_kind, master.port, tmp_path)
    try:
        sentinel = Sentinel([("127.0.0.1", sentinel_port)], socket_timeout=2)
        _wait(lambda: len(sentinel.discover_slaves("mymaster")) == 1)
        svc = StateService(RedisBackend(sentinel.master_for("mymaster", socket_timeout=2)))
        for i in range(20):
            svc.update("u", {f"k{i}": i})
        master.client().execute_command("WAIT", 1, 2000)

        redis.Redis(port=sentinel_port).execute_command("SENTINEL", "FAILOVER", "mymaster")

        def promoted() -> bool:
            try:
                return sentinel.discover_master("mymaster")[1] == replica.port
            except redis.ConnectionError:  # MasterNotFoundError while it votes
                return False

        _wait(promoted)

        def write_after_failover() -> bool:
            try:
                svc.update("u", {"after": True})
            except BackendUnavailable:
                return False
            return True

        _wait(write_after_failover)
        doc = svc.get("u")
        assert all(doc[f"k{i}"] == i for i in range(20))
        assert doc["after"] is True
        assert svc.snapshot("u").version == 21

        async def async_side() -> None:
            from redis.asyncio.sentinel import Sentinel as AsyncSentinel

            asentinel = AsyncSentinel([("127.0.0.1", sentinel_port)], socket_timeout=2)
            asvc = AsyncStateService(AsyncRedisBackend(asentinel.master_for("mymaster")))
            assert (await asvc.update("u", {"async": 1}))["async"] == 1
            await asvc.aclose()  # the backend's own connections; the client stays ours
            await asvc.manager.backend.client.aclose()  # type: ignore[attr-defined]
            for client in asentinel.sentinels:
                await client.aclose()

        asyncio.run(async_side())
        svc.close()
        svc.manager.backend.client.close()  # type: ignore[attr-defined]
        for client in sentinel.sentinels:
            client.close()
    finally:
        sentinel_proc.kill()
        sentinel_proc.wait()
        replica.cleanup()
        master.cleanup()
