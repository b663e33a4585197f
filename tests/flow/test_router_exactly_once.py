"""Exactly once for a whole message: a redelivery, early, late or at once, runs and sends nothing."""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import threading
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import pytest
import redis

from chatstate import (
    AsyncMemoryBackend,
    AsyncRedisBackend,
    AsyncStateService,
    MemoryBackend,
    RedisBackend,
    StateData,
    StateService,
)
from chatstate.flow import (
    AsyncRouter,
    Flow,
    Invalid,
    Menu,
    MenuItem,
    Message,
    Router,
    Step,
    Turn,
    render_text,
)
from chatstate.testing import Conversation

RULES = StateData(preserved=["jwt_token"])
CALLS: Counter[str] = Counter()


def _quantity(answer: str) -> int:
    if not answer.isdigit():
        raise Invalid("A number, please.")
    return int(answer)


class Order(Flow):
    """Two questions, then a confirmation that counts how often it ran."""

    quantity = Step("How many?", clean=_quantity, next="note")
    note = Step("Any note?")

    def on_complete(self, data: dict[str, Any]) -> str:
        CALLS["complete"] += 1
        return f"Ordered {data['quantity']} ({data['note']})."


def _status(turn: Turn) -> str:
    CALLS["status"] += 1
    return f"You have {'a' if turn.state.get('flow') else 'no'} flow going."


def _login(turn: Turn) -> str:
    CALLS["login"] += 1
    return "Logged in."


MENU = Menu(
    "Menu",
    [
        MenuItem("order", "Order", flow=Order),
        MenuItem("status", "Status", handler=_status),
        MenuItem("login", "Log in", handler=_login),
    ],
)


def _router(service: StateService | None = None) -> Router:
    return Router(service or StateService(MemoryBackend(), RULES), main_menu=MENU)


@pytest.fixture(autouse=True)
def _count() -> None:
    CALLS.clear()


def test_a_redelivery_of_a_message_that_wrote_nothing_is_silent() -> None:
    """A menu handler, a greeting and an invalid answer, delivered twice: answered once."""
    chat = Conversation(_router(), "ann")
    assert chat.send("status", message_id="m1")
    assert chat.send("status", message_id="m1") == []
    assert CALLS["status"] == 1
    assert chat.send("hi", message_id="m2")
    assert chat.send("hi", message_id="m2") == []
    chat.send("order", message_id="m3")
    assert chat.send("lots", message_id="m4") == ["A number, please.", "How many?"]
    assert chat.send("lots", message_id="m4") == []
    assert chat.state["flow"]["attempts"] == 1


def test_five_concurrent_copies_of_a_completing_message_reply_once() -> None:
    """Five copies of the message that ends a flow, at once: one reply, one hook run."""
    router = _router()
    chat = Conversation(router, "bob")
    chat.send("order")
    chat.send("2")
    barrier = threading.Barrier(5)
    replies: list[list[Any]] = []

    def deliver() -> None:
        barrier.wait()
        replies.append(router.handle(Message("bob", text="at the door", message_id="last")))

    threads = [threading.Thread(target=deliver) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r) for r in replies) == [0, 0, 0, 0, 1]
    assert CALLS["complete"] == 1
    assert "flow" not in chat.state


def test_late_copies_of_earlier_messages_change_nothing() -> None:
    """A late 'hi' keeps the flow, a late 'status' is not an answer, a late login runs no handler."""
    chat = Conversation(_router(), "cid")
    chat.send("login", message_id="old-login")
    chat.send("hi", message_id="old-hi")
    chat.send("status", message_id="old-status")
    chat.send("order", message_id="new-order")
    assert chat.send("hi", message_id="old-hi") == []
    assert chat.send("status", message_id="old-status") == []
    assert chat.send("login", message_id="old-login") == []
    assert chat.state["flow"]["step"] == "quantity"
    assert CALLS["login"] == 1
    assert chat.send("4", message_id="new-4") == ["Any note?"]


def test_the_readme_pattern_and_the_router_share_a_message_id() -> None:
    """update_once(op_id=message_id) then router.handle(same message): both happen."""
    service = StateService(MemoryBackend(), RULES)
    router = _router(service)
    message = Message("dan", text="status", message_id="wamid.42")
    first = service.update_once("dan", {"last_text": "status"}, op_id="wamid.42")
    assert first.applied
    assert router.handle(message)  # answered: the router's ids are its own
    assert router.handle(message) == []
    assert CALLS["status"] == 1


