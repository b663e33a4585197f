"""The example bots run as deployed: two polling processes each, a fake Bot API, kill -9 (issue 19).

``examples/aiogram_bot.py`` and ``examples/ptb_bot.py`` are started unchanged,
configured by the environment only (``TELEGRAM_TOKEN``, ``TELEGRAM_API_URL``,
``REDIS_URL``, ``CHATSTATE_NAMESPACE``), against a Bot API server this test
runs on loopback. The server gives each process its own update queue (the path
of its ``TELEGRAM_API_URL`` names it), so the test decides which process
``getUpdates`` hands each update to, and it answers ``sendMessage`` by
recording the reply.

First one process is killed with ``kill -9`` while it handles a user's
``/start`` that reached both processes (the server holds its reply, as if it
died before sending it): the survivor must answer that user within one lease
(5 s). Then a new process replaces the dead one, and 30 users fill the form,
each update delivered to both processes half of the time: every user gets each
reply once, in order, with the name and age they gave.

The deterministic proofs of "once" and "one at a time" are the integration
tests and ``test_ptb_processes.py``; this test runs what a user would run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

pytestmark = [pytest.mark.redis, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TOKEN = "42:TEST-TOKEN"
USERS = 30
LEASE = 5.0  # both integrations' default


class FakeBotApi:
    """Telegram's Bot API as polling bots see it, one update queue per client."""

    def __init__(self) -> None:
        self.queues: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.replies: list[dict[str, Any]] = []
        self.held: list[dict[str, Any]] = []
        self.hold_chat: int | None = None  # the first reply to this chat is never answered
        self.changed = asyncio.Condition()
        self.message_ids = itertools.count(1)
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{client}/bot{token}/{method}", self.handle)
        return app

    async def deliver(self, client: str, update: dict[str, Any]) -> None:
        async with self.changed:
            self.queues[client].append(update)
            self.changed.notify_all()

    async def wait_for_replies(self, chat: int, count: int) -> None:
        async with asyncio.timeout(60), self.changed:
            await self.changed.wait_for(
                lambda: sum(r["chat"] == chat for r in self.replies) >= count
            )

    async def handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != TOKEN:
            return web.json_response({"ok": False, "error_code": 401}, status=401)
        client, method = request.match_info["client"], request.match_info["method"]
        params: dict[str, Any] = dict(await request.post())
        if request.content_type == "application/json":
            params = await request.json()
        result: Any = True
        if method == "getMe":
            result = {"id": 42, "is_bot": True, "first_name": "Form", "username": "form_bot"}
        elif method == "getUpdates":
            result = await self._get_updates(client, params)
        elif method == "sendMessage":
            result = await self._send_message(client, params)
        return web.json_response({"ok": True, "result": result})

    async def _get_updates(self, client: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        offset = int(params.get("offset") or 0)
        timeout = min(float(params.get("timeout") or 0), 0.5)  # shorter polls: quicker stops
        async with self.changed:
            queue = self.queues[client]
            queue[:] = [u for u in queue if u["update_id"] >= offset]  # the rest is confirmed
            if not queue and timeout:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self.changed.wait_for(lambda: bool(self.queues[client]))
            return list(self.queues[client])

    async def _send_message(self, client: str, params: dict[str, Any]) -> dict[str, Any]:
        chat, text = int(params["chat_id"]), str(params["text"])
        reply = {"client": client, "chat": chat, "text": text, "at": time.monotonic()}
        async with self.changed:
            hold = chat == self.hold_chat and not self.held
            (self.held if hold else self.replies).append(reply)
            self.changed.notify_all()
        if hold:
            await self.release.wait()  # the process is killed meanwhile
        return {
            "message_id": next(self.message_ids),
            "date": int(time.time()),
            "chat": {"id": chat, "type": "private"},
            "text": text,
        }


def _update(update_id: int, user: int, text: str) -> dict[str, Any]:
    entities = [{"type": "bot_command", "offset": 0, "length": len(text)}]
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": int(time.time()),
            "chat": {"id": user, "type": "private"},
            "from": {"id": user, "is_bot": False, "first_name": f"User {user}"},
            "text": text,
            **({"entities": entities} if text.startswith("/") else {}),
        },
    }


def _replies(user: int) -> list[str]:
    return [
        "What is your name?",
        "How old are you?",
        f"Nice to meet you, User {user} ({20 + user}).",
    ]


async def _bot(example: str, api_url: str, redis_url: str, namespace: str) -> Any:
    env = {
        **os.environ,
        "TELEGRAM_TOKEN": TOKEN,
        "TELEGRAM_API_URL": api_url,
        "REDIS_URL": redis_url,
        "CHATSTATE_NAMESPACE": namespace,
    }
    env.pop("BOT_TOKEN", None)
    return await asyncio.create_subprocess_exec(
        sys.executable, str(EXAMPLES / example), env=env, stdout=asyncio.subprocess.DEVNULL
    )


async def _stop(proc: Any) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(30):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("example", ["aiogram_bot.py", "ptb_bot.py"])
def test_two_example_processes_survive_a_kill_and_answer_each_update_once(
    example: str, redis_url: str, namespace: str
) -> None:
    """The issue's run: a kill -9 mid-handler, then 30 forms, half the updates to both."""
    rng = random.Random(19)
    update_ids: Iterator[int] = itertools.count(1000)

    async def main() -> tuple[FakeBotApi, float]:
        api = FakeBotApi()
        runner = web.AppRunner(api.app(), shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        bots: dict[str, Any] = {}

        async def start(client: str) -> None:
            url = f"http://127.0.0.1:{port}/{client}"
            bots[client] = await _bot(example, url, redis_url, namespace)

        try:
            await asyncio.gather(start("a"), start("b"))
            # The kill: user 0's /start reaches both; whichever handles it first dies in it.
            api.hold_chat = 0
            first = _update(next(update_ids), 0, "/start")
            await asyncio.gather(api.deliver("a", first), api.deliver("b", first))
            async with asyncio.timeout(60), api.changed:
                await api.changed.wait_for(lambda: bool(api.held))
            victim = api.held[0]["client"]
            bots[victim].kill()  # SIGKILL
            await bots[victim].wait()
            killed = time.monotonic()
            await api.wait_for_replies(0, 1)
            answered = api.replies[-1]["at"] - killed
            await start(victim)  # a supervisor would restart it

            users = range(1, USERS + 1)
            for step in range(3):
                for user in users:
                    text = ["/start", f"User {user}", str(20 + user)][step]
                    update = _update(next(update_ids), user, text)
                    targets = ["a", "b"] if rng.random() < 0.5 else [rng.choice("ab")]
                    for client in targets:
                        await api.deliver(client, update)
                for user in users:
                    await api.wait_for_replies(user, step + 1)
        finally:
            await asyncio.gather(*(_stop(p) for p in bots.values()))
            api.release.set()
            await runner.cleanup()
        return api, answered

    api, answered = asyncio.run(main())
    assert [r["text"] for r in api.replies if r["chat"] == 0] == ["What is your name?"]
    assert answered < LEASE + 2.5, answered  # one lease, and room for a loaded machine
    for user in range(1, USERS + 1):
        assert [r["text"] for r in api.replies if r["chat"] == user] == _replies(user), user
    assert {r["client"] for r in api.replies} == {"a", "b"}  # both served users
