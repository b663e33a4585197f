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
(5 s). For aiogram, two more users' updates are killed so after the handler
changed state: the name (``update_data`` and ``set_state`` done, then killed
while replying) and the age (``update_data`` and ``clear`` done): nothing of
the killed handler may land, so the survivor's run of the same update answers
as if the first never ran. Each time a new process replaces the dead one. Then
30 users fill the form, each update delivered to both processes half of the
time: every user gets each reply once, in order, with the name and age they
gave (0 duplicate, 0 lost, 0 wrong, counted and asserted).

The deterministic proofs of "once" and "one at a time" are the integration
tests and ``test_ptb_processes.py``; this test runs what a user would run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
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
log = logging.getLogger(__name__)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TOKEN = "42:TEST-TOKEN"
USERS = 30
LEASE = 5.0  # both integrations' default


class FakeBotApi:
    """Telegram's Bot API as polling bots see it, one update queue per client."""

    def __init__(self) -> None:
        self.queues: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.replies: list[dict[str, Any]] = []
        self.held: list[dict[str, Any]] = []
        self.hold_next: int | None = None  # the next reply to this chat is never answered
        self.changed = asyncio.Condition()
        self.message_ids = itertools.count(1)
        self.release = asyncio.Event()
        self.polls: defaultdict[str, int] = defaultdict(int)  # getUpdates calls per client

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{client}/bot{token}/{method}", self.handle)
        return app

    async def deliver(self, client: str, update: dict[str, Any]) -> None:
        async with self.changed:
            self.queues[client].append(update)
            self.changed.notify_all()

    async def wait_for_replies(self, chat: int, count: int, within: float = 60) -> None:
        async with asyncio.timeout(within), self.changed:
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
            self.polls[client] += 1
            self.changed.notify_all()
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
            hold = chat == self.hold_next
            if hold:
                self.hold_next = None
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


def _count(api: FakeBotApi, users: list[int]) -> dict[str, int]:
    """Duplicate and lost replies and users whose transcript is not the expected one."""
    counts = {"updates": 0, "duplicate": 0, "lost": 0, "wrong": 0}
    for user in users:
        got = [r["text"] for r in api.replies if r["chat"] == user]
        want = _replies(user) if user else _replies(user)[:1]
        counts["updates"] += len(want)
        counts["duplicate"] += sum(max(0, got.count(t) - want.count(t)) for t in set(got))
        counts["lost"] += sum(max(0, want.count(t) - got.count(t)) for t in set(want))
        counts["wrong"] += got != want
    return counts


class _Run:
    """Two bot processes of one example against one fake Bot API, and the kills."""

    def __init__(self, example: str, redis_url: str, namespace: str) -> None:
        self.example, self.redis_url, self.namespace = example, redis_url, namespace
        self.api = FakeBotApi()
        self.bots: dict[str, Any] = {}
        self.answered: list[float] = []  # seconds from a kill to the survivor's reply
        self.update_ids: Iterator[int] = itertools.count(1000)
        self.port = 0

    async def start(self, client: str) -> None:
        """Start a bot process as ``client``; return once it polls (its start-up is not timed)."""
        url = f"http://127.0.0.1:{self.port}/{client}"
        api, polled = self.api, self.api.polls[client]
        self.bots[client] = await _bot(self.example, url, self.redis_url, self.namespace)
        async with asyncio.timeout(60), api.changed:
            await api.changed.wait_for(lambda: api.polls[client] > polled)

    async def send(self, user: int, step: int, clients: str) -> None:
        text = ["/start", f"User {user}", str(20 + user)][step]
        update = _update(next(self.update_ids), user, text)
        for client in clients:
            await self.api.deliver(client, update)

    async def kill_in(self, user: int, step: int) -> bool:
        """Deliver the user's step to both; kill whichever replies first, mid-reply; restart it.

        Returns:
            Whether the survivor answered (within a lease and then some).
        """
        api = self.api
        api.hold_next = user
        held = len(api.held)
        await self.send(user, step, "ab")
        async with asyncio.timeout(60), api.changed:
            await api.changed.wait_for(lambda: len(api.held) > held)
        victim = api.held[-1]["client"]
        self.bots[victim].kill()  # SIGKILL
        await self.bots[victim].wait()
        killed = time.monotonic()
        try:
            await api.wait_for_replies(user, step + 1, within=LEASE + 15)
        except TimeoutError:  # lost: counted below, the form goes no further
            await self.start(victim)
            return False
        self.answered.append(max(r["at"] for r in api.replies if r["chat"] == user) - killed)
        await self.start(victim)  # a supervisor would restart it
        return True

    async def form(self, user: int, kill_at: int, rng: random.Random) -> None:
        """One user's three steps, one after the other, the process handling ``kill_at`` killed."""
        for step in range(3):
            if step == kill_at:
                if not await self.kill_in(user, step):
                    return
            else:
                await self.send(user, step, rng.choice(["a", "b", "ab"]))
                try:
                    await self.api.wait_for_replies(user, step + 1, within=LEASE + 15)
                except TimeoutError:  # lost: counted below
                    return


@pytest.mark.parametrize("example", ["aiogram_bot.py", "ptb_bot.py"])
def test_two_example_processes_survive_a_kill_and_answer_each_update_once(
    example: str, redis_url: str, namespace: str
) -> None:
    """The issue's run: kill -9s mid-handler (aiogram: also after state changed), then 30 forms."""
    rng = random.Random(19)
    # aiogram: users killed after the handler changed state (at the name, at the age)
    killed_later = {91: 1, 92: 2} if example == "aiogram_bot.py" else {}
    run = _Run(example, redis_url, namespace)

    async def main() -> None:
        runner = web.AppRunner(run.api.app(), shutdown_timeout=1.0, handler_cancellation=True)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        run.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            await asyncio.gather(run.start("a"), run.start("b"))
            await run.kill_in(0, 0)  # user 0's /start reaches both; the first to reply dies
            for user, kill_at in killed_later.items():
                await run.form(user, kill_at, rng)
            users = range(1, USERS + 1)
            for step in range(3):
                for user in users:
                    await run.send(user, step, "ab" if rng.random() < 0.5 else rng.choice("ab"))
                for user in users:
                    await run.api.wait_for_replies(user, step + 1)
        finally:
            await asyncio.gather(*(_stop(p) for p in run.bots.values()))
            run.api.release.set()
            await runner.cleanup()

    asyncio.run(main())
    api = run.api
    killed = [0, *killed_later]
    counts = _count(api, killed)
    log.info("%s, kill -9 mid-handler, its in-flight reply dropped: %s", example, counts)
    assert counts == {**counts, "duplicate": 0, "lost": 0, "wrong": 0}, counts
    assert len(api.held) == len(killed)
    for after in run.answered:
        assert after < LEASE + 2.5, run.answered  # one lease, and room for a loaded machine
    counts = _count(api, list(range(1, USERS + 1)))
    log.info("%s, %d users, half the updates to both processes: %s", example, USERS, counts)
    assert counts == {**counts, "duplicate": 0, "lost": 0, "wrong": 0}, counts
    assert {r["client"] for r in api.replies} == {"a", "b"}  # both served users