def test_a_hook_that_raises_leaves_the_message_to_be_handled_again() -> None:
    """on_complete fails: nothing is written; the redelivered message runs it again."""
    failures = [RuntimeError("payments API timed out")]

    class Pay(Flow):
        amount = Step("How much?", clean=_quantity)

        def on_complete(self, data: dict[str, Any]) -> str:
            if failures:
                raise failures.pop()
            return f"Paid {data['amount']}."

    router = Router(
        StateService(MemoryBackend(), RULES),
        main_menu=Menu("Menu", [MenuItem("pay", "Pay", flow=Pay)]),
    )
    chat = Conversation(router, "eve")
    chat.send("pay")
    with pytest.raises(RuntimeError):
        chat.send("30", message_id="pay-30")
    assert chat.state["flow"]["step"] == "amount"  # nothing was committed
    assert chat.send("30", message_id="pay-30") == ["Paid 30."]
    assert chat.send("30", message_id="pay-30") == []
    assert "flow" not in chat.state


def test_two_messages_at_once_are_handled_one_after_the_other() -> None:
    """Two different answers at once: the second sees the state the first left."""
    router = _router()
    chat = Conversation(router, "fay")
    chat.send("order")
    inside = threading.Event()
    release = threading.Event()
    seen: list[int] = []

    def slow_quantity(answer: str) -> int:
        seen.append(int(answer))
        if answer == "1":
            inside.set()
            release.wait(10)
        return int(answer)

    Order.steps["quantity"].clean = slow_quantity
    try:
        results: dict[str, list[Any]] = {}
        first = threading.Thread(
            target=lambda: results.setdefault(
                "1", router.handle(Message("fay", "1", message_id="a"))
            )
        )
        first.start()
        inside.wait(10)
        second = threading.Thread(
            target=lambda: results.setdefault(
                "2", router.handle(Message("fay", "2", message_id="b"))
            )
        )
        second.start()
        # The second message waits for the first one's claim; an app write meanwhile is kept.
        router.service.update("fay", {"app": "kept"})
        release.set()
        first.join()
        second.join()
    finally:
        Order.steps["quantity"].clean = _quantity
    assert seen == [1]  # the second message was an answer to "note", not to "quantity"
    assert chat.state["app"] == "kept"
    assert "flow" not in chat.state or chat.state["flow"]["step"] == "note"
    assert render_text(results["2"][0]).startswith("Ordered 1")


# -- under load, with duplicates and swapped deliveries -------------------------------------

WORDS = ["hi", "order", "3", "x", "no note", "status", "back", "cancel", "7", "order"]
USERS = 200
PER_USER = 20


def _script(seed: int) -> dict[str, list[Message]]:
    """Each user's messages, with ids and timestamps; deliveries are derived from it."""
    rnd = random.Random(seed)
    out: dict[str, list[Message]] = {}
    for u in range(USERS):
        user = f"user-{u}"
        out[user] = [
            Message(user, text=rnd.choice(WORDS), message_id=f"{user}-m{i}", timestamp=1_000 + i)
            for i in range(PER_USER)
        ]
    return out


def _deliveries(script: dict[str, list[Message]], seed: int) -> list[Message]:
    """Every message once, 10% a second time later, 5% of neighbours swapped; users interleaved."""
    rnd = random.Random(seed + 1)
    queues: list[list[Message]] = []
    for messages in script.values():
        queue = list(messages)
        for i in range(len(queue) - 1):
            if rnd.random() < 0.05:
                queue[i], queue[i + 1] = queue[i + 1], queue[i]
        for message in messages:
            if rnd.random() < 0.10:
                queue.insert(rnd.randint(queue.index(message) + 1, len(queue)), message)
        queues.append(queue)
    flat: list[Message] = []
    while any(queues):
        queue = rnd.choice([q for q in queues if q])
        flat.append(queue.pop(0))
    return flat


