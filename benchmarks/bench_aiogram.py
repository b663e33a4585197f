"""aiogram on chatstate against aiogram on its own RedisStorage: the same form bot, one run.

    python benchmarks/bench_aiogram.py [--users 200] [--rounds 3] [--duplicates 0.1]

Starts a throwaway redis-server (from PATH) on a random loopback port and feeds a
6-message form bot (``/start``, name, age, city, email, ``yes``: each message
writes data and moves the state, the last reads the data and clears it)
through ``Dispatcher.feed_update``, with a Bot whose session records the
replies (no network). ``--users`` users at once, each sending its six messages
one after the other, as polling with ``handle_as_tasks`` runs them. Setups:

- aiogram ``RedisStorage`` (no isolation: fast, and wrong under duplicates)
- aiogram ``RedisStorage`` + ``RedisEventIsolation`` (aiogram's safe setup)
- chatstate ``ChatstateStorage`` + its isolation + ``ChatstateDedupeMiddleware.setup``
- the same with the dedupe middleware registered the old way
  (``dp.update.outer_middleware``), for comparison

The setups take turns over ``--rounds`` rounds (fresh users each round), so the
machine's noise falls on all alike; msgs/s is the median of the rounds, the ratio
the median of the per-round ratios against aiogram's safe setup. The client CPU
per message (this process's, median of the rounds; its ratio is safe / setup)
moves less than msgs/s when other work shares the machine. Redis commands
and server time per message are ``INFO commandstats`` deltas (commands that
scripts run included; ``EVALSHA`` is what the client sent as scripts).

Then a pass with ``--duplicates`` of the updates delivered twice at once (as two
webhook deliveries or two polling processes would): updates answered twice and
users whose replies or data came out wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import itertools
import random
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import redis
from aiogram import Bot, Dispatcher, Router
from aiogram.client.session.base import BaseSession
from aiogram.filters import Command
from aiogram.fsm.context import FSMContext
from aiogram.fsm.state import State, StatesGroup
from aiogram.fsm.storage.base import DefaultKeyBuilder
from aiogram.fsm.storage.redis import RedisStorage
from aiogram.methods import SendMessage, TelegramMethod
from aiogram.types import Chat, Message, Update, User
from redis.asyncio import BlockingConnectionPool, Redis

import servers
from chatstate.integrations.aiogram import ChatstateDedupeMiddleware, ChatstateStorage

TOKEN = "42:BENCH-TOKEN"  # noqa: S105 - a fake bot token; nothing is sent
SETUPS = (
    "aiogram RedisStorage",
    "aiogram RedisStorage + RedisEventIsolation",
    "chatstate storage + isolation + dedupe (setup)",
    "chatstate, dedupe as outer_middleware (old line)",
)
SAFE = SETUPS[1]
OURS = SETUPS[2]
STEPS = 6
_update: contextvars.ContextVar[int] = contextvars.ContextVar("bench_update", default=0)


class Form(StatesGroup):
    name = State()
    age = State()
    city = State()
    email = State()
    confirm = State()


def form_router() -> Router:
    """Six messages: each writes one field and moves the state; the last reads all, clears."""
    router = Router()

    @router.message(Command("start"))
    async def start(message: Message, state: FSMContext) -> None:
        await state.set_state(Form.name)
        await message.answer("What is your name?")

    async def step(message: Message, state: FSMContext, field: str, nxt: State, ask: str) -> None:
        await state.update_data({field: message.text})
        await state.set_state(nxt)
        await message.answer(ask)

    @router.message(Form.name)
    async def name(message: Message, state: FSMContext) -> None:
        await step(message, state, "name", Form.age, "How old are you?")

    @router.message(Form.age)
    async def age(message: Message, state: FSMContext) -> None:
        await step(message, state, "age", Form.city, "Where do you live?")

    @router.message(Form.city)
    async def city(message: Message, state: FSMContext) -> None:
        await step(message, state, "city", Form.email, "Your email?")

    @router.message(Form.email)
    async def email(message: Message, state: FSMContext) -> None:
        await step(message, state, "email", Form.confirm, "Is that right?")

    @router.message(Form.confirm)
    async def confirm(message: Message, state: FSMContext) -> None:
        data = await state.get_data()
        await state.clear()
        await message.answer(f"Saved {data.get('name')}, {data.get('age')}, {data.get('city')}.")

    return router


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


class RecordingSession(BaseSession):
    """Answers every API call locally and records replies with the update they answer."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[tuple[int, int, str]] = []  # (chat, update id, text)
        self.cpu = 0.0  # seconds of this process's CPU the run took
        self._ids = itertools.count(1)

    async def make_request(
        self,
        bot: Bot,
        method: TelegramMethod[Any],
        timeout: int | None = None,  # noqa: ASYNC109, ARG002 - aiogram's signature
    ) -> Any:
        if isinstance(method, SendMessage):
            self.replies.append((int(method.chat_id), _update.get(), method.text))
            chat = Chat(id=int(method.chat_id), type="private")
            sent = Message(message_id=next(self._ids), date=_NOW, chat=chat, text=method.text)
            return sent.as_(bot)
        return True

    async def stream_content(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def close(self) -> None:
        pass


_NOW = datetime.now(UTC)


def make_update(update_id: int, user: int, text: str, bot: Bot) -> Update:
    message = Message(
        message_id=update_id,
        date=_NOW,
        chat=Chat(id=user, type="private"),
        from_user=User(id=user, is_bot=False, first_name=f"U{user}"),
        text=text,
        entities=(
            [{"type": "bot_command", "offset": 0, "length": len(text)}]
            if text.startswith("/")
            else None
        ),
    )
    return Update.model_validate(
        {"update_id": update_id, "message": message.model_dump()}, context={"bot": bot}
    )


def build(setup: str, url: str, prefix: str) -> tuple[Dispatcher, Callable[[], Any]]:
    """A dispatcher of ``setup`` on the server at ``url``, and how to close it."""
    if setup.startswith("aiogram"):
        # aiogram's from_url pool (100 connections) raises past 100 commands at once; this waits.
        client = Redis(connection_pool=BlockingConnectionPool.from_url(url, max_connections=100))
        storage: Any = RedisStorage(client, key_builder=DefaultKeyBuilder(prefix=prefix))
        isolation = storage.create_isolation() if "Isolation" in setup else None
        dp = Dispatcher(storage=storage, events_isolation=isolation)
        dp.include_router(form_router())
        return dp, client.aclose
    storage = ChatstateStorage.from_url(url, namespace=prefix)
    dp = Dispatcher(storage=storage, events_isolation=storage.create_isolation())
    dedupe = ChatstateDedupeMiddleware(storage.service)
    if "old line" in setup:
        dp.update.outer_middleware(dedupe)
    else:
        dedupe.setup(dp)
    dp.include_router(form_router())
    return dp, storage.close


async def run(
    setup: str, url: str, users: range, *, ids: itertools.count[int], duplicates: float, seed: int
) -> tuple[float, RecordingSession]:
    """Feed every user's six messages (users at once); return the seconds it took, the replies."""
    dp, close = build(setup, url, f"b{seed}")
    session = RecordingSession()
    bot = Bot(TOKEN, session=session)
    rng = random.Random(seed)
    plan = {
        user: [(next(ids), text, rng.random() < duplicates) for text in texts(user)]
        for user in users
    }
    updates = {
        user: [(make_update(i, user, text, bot), twice) for i, text, twice in steps]
        for user, steps in plan.items()
    }

    async def feed(update: Update) -> None:
        _update.set(update.update_id)
        await dp.feed_update(bot, update)

    async def user_task(user: int) -> None:
        for update, twice in updates[user]:
            if twice:
                await asyncio.gather(feed(update), feed(update))
            else:
                await feed(update)

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(user_task(u) for u in users))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    await close()
    session.cpu = cpu
    return elapsed, session


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


