"""python-telegram-bot on chatstate against PTB on its own persistence: the same form bot, one run.

    python benchmarks/bench_ptb.py [--users 200] [--rounds 3] [--duplicates 0.1]

The measurement of ``bench_aiogram.py`` for python-telegram-bot 22. A 6-message
form bot (``/start``, name, age, city, email, ``yes``: a persistent
``ConversationHandler`` whose every step writes ``user_data`` and moves the
state; the last reads the data and clears it) is fed through
``Application.process_update`` with a Bot whose requests are answered and
recorded locally (no network). ``--users`` users at once, each sending its six
messages one after the other. Setups:

- PTB ``PicklePersistence`` as it comes: everything in memory, the file written
  every ``update_interval`` (60 s) and at shutdown. PTB has no Redis
  persistence of its own, and ``DictPersistence`` is the same in-memory model
  that also re-serializes JSON strings: the pickle file is what PTB users run,
  so it is the baseline (a crash loses up to 60 s, two processes overwrite
  each other, nothing is deduplicated);
- the same file written after each update (``update_persistence()``, as
  ``ChatstateApplication`` writes; what it takes for a crash to lose nothing,
  still one process and no dedupe);
- ``ChatstatePersistence`` on Redis with a plain ``Application`` (shared,
  durable data; no dedupe, no per-user order; written every 60 s as PTB does);
- ``ChatstateApplication`` + ``ChatstatePersistence`` on Redis: each update
  handled once, one user's updates one at a time, across processes, and what
  it changed written before the next (the setup the docs recommend).

The setups take turns over ``--rounds`` rounds (fresh users each round); msgs/s
is the median of the rounds, the ratio the median of the per-round ratios
against the pickle file. Redis commands and server time per message are
``INFO commandstats`` deltas (commands run by scripts included). A throwaway
redis-server (from PATH) is started on a random loopback port.

Then a pass with ``--duplicates`` of the updates delivered twice at once:
updates answered twice and users whose replies or data came out wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import enum
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import redis
from telegram import Update
from telegram.ext import (
    Application,
    ApplicationBuilder,
    BasePersistence,
    CommandHandler,
    ContextTypes,
    ConversationHandler,
    MessageHandler,
    PicklePersistence,
    filters,
)
from telegram.request import BaseRequest, RequestData

import servers
from chatstate import AsyncRedisBackend, AsyncStateService
from chatstate.integrations.telegram import ChatstateApplication, ChatstatePersistence

TOKEN = "42:BENCH-TOKEN"  # noqa: S105 - a fake bot token; nothing is sent
PICKLE = "PTB PicklePersistence (as it comes)"
DURABLE = "PTB PicklePersistence, written after each update"
PLAIN = "chatstate persistence, plain Application"
OURS = "ChatstateApplication + chatstate persistence"
SETUPS = (PICKLE, DURABLE, PLAIN, OURS)
REDIS_SETUPS = (PLAIN, OURS)
STEPS = 6
_update: contextvars.ContextVar[int] = contextvars.ContextVar("bench_update", default=0)


class Form(enum.IntEnum):
    NAME = 0
    AGE = 1
    CITY = 2
    EMAIL = 3
    CONFIRM = 4


async def start(update: Update, _context: ContextTypes.DEFAULT_TYPE) -> Form:
    await update.effective_message.reply_text("What is your name?")
    return Form.NAME


def step(field: str, nxt: Form, ask: str) -> Callable[..., Any]:
    async def handler(update: Update, context: ContextTypes.DEFAULT_TYPE) -> Form:
        context.user_data[field] = update.effective_message.text
        await update.effective_message.reply_text(ask)
        return nxt

    return handler


async def confirm(update: Update, context: ContextTypes.DEFAULT_TYPE) -> int:
    data = dict(context.user_data)
    context.user_data.clear()
    await update.effective_message.reply_text(
        f"Saved {data.get('name')}, {data.get('age')}, {data.get('city')}."
    )
    return ConversationHandler.END


def form_handler() -> ConversationHandler:
    text = filters.TEXT & ~filters.COMMAND
    return ConversationHandler(
        entry_points=[CommandHandler("start", start)],
        states={
            Form.NAME: [MessageHandler(text, step("name", Form.AGE, "How old are you?"))],
            Form.AGE: [MessageHandler(text, step("age", Form.CITY, "Where do you live?"))],
            Form.CITY: [MessageHandler(text, step("city", Form.EMAIL, "Your email?"))],
            Form.EMAIL: [MessageHandler(text, step("email", Form.CONFIRM, "Is that right?"))],
            Form.CONFIRM: [MessageHandler(text, confirm)],
        },
        fallbacks=[],
        name="form",
        persistent=True,
    )


def transcript(user: int) -> list[str]:
    return [
        "What is your name?",
        "How old are you?",
        "Where do you live?",
        "Your email?",
        "Is that right?",
        f"Saved Name{user}, {20 + user % 60}, City{user}.",
    ]


def texts(user: int) -> list[str]:
    return ["/start", f"Name{user}", str(20 + user % 60), f"City{user}", f"u{user}@x", "yes"]


class RecordingRequest(BaseRequest):
    """Answers every Bot API call locally and records replies with the update they answer."""

    def __init__(self) -> None:
        self.replies: list[tuple[int, int, str]] = []  # (chat, update id, text)
        self._ids = itertools.count(1)

    @property
    def read_timeout(self) -> float | None:
        return None

    async def initialize(self) -> None:
        pass

    async def shutdown(self) -> None:
        pass

    async def do_request(
        self,
        url: str,
        method: str,  # noqa: ARG002
        request_data: RequestData | None = None,
        *_args: Any,
        **_kwargs: Any,
    ) -> tuple[int, bytes]:
        endpoint = url.rsplit("/", 1)[-1]
        params = dict(request_data.parameters) if request_data else {}
        result: Any = True
        if endpoint == "getMe":
            result = {"id": 42, "is_bot": True, "first_name": "Form", "username": "form_bot"}
        elif endpoint == "sendMessage":
            chat = int(params["chat_id"])
            self.replies.append((chat, _update.get(), params["text"]))
            result = {
                "message_id": next(self._ids),
                "date": 0,
                "chat": {"id": chat, "type": "private"},
                "text": params["text"],
            }
        return 200, json.dumps({"ok": True, "result": result}).encode()


class WrittenEachUpdate(Application[Any, Any, Any, Any, Any, Any]):
    """PTB's Application, its persistence updated after each update (not every 60 s)."""

    async def process_update(self, update: object) -> None:
        await super().process_update(update)
        await self.update_persistence()


