"""One worker process of the chaos harness: ``python -m chaos.worker URL NAMESPACE WORKER LEASE``.

It reads JSON lines on stdin (``{"op": "msg", ...}``: a delivery to handle,
``{"op": "bank", ...}``: the bank's answer to one of its calls) and writes the
history on stdout, one JSON line per event, each with the worker's name ``w``
and the time ``t`` (``time.monotonic()``, one clock for every process of the
machine): ``ready``; ``recv`` (a delivery arrived); ``bank`` (a bank call);
``handled`` (the message was handled and committed, or found stored:
``resent``, ``n`` replies); ``send`` (one reply given to the platform: the
fake platform is this line); ``ack`` (acknowledged); ``fail`` (an error left
the delivery unacknowledged); ``crash`` (an injected fault: the process dies
with ``os._exit(137)`` right after writing it).

Deliveries are handled concurrently, as a web server would. Each is handled
with ``router.deliver`` when the router has it; until then (and with
``--shim``) with ``router.handle``, no acknowledgement, and so replies lost
when the worker dies between the commit and the send.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import contextvars
import itertools
import json
import os
import sys
import time
from typing import Any

from chaos.bot import Wallet, build_router
from chatstate import AsyncStateService
from chatstate.flow import Message, render_text
from chatstate.state import AsyncRedisBackend

FAULT: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "fault", default=None
)
"""The current delivery's ``(delivery id, fault point)``, if it is told to die."""

DELIVERY: contextvars.ContextVar[str] = contextvars.ContextVar("delivery", default="")
"""The current delivery's id (bank calls carry it)."""

POINTS = ("before_commit", "after_commit", "mid_send", "after_send", "send_error")
"""Where a delivery may be told to fail: die before the commit (in the bot's first callable,
after its bank call), after the commit, after its first reply, after its last reply (before
the acknowledgement), or raise from the platform's send after the first reply."""


class SendError(Exception):
    """The fake platform refused a send (an injected fault)."""


class Worker:
    """Handles deliveries from stdin, writes the history to stdout."""

    def __init__(self, name: str, shim: bool) -> None:
        self.name = name
        self.shim = shim
        self.rids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[bool]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.router: Any = None

    def emit(self, ev: str, **fields: Any) -> None:
        """Write one history line (a single ``write``, so a crash never cuts one)."""
        line = json.dumps({"ev": ev, "w": self.name, "t": time.monotonic(), **fields})
        data = (line + "\n").encode()
        while data:
            data = data[os.write(1, data) :]

    def die(self, delivery: str, point: str) -> None:
        """Record the injected crash, then die as a SIGKILL would (no cleanup at all)."""
        self.emit("crash", d=delivery, point=point)
        os._exit(137)

    async def fault(self, point: str) -> None:
        """The bot's fault hook: die here if this delivery was told to."""
        told = FAULT.get()
        if told is not None and told[1] == point:
            self.die(told[0], point)

    async def bank(self, key: str, kind: str, user: str, amount: int, to: str | None) -> None:
        """Ask the dispatcher's bank to move money; raise if it answers with a failure."""
        rid = next(self.rids)
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.pending[rid] = future
        self.emit(
            "bank", rid=rid, d=DELIVERY.get(), key=key, kind=kind, user=user, amount=amount, to=to
        )
        try:
            ok = await asyncio.wait_for(future, 10.0)
        finally:
            self.pending.pop(rid, None)
        if not ok:
            raise TimeoutError("the bank timed out (after applying the movement)")

    async def handle(self, d: str, message: Message, point: str | None) -> None:
        """Handle one delivery: the message, its replies sent, then the acknowledgement."""
        DELIVERY.set(d)
        FAULT.set((d, point) if point else None)
        self.emit("recv", d=d)
        try:
            if self.shim:
                replies = await self.router.handle(message)
                self.emit("handled", d=d, resent=False, n=len(replies))
                await self.send_all(d, replies, point)
            else:
                async with self.router.deliver(message) as delivery:
                    self.emit("handled", d=d, resent=bool(delivery.resent), n=len(delivery.replies))
                    await self.send_all(d, delivery.replies, point)
        except Exception as exc:
            self.emit("fail", d=d, error=type(exc).__name__, detail=str(exc)[:200])
            return
        self.emit("ack", d=d)

    async def send_all(self, d: str, replies: list[Any], point: str | None) -> None:
        """Give each reply to the platform (a history line), with the injected faults."""
        if point == "after_commit":
            self.die(d, point)
        for i, screen in enumerate(replies):
            self.emit("send", d=d, i=i, text=render_text(screen))
            if i == 0 and point == "mid_send":
                self.die(d, point)
            if i == 0 and point == "send_error":
                raise SendError("the platform refused the send")
        if point == "after_send":
            self.die(d, point)

    def on_line(self, line: bytes) -> None:
        """One line from the dispatcher."""
        order = json.loads(line)
        if order["op"] == "bank":
            future = self.pending.get(order["rid"])
            if future is not None and not future.done():
                future.set_result(bool(order["ok"]))
            return
        message = Message(
            order["user"], order["text"], message_id=order["mid"], timestamp=order["ts"]
        )
        task = asyncio.create_task(self.handle(order["d"], message, order.get("fault")))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


async def main(argv: list[str]) -> None:
    """Serve deliveries until stdin closes."""
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("namespace")
    parser.add_argument("name")
    parser.add_argument("lease", type=float)
    parser.add_argument("--shim", action="store_true")
    args = parser.parse_args(argv)
    service = AsyncStateService(AsyncRedisBackend.from_url(args.url, namespace=args.namespace))
    worker = Worker(args.name, shim=args.shim)
    wallet = Wallet(worker.bank, worker.fault)
    worker.router = build_router(service, wallet, lease=args.lease)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker.emit("ready", pid=os.getpid(), shim=worker.shim)
    while line := await reader.readline():
        worker.on_line(line)
    if worker.tasks:
        await asyncio.wait(list(worker.tasks), timeout=30)
    with contextlib.suppress(Exception):
        await service.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