def wrong(session: RecordingSession, users: range) -> tuple[int, int]:
    """(updates answered more than once, users whose transcript is not the expected one)."""
    per_update = Counter((chat, update) for chat, update, _ in session.replies)
    twice = sum(1 for n in per_update.values() if n > 1)
    by_user: defaultdict[int, list[str]] = defaultdict(list)
    for chat, _, text in session.replies:
        by_user[chat].append(text)
    bad = sum(1 for u in users if by_user[u] != transcript(u))
    return twice, bad


def throughput(
    client: redis.Redis, url: str, users: int, rounds: int, ids: itertools.count[int]
) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, Counter[str]], int]:
    """Rates and CPU per message per round, commandstats deltas; the setups taking turns."""
    rates: defaultdict[str, list[float]] = defaultdict(list)
    cpus: defaultdict[str, list[float]] = defaultdict(list)
    stats: defaultdict[str, Counter[str]] = defaultdict(Counter)
    base = 0
    for round_ in range(rounds + 1):  # round 0 warms up (scripts loaded, imports done)
        for n, setup in enumerate(SETUPS):
            block = range(base, base + users)
            base += users
            before = server_stats(client)
            elapsed, session = asyncio.run(
                run(setup, url, block, ids=ids, duplicates=0.0, seed=round_ * 10 + n)
            )
            after = server_stats(client)
            assert wrong(session, block) == (0, 0), setup
            if round_:
                rates[setup].append(users * STEPS / elapsed)
                cpus[setup].append(session.cpu / (users * STEPS) * 1e6)
                stats[setup] += delta(after, before)
        client.flushall()
    return rates, cpus, stats, base


