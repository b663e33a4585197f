"""An update under chatstate's aiogram isolation is one step: one claim, one write (issue 19).

The isolation's lock claims the key's document (with the dedupe middleware set
up, for the update's id too: claim, dedupe and read in one script); the
handlers read that snapshot and stage their writes on it; the end of the lock
stores them in one write that also remembers the update and releases the key.
A handler that raises writes nothing to its key. A real ``Dispatcher`` is fed
real ``Update`` objects; its bot's session records requests (no network).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiogram import Bot, Dispatcher, Router
from aiogram.fsm.context import FSMContext
from aiogram.fsm.storage.base import StorageKey
from aiogram.types import ErrorEvent, Message, Poll, PollOption, Update
from redis.asyncio import Redis
from test_integration_aiogram import (
    KEY,
    build_dispatcher,
    form_router,
    message_update,
)

from chatstate import AsyncMemoryBackend, AsyncRedisBackend, AsyncStateService
from chatstate.exceptions import LockTimeoutError, SerializationError
from chatstate.integrations.aiogram import (
    ChatstateDedupeMiddleware,
    ChatstateEventIsolation,
    ChatstateStorage,
)


def _key(bot: Bot) -> StorageKey:
    return StorageKey(bot_id=bot.id, chat_id=7, user_id=7)


def test_returned_data_under_the_lock_is_a_private_copy() -> None:
    """Changing what get_data, get_value or update_data returned changes nothing staged or stored."""

    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        svc, router, seen = AsyncStateService(), Router(), []

        @router.message()
        async def meddle(message: Message, state: FSMContext) -> None:
            data = await state.update_data(cart={"apples": 1})
            data["cart"]["apples"] = 99
            (await state.get_data())["cart"]["pears"] = 1
            (await state.get_value("cart"))["plums"] = 1
            seen.append(await state.get_data())

        dp, bot, _ = build_dispatcher(svc, router)
        await dp.feed_update(bot, message_update(1, "hi"))
        return seen[0], await ChatstateStorage(svc).get_data(_key(bot))

    assert asyncio.run(main()) == ({"cart": {"apples": 1}}, {"cart": {"apples": 1}})


def test_a_write_after_the_update_ended_goes_straight_to_the_store() -> None:
    """A task a handler started that writes after the update ended writes directly, not lost."""

    async def main() -> dict[str, Any]:
        svc, router, tasks = AsyncStateService(), Router(), []

        @router.message()
        async def spawn(message: Message, state: FSMContext) -> None:
            async def later() -> None:
                await asyncio.sleep(0.01)
                await state.update_data(late=True)

            tasks.append(asyncio.create_task(later()))
            await state.update_data(now=True)

        dp, bot, _ = build_dispatcher(svc, router)
        await dp.feed_update(bot, message_update(5, "hi"))
        await asyncio.gather(*tasks)
        return await ChatstateStorage(svc).get_data(_key(bot))

    assert asyncio.run(main()) == {"now": True, "late": True}


def test_an_update_without_an_fsm_key_is_deduped() -> None:
    """A poll update (no chat, no user: no FSM key, no lock) is still handled once."""

    async def main() -> list[str]:
        svc, router, calls = AsyncStateService(), Router(), []

        @router.poll()
        async def on_poll(poll: Poll) -> None:
            calls.append(poll.id)

        dp, bot, _ = build_dispatcher(svc, router, dedupe=True)
        options = [PollOption(persistent_id=x, text=x, voter_count=0) for x in "ab"]
        poll = Poll(
            id="p1",
            question="?",
            options=options,
            total_voter_count=0,
            is_closed=False,
            is_anonymous=True,
            type="regular",
            allows_multiple_answers=False,
            allows_revoting=False,
            members_only=False,
        )
        update = Update(update_id=6, poll=poll)
        await asyncio.gather(dp.feed_update(bot, update), dp.feed_update(bot, update))
        await dp.feed_update(bot, update)
        return calls

    assert asyncio.run(main()) == ["p1"]


def test_setup_places_the_middleware_around_the_fsm() -> None:
    """setup() puts its first half before aiogram's FSM middleware and itself after it."""
    svc = AsyncStateService()
    storage = ChatstateStorage(svc)
    dp = Dispatcher(storage=storage, events_isolation=storage.create_isolation())

    async def mine(handler: Any, event: Any, data: Any) -> Any:
        return await handler(event, data)

    dp.update.outer_middleware(mine)
    dedupe = ChatstateDedupeMiddleware(svc)
    assert dedupe.setup(dp) is dedupe
    chain = list(dp.update.outer_middleware)
    fsm = chain.index(dp.fsm)
    assert chain[fsm - 1] == dedupe._before_fsm
    assert chain[fsm + 1 :] == [mine, dedupe]


