"""Reminders and timeouts fired by Router.due / AsyncRouter.run_due, once across processes."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import pytest

from chatstate import AsyncRedisBackend, AsyncStateService, RedisBackend, StateService
from chatstate.exceptions import UsageError
from chatstate.flow import AsyncRouter, Flow, Menu, MenuItem, Message, Router, Step, render_text
from chatstate.state import AsyncMemoryBackend, MemoryBackend
from chatstate.testing import AsyncConversation, Conversation
from fakes import FakeClock


class Quiz(Flow):
    reminder = timedelta(minutes=5)
    timeout = timedelta(minutes=30)
    product = Step("What is 6 x 7?", clean=int, next="total")
    total = Step("And 2 + 2?", clean=int)


class Polite(Flow):
    reminder = timedelta(minutes=5)
    timeout = timedelta(minutes=30)
    answer = Step("Your name?")

    def on_reminder(self, data: dict[str, Any], ctx: Any) -> str:
        ctx.update({"nudged": True})
        return f"Still there? We were at {ctx.step}."

    def on_timeout(self, data: dict[str, Any]) -> str:
        return "Bye for now."


MENU = Menu(
    "Menu", [MenuItem("quiz", "Quiz", flow=Quiz), MenuItem("polite", "Polite", flow=Polite)]
)


def _texts(fired: list[tuple[str, list[Any]]]) -> list[tuple[str, list[str]]]:
    return sorted((user, [render_text(s) for s in replies]) for user, replies in fired)


def _message(user: str, text: str, clock: FakeClock, n: int) -> Message:
    return Message(user, text=text, message_id=f"{user}-{n}", timestamp=clock.now)


def test_a_reminder_then_a_timeout_each_fire_once() -> None:
    clock = FakeClock()
    router = Router(StateService(), main_menu=MENU, clock=clock)
    chat = Conversation(router, "ana")
    chat.send("quiz")
    assert router.due() == []
    clock.now += 5 * 60 - 1
    assert router.due() == []
    clock.now += 1
    assert _texts(router.due()) == [("ana", ["Are you still there?", "What is 6 x 7?"])]
    assert router.due() == []
    assert chat.state["flow"]["reminded"] is True
    clock.now += 25 * 60  # idle exactly the timeout: not longer, so not yet
    assert router.due() == []
    clock.now += 0.01
    assert _texts(router.due()) == [
        ("ana", ["That conversation timed out; let's start again.", "Menu\n[Quiz]\n[Polite]"])
    ]
    assert "flow" not in chat.state
    clock.now += 3600
    assert router.due() == []


def test_an_answer_moves_the_deadline_and_an_early_entry_fires_nothing() -> None:
    clock = FakeClock()
    router = Router(StateService(), main_menu=MENU, clock=clock)
    chat = Conversation(router, "ana")
    chat.send("quiz")
    clock.now += 4 * 60
    assert router.handle(_message("ana", "42", clock, 1))  # at the second step now
    clock.now += 2 * 60  # 6 minutes after the start, 2 after the answer
    assert router.due() == []
    assert chat.state["flow"].get("reminded") is None
    clock.now += 3 * 60  # 5 after the answer
    assert _texts(router.due()) == [("ana", ["Are you still there?", "And 2 + 2?"])]


def test_hooks_replace_the_default_replies_and_may_stage_changes() -> None:
    clock = FakeClock()
    router = Router(StateService(), main_menu=MENU, clock=clock)
    chat = Conversation(router, "bo")
    chat.send("polite")
    clock.now += 5 * 60
    assert _texts(router.due()) == [("bo", ["Still there? We were at answer."])]
    assert chat.state["nudged"] is True
    clock.now += 30 * 60
    assert _texts(router.due()) == [("bo", ["Bye for now."])]


def test_a_finished_flow_leaves_nothing_to_fire() -> None:
    clock = FakeClock()
    router = Router(StateService(), main_menu=MENU, clock=clock)
    chat = Conversation(router, "ana")
    chat.send("quiz")
    chat.send("cancel")
    clock.now += 3600
    assert router.due() == []
    assert router.service.manager.backend.due(10**15) == [], "the stale entry was not removed"


def test_due_refuses_a_bad_limit_and_a_backend_without_an_index() -> None:
    router = Router(StateService(), main_menu=MENU)
    with pytest.raises(UsageError, match="limit"):
        router.due(limit=0)

    class Plain:  # a user's backend: the core protocol only
        def __init__(self) -> None:
            self.inner = MemoryBackend()

        def load(self, user_id: str) -> Any:
            return self.inner.load(user_id)

        def apply(self, user_id: str, write: Any) -> Any:
            return self.inner.apply(user_id, write)

        def close(self) -> None:
            pass

    with pytest.raises(UsageError, match="cannot erase"):
        StateService(Plain()).erase("ana")
    clock = FakeClock()
    plain = Router(StateService(Plain()), main_menu=MENU, clock=clock)
    plain.handle(_message("ana", "quiz", clock, 1))  # no index: the flow still works
    with pytest.raises(UsageError, match="keeps no deadline index"):
        plain.due()
    clock.now += 3600  # and the timeout applies at the next message
    replies = plain.handle(_message("ana", "42", clock, 2))
    assert render_text(replies[0]) == "That conversation timed out; let's start again."


def test_a_user_busy_with_a_message_is_skipped_and_fires_later() -> None:
    clock = FakeClock()
    service = StateService()
    router = Router(service, main_menu=MENU, clock=clock)
    Conversation(router, "ana").send("quiz")
    clock.now += 6 * 60
    claim = service.claim("ana", "in-flight", lease=30)
    assert router.due() == []
    claim.release()
    assert _texts(router.due()) == [("ana", ["Are you still there?", "What is 6 x 7?"])]


def _fire_everywhere(routers: list[Router], users: int) -> list[tuple[str, list[str]]]:
    fired: list[tuple[str, list[Any]]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(routers))

    def work(router: Router) -> None:
        barrier.wait()
        got = router.due(limit=users)
        with lock:
            fired.extend(got)

    threads = [threading.Thread(target=work, args=(r,)) for r in routers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return _texts(fired)


def _race(make_service: Any, users: int = 30) -> None:
    clock = FakeClock()
    services = [make_service() for _ in range(3)]
    routers = [Router(s, main_menu=MENU, clock=clock) for s in services]
    try:
        for n in range(users):
            routers[n % 3].handle(_message(f"u{n}", "quiz", clock, 0))
        clock.now += 5 * 60
        reminded = _fire_everywhere(routers, users)
        assert reminded == sorted(
            (f"u{n}", ["Are you still there?", "What is 6 x 7?"]) for n in range(users)
        )
        clock.now += 30 * 60
        ended = _fire_everywhere(routers, users)
        assert [user for user, _ in ended] == sorted(f"u{n}" for n in range(users))
        assert _fire_everywhere(routers, users) == []
    finally:
        for s in services:
            s.close()


def test_several_routers_fire_each_deadline_once_on_memory() -> None:
    store = MemoryBackend()
    _race(lambda: StateService(store))


@pytest.mark.redis
def test_several_processes_fire_each_deadline_once_on_redis(redis_url: str, namespace: str) -> None:
    _race(lambda: StateService(RedisBackend.from_url(redis_url, namespace=namespace)))


@pytest.mark.cluster
def test_the_index_spans_cluster_slots(cluster_url: str, namespace: str) -> None:
    def make() -> StateService:
        return StateService(
            RedisBackend.from_url(cluster_url, namespace=namespace, cluster=True, deadline_shards=4)
        )

    _race(make, users=12)


@pytest.mark.redis
def test_the_redis_index_is_sharded_sorted_sets(redis_url: str, namespace: str) -> None:
    backend = RedisBackend.from_url(redis_url, namespace=namespace, deadline_shards=3)
    try:
        assert backend.deadline_keys() == [f"{namespace}:deadlines:{{{n}}}" for n in range(3)]
        for n in range(30):
            backend.schedule(f"user-{n}", 1_000 + n)
        sizes = [backend.client.zcard(key) for key in backend.deadline_keys()]
        assert sum(sizes) == 30
        assert all(sizes), sizes
        assert backend.due(1_004, 3) == [("user-0", 1_000), ("user-1", 1_001), ("user-2", 1_002)]
    finally:
        backend.close()
    with pytest.raises(Exception, match="deadline_shards"):
        RedisBackend.from_url(redis_url, deadline_shards=-1)


def _async_services(kind: str, redis_url: str, namespace: str) -> list[AsyncStateService]:
    if kind == "memory":
        store = MemoryBackend()
        return [AsyncStateService(AsyncMemoryBackend(store)) for _ in range(2)]
    return [
        AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        for _ in range(2)
    ]


def test_run_due_sends_each_deadline_once_on_memory(namespace: str) -> None:
    _run_due("memory", "", namespace)


@pytest.mark.redis
def test_run_due_sends_each_deadline_once_on_redis(redis_url: str, namespace: str) -> None:
    _run_due("redis", redis_url, namespace)


def _run_due(kind: str, redis_url: str, namespace: str) -> None:
    """Two workers, a send that fails once (logged, the loop goes on), then cancel."""

    async def main() -> None:
        clock = FakeClock()
        services = _async_services(kind, redis_url, namespace)
        routers = [AsyncRouter(s, main_menu=MENU, clock=clock) for s in services]
        for n in range(6):
            await AsyncConversation(routers[n % 2], f"u{n}").send("quiz")
        sent: list[str] = []
        all_sent = asyncio.Event()
        failed_once = False

        async def send(user_id: str, replies: list[Any]) -> None:
            nonlocal failed_once
            if not failed_once:
                failed_once = True
                raise RuntimeError("the platform is down")  # logged; the loop goes on
            sent.append(user_id)
            if len(sent) == 5:
                all_sent.set()

        clock.now += 5 * 60
        workers = [asyncio.create_task(r.run_due(send, interval=0.01)) for r in routers]
        await asyncio.wait_for(all_sent.wait(), 30)
        for _ in range(5):  # more rounds of both workers: nothing fires twice
            await asyncio.sleep(0.02)
        for w in workers:
            w.cancel()
        for w in workers:
            with pytest.raises(asyncio.CancelledError):
                await w
        assert len(sent) == 5
        assert len(set(sent)) == 5
        for s in services:
            await s.aclose()

    asyncio.run(main())


def test_run_due_refuses_a_bad_interval() -> None:
    router = AsyncRouter(AsyncStateService(), main_menu=MENU)
    with pytest.raises(UsageError, match="interval"):
        asyncio.run(router.run_due(lambda user, replies: asyncio.sleep(0), interval=0))


def test_a_hook_taking_only_ctx_is_refused_when_the_flow_is_defined() -> None:
    with pytest.raises(UsageError, match="context comes second"):

        class Wrong(Flow):
            answer = Step("?")

            def on_complete(self, ctx: Any) -> str:
                return "never"

    with pytest.raises(UsageError, match="context comes second"):
        Step("?", validate=lambda ctx: True)


def test_a_late_collection_sends_the_timeout_not_a_reminder_for_a_dead_flow() -> None:
    clock = FakeClock()
    router = Router(StateService(), main_menu=MENU, clock=clock)
    Conversation(router, "ana").send("quiz")
    clock.now += 31 * 60  # due() was not called for half an hour
    assert _texts(router.due()) == [
        ("ana", ["That conversation timed out; let's start again.", "Menu\n[Quiz]\n[Polite]"])
    ]
    assert router.due() == []


def test_due_refuses_a_bad_now() -> None:
    router = Router(StateService(), main_menu=MENU)
    for bad in ("x", float("nan"), float("inf"), -1, True, 1.7e12):
        with pytest.raises(UsageError, match="Unix seconds"):
            router.due(now=bad)