def payload(update_id: int, user: int, text: str) -> dict[str, Any]:
    entities = [{"type": "bot_command", "offset": 0, "length": len(text)}]
    return {
        "update_id": update_id,
        "message": {
            "message_id": update_id,
            "date": 0,
            "chat": {"id": user, "type": "private"},
            "from": {"id": user, "is_bot": False, "first_name": f"U{user}"},
            "text": text,
            **({"entities": entities} if text.startswith("/") else {}),
        },
    }


def build(
    setup: str, url: str, prefix: str, directory: Path
) -> tuple[Application, RecordingRequest]:
    """An Application of ``setup``, its persistence on the server at ``url`` or in ``directory``."""
    persistence: BasePersistence[Any, Any, Any]
    if setup in {PICKLE, DURABLE}:
        persistence = PicklePersistence(directory / f"{prefix}.pickle")
    else:
        persistence = ChatstatePersistence(
            AsyncStateService(AsyncRedisBackend.from_url(url, namespace=prefix)),
            close_service=True,
        )
    request = RecordingRequest()
    app = (
        ApplicationBuilder()
        .token(TOKEN)
        .request(request)
        .get_updates_request(RecordingRequest())
        .updater(None)
        .persistence(persistence)
        .application_class(
            {OURS: ChatstateApplication, DURABLE: WrittenEachUpdate}.get(setup, Application)
        )
        .build()
    )
    app.add_handler(form_handler())
    return app, request


async def run(
    setup: str,
    url: str,
    users: range,
    directory: Path,
    *,
    ids: itertools.count[int],
    duplicates: float,
    seed: int,
) -> tuple[float, RecordingRequest]:
    """Feed every user's six messages (users at once); return the seconds it took."""
    app, request = build(setup, url, f"b{seed}", directory)
    rng = random.Random(seed)
    plan = {
        user: [(next(ids), text, rng.random() < duplicates) for text in texts(user)]
        for user in users
    }
    async with app:
        updates = {
            user: [(payload(i, user, text), twice) for i, text, twice in steps]
            for user, steps in plan.items()
        }

        async def feed(data: dict[str, Any]) -> None:
            _update.set(data["update_id"])
            # Each delivery is parsed on its own, as two deliveries would be.
            await app.process_update(Update.de_json(data, app.bot))

        async def user_task(user: int) -> None:
            for data, twice in updates[user]:
                if twice:
                    await asyncio.gather(feed(data), feed(data))
                else:
                    await feed(data)

        start = time.perf_counter()
        await asyncio.gather(*(user_task(u) for u in users))
        elapsed = time.perf_counter() - start
    return elapsed, request


def server_stats(client: redis.Redis) -> dict[str, tuple[int, int]]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"]))
        for name, v in stats.items()
        if name not in {"cmdstat_info", "cmdstat_config", "cmdstat_flushall"}
    }