def test_a_busy_key_raises_lock_timeout_error() -> None:
    """Waiting longer than ``wait`` for a key raises LockTimeoutError, as the lock did before."""

    async def main() -> None:
        store = AsyncMemoryBackend()
        holder = ChatstateEventIsolation(AsyncStateService(store))
        waiter = ChatstateEventIsolation(AsyncStateService(store), wait=0.2)
        async with holder.lock(KEY):
            with pytest.raises(LockTimeoutError):
                async with waiter.lock(KEY):
                    pass

    asyncio.run(main())


@pytest.mark.redis
def test_a_message_sends_two_scripts(redis_url: str, namespace: str) -> None:
    """With setup(), each form message sends exactly two commands: the claim and the commit.

    MONITOR shows what clients send (a script's own calls are tagged ``lua``).
    """

    async def main() -> list[list[str]]:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        dp, bot, session = build_dispatcher(svc, form_router(), dedupe=True)
        await dp.feed_update(bot, message_update(1, "/start"))  # scripts loaded
        monitor_client = Redis.from_url(redis_url)
        sent: list[list[str]] = []
        async with monitor_client.monitor() as monitor:
            for update_id, text in [(2, "Ana"), (3, "33"), (3, "33")]:
                await monitor_client.echo(f"update {update_id}")
                await dp.feed_update(bot, message_update(update_id, text))
            await monitor_client.echo("done")
            async for entry in monitor.listen():
                if entry["client_type"] == "lua":
                    continue
                command = entry["command"]
                if command.startswith("ECHO"):
                    if "done" in command:
                        break
                    sent.append([])
                elif sent:
                    sent[-1].append(command.split()[0])
        await monitor_client.aclose()
        await svc.aclose()
        assert session.texts == ["What is your name?", "How old are you?", "Ana is 33"]
        return sent

    assert asyncio.run(main()) == [["EVALSHA", "EVALSHA"], ["EVALSHA", "EVALSHA"], ["EVALSHA"]]


