"""Many processes, threads and tasks writing one user: nothing acknowledged is lost.

The checker demands unique, contiguous versions and that replaying the
acknowledged patches in version order rebuilds the stored document. A naive
GET+SET implementation runs through the same checker as a negative control:
the checker must catch it.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
import redis

from chatstate import AsyncRedisBackend, AsyncStateService, RedisBackend, StateService
from chatstate.state import merge

pytestmark = [pytest.mark.redis, pytest.mark.slow]

PROCESSES = 4
THREADS = 8
TASKS = 50
PER_THREAD = 40
PER_TASK = 8

Record = tuple[int, dict[str, Any]]


def _patch(proc: int, worker: int, i: int) -> dict[str, Any]:
    return {f"p{proc}": {f"w{worker}": i}, "last": f"{proc}-{worker}-{i}", "log": [proc, worker, i]}


def _threads_worker(url: str, namespace: str, proc: int) -> list[Record]:
    svc = StateService(RedisBackend.from_url(url, namespace=namespace))
    records: list[Record] = []
    lock = threading.Lock()

    def run(worker: int) -> None:
        for i in range(PER_THREAD):
            patch = _patch(proc, worker, i)
            out = svc.update_once("hot", patch, op_id=None)
            with lock:
                records.append((out.version, patch))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    svc.close()
    return records


def _tasks_worker(url: str, namespace: str, proc: int, pipelining: bool = True) -> list[Record]:
    async def main() -> list[Record]:
        backend = AsyncRedisBackend.from_url(url, namespace=namespace, pipelining=pipelining)
        svc = AsyncStateService(backend)
        records: list[Record] = []

        async def run(worker: int) -> None:
            for i in range(PER_TASK):
                patch = _patch(proc, worker, i)
                out = await svc.update_once("hot", patch, op_id=None)
                records.append((out.version, patch))

        await asyncio.gather(*(run(w) for w in range(TASKS)))
        await svc.aclose()
        return records

    return asyncio.run(main())


def _naive_worker(url: str, namespace: str, proc: int) -> list[Record]:
    """The read-modify-write most bots start with: GET, merge in Python, SET."""
    client = redis.Redis.from_url(url)
    key = f"{namespace}:naive"
    records: list[Record] = []
    lock = threading.Lock()

    def run(worker: int) -> None:
        for i in range(PER_THREAD):
            patch = _patch(proc, worker, i)
            raw = client.get(key)
            stored = json.loads(raw) if raw else {"v": 0, "doc": {}}
            new = {"v": stored["v"] + 1, "doc": merge(stored["doc"], patch)}
            client.set(key, json.dumps(new))
            with lock:
                records.append((new["v"], patch))

    threads = [threading.Thread(target=run, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    return records


def _unpipelined_tasks_worker(url: str, namespace: str, proc: int) -> list[Record]:
    return _tasks_worker(url, namespace, proc, pipelining=False)


def _run_processes(worker: Any, url: str, namespace: str) -> list[Record]:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(PROCESSES, mp_context=ctx) as pool:
        futures = [pool.submit(worker, url, namespace, p) for p in range(PROCESSES)]
        return [r for f in futures for r in f.result()]


def check_history(records: list[Record], final: dict[str, Any], final_version: int) -> None:
    """Versions unique and contiguous; replay in version order equals the stored document."""
    versions = sorted(v for v, _ in records)
    assert versions == list(range(1, len(records) + 1)), "versions are not unique and contiguous"
    assert final_version == len(records), "acknowledged writes are missing from the version"
    replay: dict[str, Any] = {}
    for _, patch in sorted(records, key=lambda r: r[0]):
        replay = merge(replay, patch)
    assert replay == final, "the stored document is not the replay of acknowledged patches"


@pytest.mark.parametrize(
    "worker",
    [_threads_worker, _tasks_worker, _unpipelined_tasks_worker],
    ids=["threads", "tasks-pipelined", "tasks-unpipelined"],
)
def test_processes_lose_no_acknowledged_update(redis_url: str, namespace: str, worker) -> None:
    """4 processes x (8 threads or 50 tasks, pipelined or not) on one user pass the checker."""
    records = _run_processes(worker, redis_url, namespace)
    expected = PROCESSES * (THREADS * PER_THREAD if worker is _threads_worker else TASKS * PER_TASK)
    assert len(records) == expected
    snap = StateService(RedisBackend.from_url(redis_url, namespace=namespace)).snapshot("hot")
    check_history(records, snap.data, snap.version)


def test_the_checker_catches_naive_get_set(redis_url: str, namespace: str) -> None:
    """Negative control: GET+SET read-modify-write loses updates, and the checker says so."""
    records = _run_processes(_naive_worker, redis_url, namespace)
    client = redis.Redis.from_url(redis_url)
    stored = json.loads(client.get(f"{namespace}:naive") or b"{}")
    client.close()
    with pytest.raises(AssertionError):
        check_history(records, stored["doc"], stored["v"])