def delta(after: dict[str, tuple[int, int]], before: dict[str, tuple[int, int]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for name, (calls, usec) in after.items():
        was_calls, was_usec = before.get(name, (0, 0))
        out[f"calls:{name}"] += calls - was_calls
        out[f"usec:{name}"] += usec - was_usec
    return out


def wrong(request: RecordingRequest, users: range) -> tuple[int, int]:
    """(updates answered more than once, users whose transcript is not the expected one)."""
    per_update = Counter((chat, update) for chat, update, _ in request.replies)
    twice = sum(1 for n in per_update.values() if n > 1)
    by_user: defaultdict[int, list[str]] = defaultdict(list)
    for chat, _, text in request.replies:
        by_user[chat].append(text)
    bad = sum(1 for u in users if by_user[u] != transcript(u))
    return twice, bad


def throughput(
    client: redis.Redis, url: str, users: int, rounds: int, directory: Path
) -> tuple[dict[str, list[float]], dict[str, Counter[str]], itertools.count[int], int]:
    """Rates per round and commandstats deltas of every setup, the setups taking turns."""
    rates: defaultdict[str, list[float]] = defaultdict(list)
    stats: defaultdict[str, Counter[str]] = defaultdict(Counter)
    ids = itertools.count(1)
    base = 0
    for round_ in range(rounds + 1):  # round 0 warms up (scripts loaded, imports done)
        for n, setup in enumerate(SETUPS):
            block = range(base, base + users)
            base += users
            before = server_stats(client)
            elapsed, request = asyncio.run(
                run(setup, url, block, directory, ids=ids, duplicates=0.0, seed=round_ * 10 + n)
            )
            after = server_stats(client)
            assert wrong(request, block) == (0, 0), setup
            if round_:
                rates[setup].append(users * STEPS / elapsed)
                stats[setup] += delta(after, before)
        client.flushall()
    return rates, stats, ids, base


def report(rates: dict[str, list[float]], stats: dict[str, Counter[str]], users: int) -> None:
    base = rates[PICKLE]
    head = f"{'msgs/s':>8} {'vs pickle':>9} {'cmds/msg':>9} {'µs/msg':>7}"
    print(f"{'setup':<50} {head}")
    for setup in SETUPS:
        n = users * STEPS * len(rates[setup])
        ratio = statistics.median(r / s for r, s in zip(rates[setup], base, strict=True))
        line = f"{setup:<50} {statistics.median(rates[setup]):>8,.0f} {ratio:>8.2f}x"
        if setup in REDIS_SETUPS:
            calls = sum(v for k, v in stats[setup].items() if k.startswith("calls:"))
            usec = sum(v for k, v in stats[setup].items() if k.startswith("usec:"))
            line += f" {calls / n:>9.1f} {usec / n:>7.1f}"
        print(line)
    print("\nper-round msgs/s:")
    for setup in SETUPS:
        print(f"  {setup:<50} " + "  ".join(f"{r:,.0f}" for r in rates[setup]))
    print("\nRedis commands per message by name (INFO commandstats, script calls included):")
    for setup in REDIS_SETUPS:
        n = users * STEPS * len(rates[setup])
        calls = [(k.removeprefix("calls:"), v / n) for k, v in stats[setup].items()]
        top = sorted(
            (kv for kv in calls if kv[1] and not kv[0].startswith("usec")), key=lambda kv: -kv[1]
        )
        print(f"  {setup}: " + ", ".join(f"{name} {per:.2f}" for name, per in top))


def duplicates_pass(
    client: redis.Redis,
    url: str,
    users: int,
    directory: Path,
    *,
    share: float,
    ids: itertools.count[int],
    base: int,
) -> None:
    print(f"\n{share:.0%} of updates delivered twice at once:")
    print(f"{'setup':<50} {'updates':>8} {'answered twice':>15} {'users wrong':>12}")
    for n, setup in enumerate(SETUPS):
        block = range(base, base + users)
        base += users
        _, request = asyncio.run(
            run(setup, url, block, directory, ids=ids, duplicates=share, seed=99 + n)
        )
        twice, bad = wrong(request, block)
        print(f"{setup:<50} {users * STEPS:>8} {twice:>15} {bad:>12}")
        client.flushall()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duplicates", type=float, default=0.1)
    args = parser.parse_args()
    server = servers.start_server("redis")
    client = server.client()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ptb-") as tmp:
            directory = Path(tmp)
            version = client.info("server")["redis_version"]
            print(f"Redis {version}, {args.users} users x {STEPS} messages, {args.rounds} rounds\n")
            rates, stats, ids, base = throughput(
                client, server.url, args.users, args.rounds, directory
            )
            report(rates, stats, args.users)
            duplicates_pass(
                client,
                server.url,
                args.users,
                directory,
                share=args.duplicates,
                ids=ids,
                base=base,
            )
    finally:
        client.close()
        server.cleanup()


if __name__ == "__main__":
    main()