class _OnEveryBackend:
    """Tests run on each backend; a subclass says how to make a service over its store."""

    def services(self) -> AsyncStateService:
        """A new service over this test's store: each one is another 'process' of the bot."""
        raise NotImplementedError

    def test_a_handler_reads_its_own_writes_and_they_land_in_one_write(self) -> None:
        """Each storage call sees the ones before; others see nothing until the update ends, then all."""

        async def main() -> tuple[list[Any], dict[str, Any], int]:
            svc, other = self.services(), self.services()
            router, seen = Router(), []
            uid = ChatstateStorage(other).user_id(StorageKey(bot_id=42, chat_id=7, user_id=7))

            @router.message()
            async def many(message: Message, state: FSMContext) -> None:
                await state.set_state("Form:name")
                seen.append(await state.update_data(a=1, t=(1, 2)))
                seen.append(await state.get_state())
                await state.set_data({"b": {"c": 2}})
                seen.append(await state.update_data(d=None))
                seen.append(await state.get_value("b"))
                seen.append(await other.get(uid))  # another process: nothing stored yet
                await state.set_state(None)
                await state.set_state("Form:age")

            dp, bot, _ = build_dispatcher(svc, router, dedupe=True)
            before = (await other.snapshot(uid)).version
            await dp.feed_update(bot, message_update(1, "hi"))
            after = await other.snapshot(uid)
            for s in (svc, other):
                await s.aclose()
            return seen, after.data, after.version - before

        seen, stored, writes = asyncio.run(main())
        assert seen == [
            {"a": 1, "t": [1, 2]},
            "Form:name",
            {"b": {"c": 2}, "d": None},
            {"c": 2},
            {},
        ]
        assert stored == {"state": "Form:age", "data": {"b": {"c": 2}, "d": None}}
        assert writes == 1

    def test_a_raising_handler_writes_nothing_to_its_key(self) -> None:
        """Writes staged before a handler raised are dropped; the error handler sees the old state.

        The update is not remembered either: its redelivery is handled again,
        against the state as it was, and then its writes land.
        """

        async def main() -> tuple[list[Any], dict[str, Any], list[str]]:
            svc, router, seen = self.services(), Router(), []
            attempts: list[int] = []

            @router.message()
            async def flaky(message: Message, state: FSMContext) -> None:
                attempts.append(message.message_id)
                seen.append(await state.get_state())
                await state.set_state("Form:age")
                await state.update_data(name="Ana")
                if len(attempts) == 1:
                    raise RuntimeError("boom")
                await message.answer("ok")

            dp, bot, session = build_dispatcher(svc, router, dedupe=True)

            @dp.errors()
            async def on_error(event: ErrorEvent, state: FSMContext) -> None:
                seen.append(("error handler sees", await state.get_state()))

            storage = dp.storage
            await storage.set_state(_key(bot), "Form:name")
            update = message_update(2, "Ana")
            await dp.feed_update(bot, update)  # the error handler handles the error
            left = await svc.get(ChatstateStorage(svc).user_id(_key(bot)))
            await dp.feed_update(bot, update)  # handled again: it was not remembered
            await dp.feed_update(bot, update)  # now it was
            final = await storage.get_data(_key(bot)), await storage.get_state(_key(bot))
            await svc.aclose()
            return [*seen, left, final], left, session.texts

        seen, left, texts = asyncio.run(main())
        assert left == {"state": "Form:name"}
        assert seen == [
            "Form:name",
            ("error handler sees", "Form:name"),
            "Form:name",  # the redelivery runs against the old state
            {"state": "Form:name"},
            ({"name": "Ana"}, "Form:age"),
        ]
        assert texts == ["ok"]

    def test_a_value_that_is_not_json_is_refused_at_the_call(self) -> None:
        """update_data of a set raises in the handler, before anything is staged or stored."""

        async def main() -> tuple[list[Any], dict[str, Any]]:
            svc, router, seen = self.services(), Router(), []

            @router.message()
            async def bad(message: Message, state: FSMContext) -> None:
                await state.update_data(ok=1)
                with pytest.raises(SerializationError):
                    await state.update_data(bad={1, 2})
                with pytest.raises(SerializationError):
                    await state.set_data({"bad": {1}})
                seen.append(await state.get_data())

            dp, bot, _ = build_dispatcher(svc, router)
            await dp.feed_update(bot, message_update(3, "hi"))
            stored = await svc.get(ChatstateStorage(svc).user_id(_key(bot)))
            await svc.aclose()
            return seen, stored

        seen, stored = asyncio.run(main())
        assert seen == [{"ok": 1}]
        assert stored == {"data": {"ok": 1}}

    def test_writes_to_another_key_land_at_once(self) -> None:
        """Inside one key's lock, another key's writes go straight to the store (as without isolation)."""

        async def main() -> list[Any]:
            svc, other, router, seen = self.services(), self.services(), Router(), []
            elsewhere = StorageKey(bot_id=42, chat_id=8, user_id=8)
            uid = ChatstateStorage(other).user_id(elsewhere)

            @router.message()
            async def cross(message: Message, state: FSMContext) -> None:
                storage = state.storage
                await storage.update_data(elsewhere, {"from": 7})
                await storage.set_state(elsewhere, "Other:state")
                seen.append(await other.get(uid))

            dp, bot, _ = build_dispatcher(svc, router)
            await dp.feed_update(bot, message_update(4, "hi"))
            for s in (svc, other):
                await s.aclose()
            return seen

        assert asyncio.run(main()) == [{"data": {"from": 7}, "state": "Other:state"}]