class _Recording(AsyncStateService):
    """Records, under each message's claim, the order in which a user's messages are handled."""

    def __init__(self, *args: Any, order: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.order = order

    async def claim(self, user_id: str, op_id: str | None = None, **kwargs: Any) -> Any:
        claim = await super().claim(user_id, op_id, **kwargs)
        commit = claim.commit

        async def recorded() -> Any:
            await self.order(user_id, op_id)  # still holding the claim: serial per user
            return await commit()

        claim.commit = recorded  # type: ignore[method-assign]
        return claim


def _replay(script: dict[str, list[Message]], handled: dict[str, list[str]]) -> dict[str, Any]:
    """Each user's messages, in the order they were handled, one at a time on a fresh router."""
    router = _router()
    by_id = {m.message_id: m for ms in script.values() for m in ms}
    for ids in handled.values():
        for message_id in ids:
            router.handle(by_id[message_id])
    return {user: router.service.get(user) for user in script}


def _check(
    script: dict[str, list[Message]],
    replies: dict[str, int],
    handled: dict[str, list[str]],
    stored: dict[str, Any],
) -> None:
    ids = {m.message_id for ms in script.values() for m in ms}
    assert set(replies) == ids, "a message was never answered"
    assert set(replies.values()) == {1}, "a message was answered more than once"
    assert sorted(i for ids_ in handled.values() for i in ids_) == sorted(ids)
    assert _replay(script, handled) == stored, "a state no one-at-a-time order gives"


@pytest.mark.slow
@pytest.mark.redis
def test_load_with_duplicates_and_swaps_on_asyncio(redis_url: str, namespace: str) -> None:
    """200 users x 20 messages, 10% twice, 5% swapped, all at once: each id answered once."""
    script = _script(7)
    deliveries = _deliveries(script, 7)
    handled: dict[str, list[str]] = defaultdict(list)

    async def main() -> dict[str, int]:
        async def order(user: str, message_id: str | None) -> None:
            handled[user].append(str(message_id))

        service = _Recording(
            AsyncRedisBackend.from_url(redis_url, namespace=namespace), RULES, order=order
        )
        router = AsyncRouter(
            service, main_menu=MENU, wait=300
        )  # correctness, not latency: a busy CI machine is slow
        replies: Counter[str] = Counter()
        rnd = random.Random(3)

        async def deliver(message: Message) -> None:
            await asyncio.sleep(rnd.random() * 0.01)
            if await router.handle(message):
                replies[str(message.message_id)] += 1

        await asyncio.gather(*(deliver(m) for m in deliveries))
        await service.aclose()
        return replies

    replies = asyncio.run(main())
    check = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    stored = {user: check.get(user) for user in script}
    check.close()
    _check(script, dict(replies), handled, stored)


def _process_worker(
    url: str, namespace: str, deliveries: list[Message]
) -> tuple[dict[str, int], list[tuple[str, int, str]]]:
    """One of four processes: 8 threads handle its share of the deliveries with the sync Router."""
    client = redis.Redis.from_url(url)
    records: list[tuple[str, int, str]] = []
    lock = threading.Lock()

    class Recording(StateService):
        def claim(self, user_id: str, op_id: str | None = None, **kwargs: Any) -> Any:
            claim = super().claim(user_id, op_id, **kwargs)
            commit = claim.commit

            def recorded() -> Any:
                seq = int(client.incr(f"{namespace}:seq:{user_id}"))
                with lock:
                    records.append((user_id, seq, str(op_id)))
                return commit()

            claim.commit = recorded  # type: ignore[method-assign]
            return claim

    service = Recording(RedisBackend.from_url(url, namespace=namespace), RULES)
    router = Router(service, main_menu=MENU, wait=300)
    replies: Counter[str] = Counter()
    work = list(deliveries)

    def run() -> None:
        while True:
            with lock:
                if not work:
                    return
                message = work.pop(0)
            if router.handle(message):
                with lock:
                    replies[str(message.message_id)] += 1

    threads = [threading.Thread(target=run) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    service.close()
    client.close()
    return dict(replies), records


@pytest.mark.slow
@pytest.mark.redis
def test_load_with_duplicates_and_swaps_across_four_processes(
    redis_url: str, namespace: str
) -> None:
    """The same load spread over 4 processes x 8 threads: each id answered once, states serial."""
    script = _script(11)
    deliveries = _deliveries(script, 11)
    shares = [deliveries[i::4] for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(4, mp_context=ctx) as pool:
        results = list(pool.map(_process_worker, [redis_url] * 4, [namespace] * 4, shares))
    replies: Counter[str] = Counter()
    records: list[tuple[str, int, str]] = []
    for r, rec in results:
        replies.update(r)
        records.extend(rec)
    handled: dict[str, list[str]] = defaultdict(list)
    for user, _, message_id in sorted(records):
        handled[user].append(message_id)
    check = StateService(RedisBackend.from_url(redis_url, namespace=namespace), RULES)
    stored = {user: check.get(user) for user in script}
    check.close()
    _check(script, dict(replies), handled, stored)


def test_the_async_router_on_memory_answers_each_id_once() -> None:
    """The same checks, small, on the memory backend with the async router."""
    script = dict(list(_script(5).items())[:20])
    deliveries = _deliveries(script, 5)
    handled: dict[str, list[str]] = defaultdict(list)

    async def main() -> tuple[dict[str, int], dict[str, Any]]:
        async def order(user: str, message_id: str | None) -> None:
            handled[user].append(str(message_id))

        service = _Recording(AsyncMemoryBackend(), RULES, order=order)
        router = AsyncRouter(service, main_menu=MENU, wait=300)
        replies: Counter[str] = Counter()

        async def deliver(message: Message) -> None:
            if await router.handle(message):
                replies[str(message.message_id)] += 1

        await asyncio.gather(*(deliver(m) for m in deliveries))
        stored = {user: await service.get(user) for user in script}
        return dict(replies), stored

    replies, stored = asyncio.run(main())
    _check(script, replies, handled, stored)
