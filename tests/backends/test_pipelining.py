"""Automatic pipelining of the async Redis backend: order, cancellation, lost replies, both ways."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

import servers
from chatstate import AsyncRedisBackend, AsyncStateService
from chatstate.testing import BackendContract
from proxy import ReplyDroppingProxy

pytestmark = pytest.mark.redis


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/", maxsplit=1)[0])


class TestRedisBackendUnpipelined(BackendContract):
    """The whole contract suite with pipelining switched off."""

    @pytest.fixture(autouse=True)
    def _store(self, redis_url: str, namespace: str) -> None:
        self.url = redis_url
        self.namespace = namespace

    def make_backend(self):  # type: ignore[no-untyped-def]
        from chatstate import RedisBackend

        return RedisBackend.from_url(self.url, namespace=self.namespace)

    def make_async_backend(self) -> AsyncRedisBackend:
        return AsyncRedisBackend.from_url(self.url, namespace=self.namespace, pipelining=False)


@pytest.mark.cluster
class TestRedisClusterUnpipelined(BackendContract):
    """The contract suite on a Cluster with pipelining switched off."""

    @pytest.fixture(autouse=True)
    def _store(self, cluster_url: str, namespace: str) -> None:
        self.url = cluster_url
        self.namespace = namespace

    def make_backend(self):  # type: ignore[no-untyped-def]
        from chatstate import RedisBackend

        return RedisBackend.from_url(self.url, namespace=self.namespace, cluster=True)

    def make_async_backend(self) -> AsyncRedisBackend:
        return AsyncRedisBackend.from_url(
            self.url, namespace=self.namespace, cluster=True, pipelining=False
        )


def test_a_users_commands_reach_the_server_in_the_order_they_were_issued(
    redis_url: str, namespace: str
) -> None:
    """200 writes started in order without awaiting get versions in that order."""

    async def main() -> None:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        others = [asyncio.create_task(svc.update(f"other{i}", {"n": i})) for i in range(50)]
        mine = [asyncio.create_task(svc.update_once("u", {"i": i}, op_id=None)) for i in range(200)]
        outcomes = await asyncio.gather(*mine)
        await asyncio.gather(*others)
        assert [o.version for o in outcomes] == list(range(1, 201))
        assert (await svc.get("u")) == {"i": 199}
        await svc.aclose()

    asyncio.run(main())


def test_concurrent_calls_share_round_trips(
    redis_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 concurrent updates go out in far fewer writes to the socket than commands."""
    from redis.asyncio.connection import AbstractConnection

    sends: list[int] = []
    original = AbstractConnection.send_packed_command

    async def counting(self, command, check_health=True):  # type: ignore[no-untyped-def]
        parts = command if isinstance(command, list) else [command]
        scripts = sum(1 for p in parts if isinstance(p, bytes) and b"EVALSHA" in p)
        if scripts:  # not a connection's handshake or health check
            sends.append(scripts)
        return await original(self, command, check_health)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", counting)

    async def main(pipelining: bool) -> int:
        backend = AsyncRedisBackend.from_url(redis_url, namespace=namespace, pipelining=pipelining)
        svc = AsyncStateService(backend)
        await svc.update("warm", {"a": 1})
        sends.clear()
        await asyncio.gather(*(svc.update(f"u{i}", {"i": i}) for i in range(500)))
        assert sum(sends) == 500
        await svc.aclose()
        return len(sends)

    assert asyncio.run(main(True)) < 100
    assert asyncio.run(main(False)) == 500


def test_cancelled_callers_never_get_or_mix_replies(redis_url: str, namespace: str) -> None:
    """Cancel half of 400 concurrent calls mid-flight: every finished call got its own reply."""

    async def main() -> None:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        rnd = random.Random(5)
        for round_ in range(5):
            tasks = {
                asyncio.create_task(svc.update(f"user{i}", {"me": f"user{i}", "round": round_})): i
                for i in range(400)
            }
            await asyncio.sleep(rnd.uniform(0, 0.01))
            for task in tasks:
                if rnd.random() < 0.5:
                    task.cancel()
            for task, i in tasks.items():
                try:
                    doc = await task
                except asyncio.CancelledError:
                    continue
                assert doc["me"] == f"user{i}"
                assert doc["round"] == round_
        for i in range(400):
            doc = await svc.get(f"user{i}")
            assert doc.get("me", f"user{i}") == f"user{i}"
        await svc.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "unpipelined"])
