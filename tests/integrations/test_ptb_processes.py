"""Two real python-telegram-bot processes serving one bot over one Redis (issue 19).

Each worker is a ``ChatstateApplication`` in a process of its own, fed raw
Telegram updates (JSON lines on its stdin, as many at once as the test sends);
its bot's requests are answered inside the process, which reports on stdout
each handler it ran, each message it sent and each update it finished. The
test plays Telegram: users fill a name/age form, half of the updates reach both
processes, some copies arrive late (after the user's next answer), and one
process is killed with ``kill -9`` in the middle of a handler.

What must hold: every update's handler runs once, every user gets each reply
once and in order, the stored form is right, and after the kill the survivor
handles the killed process's update within one lease (5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from chatstate import AsyncRedisBackend, AsyncStateService

pytestmark = pytest.mark.redis

USERS = 30
ROUNDS = ("/start", "name", "age")
LEASE = 5.0  # ChatstateApplication's default

WORKER = textwrap.dedent(
    """
    import asyncio, enum, itertools, json, os, signal, sys, time
    from telegram import Update
    from telegram.ext import (
        ApplicationBuilder, CommandHandler, ConversationHandler, MessageHandler, filters,
    )
    from telegram.request import BaseRequest
    from chatstate import AsyncClaim, AsyncRedisBackend, AsyncStateService
    from chatstate.integrations.telegram import ChatstateApplication, ChatstatePersistence

    # mode: "-" runs normally; the others concern user 7's name update:
    # "hang" hangs in its handler, "half" hangs there after changing user_data,
    # "die-in-send" is killed (SIGKILL, by itself) while its reply is being sent,
    # "die-before-commit" once its conversation state is written, before its commit.
    url, namespace, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    hang = mode == "hang"
    DOOMED = 7
    dying = False


    def die():
        emit(dying=os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)


    if mode == "die-before-commit":
        commit = AsyncClaim.commit

        async def commit_or_die(self, **kwargs):
            if dying and self.user_id == f"ptb:user:{DOOMED}":
                die()
            return await commit(self, **kwargs)

        AsyncClaim.commit = commit_or_die


    def emit(**event):
        print(json.dumps(event), flush=True)


    class Form(enum.IntEnum):  # the states as the issue's example had them
        NAME = 0
        AGE = 1


    class LocalRequests(BaseRequest):
        ids = itertools.count(1)

        @property
        def read_timeout(self):
            return None

        async def initialize(self):
            pass

        async def shutdown(self):
            pass

        async def do_request(self, url, method, request_data=None, *args, **kwargs):
            endpoint = url.rsplit("/", 1)[-1]
            params = dict(request_data.parameters) if request_data else {}
            result = True
            if endpoint == "getMe":
                result = {"id": 42, "is_bot": True, "first_name": "Form", "username": "form_bot"}
            elif endpoint == "sendMessage":
                chat = int(params["chat_id"])
                if dying and mode == "die-in-send":
                    die()  # the reply never confirmed: as if lost on the way
                emit(sent=params["text"], chat=chat)
                result = {
                    "message_id": next(self.ids), "date": int(time.time()),
                    "chat": {"id": chat, "type": "private"}, "text": params["text"],
                }
            return 200, json.dumps({"ok": True, "result": result}).encode()


    async def start(update, context):
        emit(ran="start", update=update.update_id, user=update.effective_user.id)
        context.user_data.pop("name", None)
        await update.message.reply_text("What is your name?")
        return Form.NAME


    async def got_name(update, context):
        global dying
        emit(ran="name", update=update.update_id, user=update.effective_user.id)
        if hang:
            await asyncio.sleep(3600)  # killed in here
        context.user_data["name"] = update.message.text
        if update.effective_user.id == DOOMED:
            dying = mode.startswith("die")
            if mode == "half":
                emit(half=update.update_id)
                await asyncio.sleep(3600)  # killed in here, its change to user_data made
        await update.message.reply_text("How old are you?")
        return Form.AGE


    async def got_age(update, context):
        emit(ran="age", update=update.update_id, user=update.effective_user.id)
        context.user_data["age"] = int(update.message.text)
        name = context.user_data["name"]
        await update.message.reply_text(f"Nice to meet you, {name} ({update.message.text}).")
        return ConversationHandler.END


    async def on_error(update, context):
        emit(error=repr(context.error))


    async def main():
        service = AsyncStateService(AsyncRedisBackend.from_url(url, namespace=namespace))
        app = (
            ApplicationBuilder()
            .token("42:TEST-TOKEN")
            .request(LocalRequests())
            .get_updates_request(LocalRequests())
            .updater(None)
            .persistence(ChatstatePersistence(service, close_service=True))
            .application_class(ChatstateApplication)
            .build()
        )
        text = filters.TEXT & ~filters.COMMAND
        app.add_handler(ConversationHandler(
            entry_points=[CommandHandler("start", start)],
            states={
                Form.NAME: [MessageHandler(text, got_name)],
                Form.AGE: [MessageHandler(text, got_age)],
            },
            fallbacks=[], name="form", persistent=True,
        ))
        app.add_error_handler(on_error)
        loop = asyncio.get_running_loop()
        running = set()

        async def handle(data):
            await app.process_update(Update.de_json(data, app.bot))
            emit(done=data["update_id"])

        async with app:
            emit(ready=os.getpid())
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                task = asyncio.create_task(handle(json.loads(line)))
                running.add(task)
                task.add_done_callback(running.discard)
            await asyncio.gather(*running)


    asyncio.run(main())
    """
)


class Worker:
    """One bot process: what it reported, and a way to hand it updates."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Condition()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls, name: str, url: str, namespace: str, *, hang: bool = False, mode: str = "-"
    ) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            WORKER,
            url,
            namespace,
            "hang" if hang else mode,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(name, proc)
        await worker.wait_for(lambda e: "ready" in e)
        return worker

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            event = json.loads(line)
            event["at"] = time.monotonic()
            event["worker"] = self.name
            async with self.changed:
                self.events.append(event)
                self.changed.notify_all()

    def deliver(self, update: dict[str, Any]) -> None:
        """Give the process an update, as Telegram's delivery to it would."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(update).encode() + b"\n")

    async def wait_for(self, match: Callable[[dict[str, Any]], bool], count: int = 1) -> None:
        """Wait until ``count`` reported events match (a hang fails after 60 s)."""
        async with asyncio.timeout(60), self.changed:
            await self.changed.wait_for(lambda: sum(map(match, self.events)) >= count)

    def done(self, update_id: int) -> bool:
        return any(e.get("done") == update_id for e in self.events)

    async def stop(self) -> None:
        """Close its input: it finishes what it has and exits (or kill it, if already dead)."""
        assert self.proc.stdin is not None
        if self.proc.returncode is None:
            self.proc.stdin.close()
            async with asyncio.timeout(60):
                await self.proc.wait()
        await self.reader


def _text(update_id: int, user: int, text: str) -> dict[str, Any]:
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


def _answer(step: str, user: int) -> str:
    return {"/start": "/start", "name": f"User {user}", "age": str(20 + user)}[step]


def _expected_replies(user: int) -> list[str]:
    return [
        "What is your name?",
        "How old are you?",
        f"Nice to meet you, User {user} ({20 + user}).",
    ]


async def _stored_users(url: str, namespace: str, users: range) -> dict[int, Any]:
    svc = AsyncStateService(AsyncRedisBackend.from_url(url, namespace=namespace))
    try:
        return {u: await svc.get(f"ptb:user:{u}") for u in users}
    finally:
        await svc.aclose()


def test_thirty_users_on_two_processes_get_each_reply_once(redis_url: str, namespace: str) -> None:
    """30 forms on two processes, half the updates to both, some copies late: all run once."""
    rng = random.Random(19)
    users = range(1, USERS + 1)

    async def main() -> tuple[list[dict[str, Any]], Counter[str]]:
        a, b = await asyncio.gather(
            Worker.start("a", redis_url, namespace), Worker.start("b", redis_url, namespace)
        )
        workers = (a, b)
        update_ids = iter(range(1000, 10_000))
        late: list[tuple[Worker, dict[str, Any]]] = []
        kinds: Counter[str] = Counter()
        try:
            for step in ROUNDS:
                pending = late
                late = []
                for user in users:
                    update = _text(next(update_ids), user, _answer(step, user))
                    roll = rng.random()
                    if roll < 0.5:
                        targets, kind = workers, "both at once"
                    else:
                        targets, kind = (rng.choice(workers),), "one"
                        if roll < 0.7:  # its copy reaches the other after the next answer
                            other = b if targets[0] is a else a
                            late.append((other, update))
                            kind = "one, then a late copy"
                    kinds[kind] += 1
                    pending += [(w, update) for w in targets]
                for worker, update in pending:
                    worker.deliver(update)
                for worker, update in pending:
                    await worker.wait_for(lambda e, u=update["update_id"]: e.get("done") == u)
            for worker, update in late:  # the last round's late copies
                worker.deliver(update)
                await worker.wait_for(lambda e, u=update["update_id"]: e.get("done") == u)
        finally:
            await asyncio.gather(*(w.stop() for w in workers))
        return sorted(a.events + b.events, key=lambda e: e["at"]), kinds

    events, kinds = asyncio.run(main())
    assert not [e for e in events if "error" in e]
    runs = Counter((e["user"], e["ran"]) for e in events if "ran" in e)
    assert runs == {(u, step): 1 for u in users for step in ("start", "name", "age")}
    for user in users:
        replies = [e["sent"] for e in events if e.get("chat") == user]
        assert replies == _expected_replies(user), (user, replies)
    stored = asyncio.run(_stored_users(redis_url, namespace, users))
    assert stored == {u: {"name": f"User {u}", "age": 20 + u} for u in users}
    assert kinds["both at once"] > 20
    assert kinds["one, then a late copy"] > 10


def test_a_process_killed_mid_handler_leaves_the_update_to_the_other(
    redis_url: str, namespace: str
) -> None:
    """A kill -9 of the process running a handler: its copy elsewhere runs within one lease.

    Process a hangs inside the name handler, holding the update's claim and the
    user's lock; the same update reaches b, which waits. a is killed: b handles
    the update once a's lease lapses (5 s, not the 60 s of before), and the
    user's next answer right after it.
    """
    user = 7

    async def main() -> tuple[list[dict[str, Any]], float, float]:
        a, b = await asyncio.gather(
            Worker.start("a", redis_url, namespace, hang=True),
            Worker.start("b", redis_url, namespace),
        )
        try:
            start, name, age = (
                _text(100 + i, user, _answer(s, user)) for i, s in enumerate(ROUNDS)
            )
            a.deliver(start)
            await a.wait_for(lambda e: e.get("done") == start["update_id"])
            a.deliver(name)
            await a.wait_for(lambda e: e.get("ran") == "name")
            b.deliver(name)  # a copy, while a's handler runs: it must wait
            await asyncio.sleep(0.5)
            assert not b.done(name["update_id"])
            os.kill(a.proc.pid, signal.SIGKILL)
            await a.proc.wait()
            killed = time.monotonic()
            await b.wait_for(lambda e: e.get("done") == name["update_id"])
            handled = time.monotonic() - killed
            b.deliver(age)
            await b.wait_for(lambda e: e.get("done") == age["update_id"])
            answered = time.monotonic() - killed
        finally:
            with contextlib.suppress(ProcessLookupError):
                a.proc.kill()
            await asyncio.gather(a.stop(), b.stop())
        return sorted(a.events + b.events, key=lambda e: e["at"]), handled, answered

    events, handled, answered = asyncio.run(main())
    assert not [e for e in events if "error" in e]
    assert [e["sent"] for e in events if "sent" in e] == _expected_replies(user)
    ran = [(e["worker"], e["ran"]) for e in events if "ran" in e]
    assert ran == [("a", "start"), ("a", "name"), ("b", "name"), ("b", "age")]
    assert handled < LEASE + 2.5, handled  # one lease, and room for a loaded machine
    assert answered < LEASE + 2.5, answered
    stored = asyncio.run(_stored_users(redis_url, namespace, range(user, user + 1)))
    assert stored == {user: {"name": f"User {user}", "age": 20 + user}}


async def _stored(url: str, namespace: str, user: int) -> tuple[Any, Any]:
    """The user's data and the form conversation's document for the user, as stored."""
    svc = AsyncStateService(AsyncRedisBackend.from_url(url, namespace=namespace))
    try:
        return (
            await svc.get(f"ptb:user:{user}"),
            await svc.get(f"ptb:conversation:form:%5B{user},{user}%5D"),
        )
    finally:
        await svc.aclose()


def _crash_and_take_over(url: str, namespace: str, mode: str) -> tuple[list[dict[str, Any]], Any]:
    """User 7's name update crashes process a (``mode``); its copy and the age go to b.

    Meanwhile user 8 is served by a too, so a writes for others while 7's update is
    in flight. Returns every event, and what the store held right after the crash.
    """
    user, other = 7, 8

    async def main() -> tuple[list[dict[str, Any]], Any]:
        a, b = await asyncio.gather(
            Worker.start("a", url, namespace, mode=mode), Worker.start("b", url, namespace)
        )
        try:
            start, name, age = (
                _text(200 + i, user, _answer(s, user)) for i, s in enumerate(ROUNDS)
            )
            other_start = _text(300, other, "/start")
            a.deliver(start)
            await a.wait_for(lambda e: e.get("done") == start["update_id"])
            a.deliver(name)
            if mode == "half":
                await a.wait_for(lambda e: e.get("half") == name["update_id"])
                a.deliver(other_start)  # handled and written while 7's handler hangs
                await a.wait_for(lambda e: e.get("done") == other_start["update_id"])
                os.kill(a.proc.pid, signal.SIGKILL)
            await a.proc.wait()  # killed by the test, or by itself
            after_crash = await _stored(url, namespace, user)
            b.deliver(name)  # the redelivery of the update a did not finish
            await b.wait_for(lambda e: e.get("done") == name["update_id"])
            b.deliver(age)
            await b.wait_for(lambda e: e.get("done") == age["update_id"])
        finally:
            with contextlib.suppress(ProcessLookupError):
                a.proc.kill()
            await asyncio.gather(a.stop(), b.stop())
        return sorted(a.events + b.events, key=lambda e: e["at"]), after_crash

    return asyncio.run(main())


def test_a_killed_handlers_half_done_change_never_lands(redis_url: str, namespace: str) -> None:
    """A kill -9 of a handler that changed user_data while the process wrote others' data.

    Nothing of the killed update is stored (its user's data and conversation are
    as the previous update left them); the redelivery runs it once from there, and
    every reply is sent once.
    """
    events, (data, conversation) = _crash_and_take_over(redis_url, namespace, "half")
    assert not [e for e in events if "error" in e]
    assert data == {}
    assert conversation.get("state") == 0  # Form.NAME, as /start left it
    assert [e["sent"] for e in events if e.get("chat") == 7] == _expected_replies(7)
    assert [e["sent"] for e in events if e.get("chat") == 8] == ["What is your name?"]
    assert asyncio.run(_stored(redis_url, namespace, 7))[0] == {"name": "User 7", "age": 27}


def test_replies_not_confirmed_before_a_crash_are_sent_by_the_redelivery(
    redis_url: str, namespace: str
) -> None:
    """A process killed while its reply is on the way: nothing is stored, the copy replies once."""
    events, (data, conversation) = _crash_and_take_over(redis_url, namespace, "die-in-send")
    assert not [e for e in events if "error" in e]
    assert [e["worker"] for e in events if "dying" in e] == ["a"]
    assert data == {}
    assert conversation.get("state") == 0
    assert [e["sent"] for e in events if e.get("chat") == 7] == _expected_replies(7)
    assert [(e["worker"], e["ran"]) for e in events if "ran" in e] == [
        ("a", "start"),
        ("a", "name"),
        ("b", "name"),
        ("b", "age"),
    ]


def test_a_crash_between_an_updates_writes_and_its_commit(redis_url: str, namespace: str) -> None:
    """Killed after writing the conversation state, before the commit: the copy runs from before.

    The redelivery finds the state marked as its own update's and runs the name
    handler again, not the age handler with the name as the age. Its reply, sent
    and confirmed before the crash, is sent again (replies are at least once in
    this window).
    """
    events, (data, conversation) = _crash_and_take_over(redis_url, namespace, "die-before-commit")
    assert not [e for e in events if "error" in e]
    assert [e["worker"] for e in events if "dying" in e] == ["a"]
    assert data == {}  # the user's data is written with the commit: not at all
    assert conversation["state"] == 1  # Form.AGE: written ...
    assert conversation["before"] == 0  # ... marked as the name update's, from Form.NAME
    ran = [(e["worker"], e["ran"]) for e in events if "ran" in e]
    assert ran == [("a", "start"), ("a", "name"), ("b", "name"), ("b", "age")]
    replies = [e["sent"] for e in events if e.get("chat") == 7]
    assert replies == [
        "What is your name?",
        "How old are you?",
        "How old are you?",
        "Nice to meet you, User 7 (27).",
    ]
    assert asyncio.run(_stored(redis_url, namespace, 7))[0] == {"name": "User 7", "age": 27}
