"""What keeping replies until they are acknowledged costs: deliver() beside handle() on Redis.

    python benchmarks/bench_deliver.py [--messages 3000]

Starts a throwaway redis-server (from PATH) on a random loopback port and routes
the messages of a small flow (every message moves it, so every handling writes
state) through the sync Router (one caller) and the
AsyncRouter (500 tasks at once, pipelined), with handle() (claim, commit) and
with deliver() (claim, the resend index entry, a commit that keeps the user,
the acknowledgement), and deliver() with resend_after=None (no index entry).
Each line is measured in this run, on the same server.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import servers
from chatstate import AsyncStateService, RedisBackend, StateService
from chatstate.flow import AsyncRouter, Flow, Menu, MenuItem, Message, Router, Step
from chatstate.state import AsyncRedisBackend


class Order(Flow):
    """Quantity, then a note; then it starts over (every message moves the flow)."""

    quantity = Step("How many?", clean=int, next="note")
    note = Step("Any note?")


MENU = Menu("M", [MenuItem("order", "Order", flow=Order)])
TEXTS = ("order", "2", "none")  # start, answer, answer: three steps, three writes of state


def _sync(url: str, n: int) -> dict[str, float]:
    svc = StateService(RedisBackend.from_url(url, namespace="bench-sync"))
    out: dict[str, float] = {}
    for label, resend, mode in [
        ("handle", 30, "handle"),
        ("deliver", 30, "deliver"),
        ("deliver, resend_after=None", None, "deliver"),
    ]:
        router = Router(svc, main_menu=MENU, resend_after=resend)
        for warm in range(100):
            router.handle(Message("warm", text="order", message_id=f"w{label}{warm}"))
        start = time.perf_counter()
        for i in range(n):
            text = TEXTS[(i // 200) % 3]
            message = Message(f"u{i % 200}", text=text, message_id=f"{label}-{i}")
            if mode == "handle":
                router.handle(message)
            else:
                with router.deliver(message) as delivery:
                    _ = delivery.replies
        out[label] = (time.perf_counter() - start) / n * 1e6
    svc.close()
    return out


async def _async(url: str, n: int) -> dict[str, float]:
    svc = AsyncStateService(AsyncRedisBackend.from_url(url, namespace="bench-async"))
    out: dict[str, float] = {}
    for label, resend, mode in [
        ("handle", 30, "handle"),
        ("deliver", 30, "deliver"),
        ("deliver, resend_after=None", None, "deliver"),
    ]:
        router = AsyncRouter(svc, main_menu=MENU, resend_after=resend)

        async def one(i: int, router: Any = router, label: str = label, mode: str = mode) -> None:
            text = TEXTS[(i // 500) % 3]
            message = Message(f"u{i % 500}", text=text, message_id=f"{label}-{i}")
            if mode == "handle":
                await router.handle(message)
            else:
                async with router.deliver(message) as delivery:
                    _ = delivery.replies

        start = time.perf_counter()
        for batch in range(0, n, 500):
            await asyncio.gather(*(one(i) for i in range(batch, min(batch + 500, n))))
        out[label] = n / (time.perf_counter() - start)
    await svc.aclose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    server = servers.start_server("redis")
    try:
        sync = _sync(server.url, args.messages)
        base = sync["handle"]
        for label, us in sync.items():
            print(f"sync Router, 1 caller, {label}: {us:.0f} us/message ({us / base:.2f}x)")
        pipelined = asyncio.run(_async(server.url, args.messages * 2))
        base = pipelined["handle"]
        for label, rate in pipelined.items():
            print(f"AsyncRouter, 500 at once, {label}: {rate:,.0f}/s ({rate / base:.2f}x)")
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