class TestOnMemory(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _store(self) -> None:
        self.store = AsyncMemoryBackend()

    def services(self) -> AsyncStateService:
        return AsyncStateService(self.store)


@pytest.mark.redis
class TestOnRedis(_OnEveryBackend):
    @pytest.fixture(autouse=True)
    def _server(self, redis_url: str, namespace: str) -> None:
        self.url, self.namespace = redis_url, namespace

    def services(self) -> AsyncStateService:
        return AsyncStateService(AsyncRedisBackend.from_url(self.url, namespace=self.namespace))


@pytest.mark.redis
def test_closing_the_storage_lets_running_updates_store_their_writes(
    redis_url: str, namespace: str
) -> None:
    """When aiogram closes the storage as polling stops, a running update stores its writes first.

    Without the wait its commit would meet a closed backend: the reply sent,
    the state never stored.
    """

    async def main() -> tuple[bool, dict[str, Any]]:
        svc = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        storage = ChatstateStorage(svc, close_service=True)
        router, entered, gate = Router(), asyncio.Event(), asyncio.Event()

        @router.message()
        async def slow(message: Message, state: FSMContext) -> None:
            await state.update_data(seen=True)
            entered.set()
            await gate.wait()
            await message.answer("done")

        dp = Dispatcher(storage=storage, events_isolation=storage.create_isolation())
        ChatstateDedupeMiddleware(svc).setup(dp)
        dp.include_router(router)
        _, bot, _ = build_dispatcher(AsyncStateService(), Router())
        handling = asyncio.create_task(dp.feed_update(bot, message_update(7, "hi")))
        await entered.wait()
        closing = asyncio.create_task(storage.close())
        await asyncio.sleep(0.2)
        waited = not closing.done()
        gate.set()
        await asyncio.gather(handling, closing)
        other = AsyncStateService(AsyncRedisBackend.from_url(redis_url, namespace=namespace))
        stored = await other.get(ChatstateStorage(other).user_id(_key(bot)))
        await other.aclose()
        return waited, stored

    waited, stored = asyncio.run(main())
    assert waited
    assert stored == {"data": {"seen": True}}


@pytest.mark.parametrize("dedupe", [True, False])
def test_one_process_runs_a_key_s_events_in_the_order_they_came(dedupe: bool) -> None:
    """Events of one key given at once (one getUpdates batch) run first in, first out.

    The claim alone let the waiting events retry in any order: a probe's form bot had
    17 of 20 forms filled out of order; aiogram's SimpleEventIsolation keeps the order.
    """

    async def main() -> tuple[list[str], list[str]]:
        svc, calls = AsyncStateService(), []
        dp, bot, session = build_dispatcher(svc, form_router(calls), dedupe=dedupe)
        texts = ["/start", "Ana", "33", "/start", "Bea", "41"]
        updates = [message_update(200 + i, text) for i, text in enumerate(texts)]
        await asyncio.gather(*(dp.feed_update(bot, u) for u in updates))
        return calls, session.texts

    calls, texts = asyncio.run(main())
    assert calls == ["start", "start"]
    assert texts == [
        "What is your name?",
        "How old are you?",
        "Ana is 33",
        "What is your name?",
        "How old are you?",
        "Bea is 41",
    ]
