"""Concurrent writers on the memory backend: no lost update, contiguous versions; its locks."""

from __future__ import annotations

import asyncio
import threading

from chatstate import AsyncMemoryBackend, AsyncStateService, MemoryBackend, StateService
from chatstate._locks import AsyncKeyedLocks
from chatstate.exceptions import LockTimeoutError


def test_threads_and_tasks_lose_no_update() -> None:
    """8 threads and 50 asyncio tasks update one user; every write lands exactly once."""
    store = MemoryBackend()
    sync = StateService(store)
    versions: list[int] = []
    lock = threading.Lock()

    def thread_writer(t: int) -> None:
        for i in range(100):
            out = sync.update_once("hot", {"threads": {f"t{t}-{i}": i}}, op_id=None)
            with lock:
                versions.append(out.version)

    async def task_writers() -> None:
        svc = AsyncStateService(AsyncMemoryBackend(store))

        async def task_writer(k: int) -> None:
            for i in range(20):
                out = await svc.update_once("hot", {"tasks": {f"k{k}-{i}": i}}, op_id=None)
                with lock:
                    versions.append(out.version)
                await asyncio.sleep(0)

        await asyncio.gather(*(task_writer(k) for k in range(50)))

    threads = [threading.Thread(target=thread_writer, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    asyncio.run(task_writers())
    for t in threads:
        t.join()

    total = 8 * 100 + 50 * 20
    assert sorted(versions) == list(range(1, total + 1))
    doc = sync.get("hot")
    assert len(doc["threads"]) == 800
    assert len(doc["tasks"]) == 1000
    assert sync.snapshot("hot").version == total


def test_transactions_from_threads_count_exactly() -> None:
    """Compare-and-set transactions from 8 threads add up to the exact total."""
    svc = StateService(MemoryBackend(), max_attempts=1000)

    def add(doc: dict) -> dict:
        return {"n": doc.get("n", 0) + 1}

    threads = [
        threading.Thread(target=lambda: [svc.transaction("c", add) for _ in range(50)])
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert svc.get("c") == {"n": 400}


def test_a_keyed_lock_s_wait_holds_when_a_woken_waiter_is_queued() -> None:
    """Just released, a lock looks free while its woken waiter has not run: the wait still holds.

    acquire() then queued behind that waiter with no bound (a 0.3 s wait took 2 s).
    """

    async def main() -> str:
        locks = AsyncKeyedLocks()
        release = asyncio.Event()

        async def holder() -> None:
            async with locks.hold("k", 5, "k"):
                await release.wait()

        async def next_in_line() -> None:
            async with locks.hold("k", 5, "k"):
                await asyncio.sleep(10)

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        second = asyncio.create_task(next_in_line())
        await asyncio.sleep(0)
        release.set()
        await asyncio.sleep(0)  # the holder lets go; the next in line is woken, not yet run
        try:
            async with locks.hold("k", 0.05, "k"):
                result = "acquired"
        except LockTimeoutError:
            result = "timed out"
        second.cancel()
        await asyncio.gather(first, second, return_exceptions=True)
        return result

    assert asyncio.run(main()) == "timed out"