def test_a_lost_batch_reply_settles_every_write_in_it_exactly_once(
    redis_url: str, namespace: str, pipelining: bool
) -> None:
    """The connection dies with replies unread: each write is applied exactly once."""
    proxy = ReplyDroppingProxy(_port(redis_url))

    async def main() -> None:
        url = f"redis://127.0.0.1:{proxy.port}/0"
        svc = AsyncStateService(
            AsyncRedisBackend.from_url(url, namespace=namespace, pipelining=pipelining)
        )
        await svc.update("hot", {"start": True})
        proxy.arm(b"EVALSHA", times=1)
        outcomes = await asyncio.gather(
            *(svc.update_once("hot", {f"k{i}": i}, op_id=f"write-{i}") for i in range(40))
        )
        assert proxy.dropped >= 1
        assert {o.status for o in outcomes} == {"applied"}
        assert sorted(o.version for o in outcomes) == list(range(2, 42))
        doc = await svc.get("hot")
        assert all(doc[f"k{i}"] == i for i in range(40))
        assert (await svc.snapshot("hot")).version == 41
        await svc.aclose()

    try:
        asyncio.run(main())
    finally:
        proxy.close()


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "unpipelined"])
def test_script_flush_in_a_loop_never_surfaces_to_async_callers(
    server_kind: str, pipelining: bool
) -> None:
    """SCRIPT FLUSH every few ms under 50 concurrent tasks: no error, every write counted."""
    server = servers.start_server(server_kind)
    stop = threading.Event()
    flushes = 0

    def flusher() -> None:
        nonlocal flushes
        admin = server.client()
        while not stop.is_set():
            admin.script_flush()
            flushes += 1
            time.sleep(0.002)
        admin.close()

    async def main() -> None:
        svc = AsyncStateService(AsyncRedisBackend.from_url(server.url, pipelining=pipelining))

        async def worker(w: int) -> None:
            for i in range(40):
                await svc.update("hot", {f"w{w}": i})

        await asyncio.gather(*(worker(w) for w in range(50)))
        assert (await svc.snapshot("hot")).version == 2000
        await svc.aclose()

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        asyncio.run(main())
    finally:
        stop.set()
        thread.join()
        server.cleanup()
    assert flushes > 5


@pytest.mark.slow
@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "unpipelined"])
def test_kill_and_aof_restart_lose_no_acknowledged_async_update(
    server_kind: str, pipelining: bool
) -> None:
    """SIGKILL mid-load with appendfsync always: every update a task saw acknowledged is there."""
    from chatstate.exceptions import BackendUnavailable, StoreBusyError

    server = servers.start_server(server_kind, "--appendonly", "yes", "--appendfsync", "always")
    acked: dict[str, set[int]] = {f"u{i}": set() for i in range(20)}

    async def main() -> None:
        backend = AsyncRedisBackend.from_url(
            server.url, pipelining=pipelining, socket_timeout=1, socket_connect_timeout=0.5
        )
        svc = AsyncStateService(backend)
        stop = asyncio.Event()

        async def writer(user: str) -> None:
            i = 0
            while not stop.is_set():
                try:
                    await svc.update(user, {"seen": {str(i): i}})
                    acked[user].add(i)
                except (BackendUnavailable, StoreBusyError):
                    await asyncio.sleep(0.05)
                i += 1

        tasks = [asyncio.create_task(writer(u)) for u in acked]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(server.kill)
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.start)
        before = sum(len(v) for v in acked.values())
        deadline = time.monotonic() + 15
        while sum(len(v) for v in acked.values()) <= before + 50:
            assert time.monotonic() < deadline, "no write got through after the restart"
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
        for user, seen in acked.items():
            stored = {int(k) for k in (await svc.get(user))["seen"]}
            assert seen <= stored, f"lost {sorted(seen - stored)[:5]}"
        await svc.aclose()

    try:
        asyncio.run(main())
    finally:
        server.cleanup()


SHUTDOWN_SCRIPT = """
import asyncio, sys
sys.path[:0] = ["tests", "tests/flow"]
from chatstate import AsyncRedisBackend, AsyncStateService
from chatstate.flow import AsyncRouter
import test_router_exactly_once as t

async def main():
    backend = AsyncRedisBackend.from_url(sys.argv[1], namespace=sys.argv[2])
    router = AsyncRouter(AsyncStateService(backend, t.RULES), main_menu=t.MENU, wait=0.001)
    deliveries = t._deliveries(t._script(7), 7)
    await asyncio.gather(*(router.handle(m) for m in deliveries))

try:
    asyncio.run(main())
except Exception as exc:
    print(type(exc).__name__)
"""


@pytest.mark.redis
def test_asyncio_run_returns_when_a_task_fails_amid_pipelined_traffic(
    redis_url: str, namespace: str
) -> None:
    """A handler fails amid pipelined traffic: asyncio.run cancels the rest and returns.

    The pipeline's lanes must stop when cancelled even if a library call on the
    way swallowed the CancelledError (the program used to hang here).
    """
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_SCRIPT, redis_url, namespace],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