def report(
    rates: dict[str, list[float]],
    cpus: dict[str, list[float]],
    stats: dict[str, Counter[str]],
    users: int,
) -> None:
    safe = rates[SAFE]
    head = (
        f"{'msgs/s':>8} {'vs safe':>8} {'cmds/msg':>9} {'EVALSHA':>8} {'server µs':>10} "
        f"{'client CPU µs':>14} {'vs safe':>8}"
    )
    print(f"{'setup':<50} {head}")
    for setup in SETUPS:
        n = users * STEPS * len(rates[setup])
        calls = sum(v for k, v in stats[setup].items() if k.startswith("calls:"))
        usec = sum(v for k, v in stats[setup].items() if k.startswith("usec:"))
        evalsha = stats[setup]["calls:evalsha"] + stats[setup]["calls:eval"]
        ratio = statistics.median(r / s for r, s in zip(rates[setup], safe, strict=True))
        cpu = statistics.median(cpus[setup])
        cpu_ratio = statistics.median(s / c for c, s in zip(cpus[setup], cpus[SAFE], strict=True))
        print(
            f"{setup:<50} {statistics.median(rates[setup]):>8,.0f} {ratio:>7.2f}x "
            f"{calls / n:>9.1f} {evalsha / n:>8.1f} {usec / n:>10.1f} {cpu:>14,.0f} "
            f"{cpu_ratio:>7.2f}x"
        )
    print("\nper-round msgs/s:")
    for setup in SETUPS:
        print(f"  {setup:<50} " + "  ".join(f"{r:,.0f}" for r in rates[setup]))
    print("\ncommands per message by name (INFO commandstats, script calls included):")
    for setup in SETUPS:
        n = users * STEPS * len(rates[setup])
        calls = [(k.removeprefix("calls:"), v / n) for k, v in stats[setup].items()]
        top = sorted(
            (kv for kv in calls if kv[1] and not kv[0].startswith("usec")), key=lambda kv: -kv[1]
        )
        print(f"  {setup}: " + ", ".join(f"{name} {per:.2f}" for name, per in top))


def duplicates_pass(
    client: redis.Redis, url: str, users: int, *, share: float, ids: itertools.count[int], base: int
) -> None:
    print(f"\n{share:.0%} of updates delivered twice at once:")
    print(f"{'setup':<50} {'updates':>8} {'answered twice':>15} {'users wrong':>12}")
    for n, setup in enumerate(SETUPS):
        block = range(base, base + users)
        base += users
        _, session = asyncio.run(run(setup, url, block, ids=ids, duplicates=share, seed=99 + n))
        twice, bad = wrong(session, block)
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
    ids = itertools.count(1)
    try:
        version = client.info("server")["redis_version"]
        print(f"Redis {version}, {args.users} users x {STEPS} messages, {args.rounds} rounds\n")
        rates, cpus, stats, base = throughput(client, server.url, args.users, args.rounds, ids)
        report(rates, cpus, stats, args.users)
        duplicates_pass(client, server.url, args.users, share=args.duplicates, ids=ids, base=base)
    finally:
        client.close()
        server.cleanup()


if __name__ == "__main__":
    main()
