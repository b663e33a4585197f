"""Scheduled messages: at a time, once across processes, moved, cancelled, erased, pruned."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import servers
from chatstate import AsyncStateService, RedisBackend, StateService
from chatstate.exceptions import ConfigurationError, UsageError
from chatstate.flow import AsyncRouter, Flow, Menu, MenuItem, Message, Router, Step, render_text
from chatstate.state import AsyncMemoryBackend, MemoryBackend, SqliteBackend
from fakes import START, FakeClock


class Survey(Flow):
    rating = Step("How was it, 1 to 5?", clean=int)


MENU = Menu("Menu", [MenuItem("help", "Help", handler=lambda ctx: "Help.")])


@pytest.fixture(scope="module")
def redis_server() -> Iterator[servers.Server]:
    """One throwaway redis-server for this module."""
    if servers.find_binary("redis") is None:
        pytest.skip("no redis-server on this machine")
    server = servers.start_server("redis")
    yield server
    server.cleanup()


@pytest.fixture(params=["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def make_service(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[[], StateService]]:
    """A factory of services over one store (each call: another "process")."""
    made: list[StateService] = []
    namespace = f"sched-{uuid.uuid4().hex[:8]}"
    memory = MemoryBackend()

    def make() -> StateService:
        if request.param == "memory":
            service = StateService(memory)
        elif request.param == "sqlite":
            service = StateService(SqliteBackend(tmp_path / "state.db"))
        else:
            url = request.getfixturevalue("redis_server").url
            service = StateService(RedisBackend.from_url(url, namespace=namespace))
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


def _texts(fired: list[tuple[str, list[Any]]]) -> list[tuple[str, list[str]]]:
    return sorted((user, [render_text(s) for s in replies]) for user, replies in fired)


def _router(service: StateService, clock: FakeClock) -> Router:
    return Router(service, main_menu=MENU, flows=[Survey], clock=clock)


def test_a_scheduled_message_fires_once_at_its_time_across_a_restart(
    make_service: Callable[[], StateService],
) -> None:
    """Stored in the document and indexed: a new router (process) fires it, once."""
    clock = FakeClock()
    _router(make_service(), clock).schedule("ana", "follow-up", START + 3 * 86400, "How is it?")
    restarted = _router(make_service(), clock)
    assert restarted.scheduled("ana") == {"follow-up": START + 3 * 86400}
    clock.advance(3 * 86400 - 1)
    assert restarted.due() == []
    clock.advance(1)
    other = _router(make_service(), clock)
    assert _texts(restarted.due() + other.due()) == [("ana", ["How is it?"])]
    assert restarted.due() == other.due() == []
    assert restarted.scheduled("ana") == {}


def test_moving_and_cancelling_by_key(make_service: Callable[[], StateService]) -> None:
    """The same key again moves it; cancel_scheduled removes it; an early entry fires nothing."""
    clock = FakeClock()
    router = _router(make_service(), clock)
    router.schedule("bo", "nudge", START + 60, "one")
    router.schedule("bo", "nudge", START + 600, "moved")  # later: the index entry stays early
    router.schedule("bo", "other", dt.datetime.fromtimestamp(START + 120, dt.UTC), "two")
    assert router.cancel_scheduled("bo", "other") is True
    assert router.cancel_scheduled("bo", "other") is False
    clock.advance(300)
    assert router.due() == []  # the early entry moved on to 600
    clock.advance(300)
    assert _texts(router.due()) == [("bo", ["moved"])]
    assert router.service.manager.backend.due(10**15) == []


def test_a_scheduled_message_may_start_a_flow() -> None:
    """start= begins the flow when it fires: its prompt follows the replies, in one write."""
    clock = FakeClock()
    router = _router(StateService(), clock)
    router.schedule("cy", "survey", START + 10, "Thanks for visiting!", start=Survey)
    clock.advance(10)
    assert _texts(router.due()) == [("cy", ["Thanks for visiting!", "How was it, 1 to 5?"])]
    assert router.service.get("cy")["flow"]["name"] == "survey"
    router.handle(Message("cy", text="5", message_id="m1"))
    assert "flow" not in router.service.get("cy")


def test_erase_removes_scheduled_messages_and_their_index_entry(
    make_service: Callable[[], StateService],
) -> None:
    """erase() takes the document (with its scheduled messages) and the index entry."""
    clock = FakeClock()
    router = _router(make_service(), clock)
    router.schedule("dee", "later", START + 60, "never")
    assert "deadline" in router.service.erase("dee")
    clock.advance(120)
    assert router.due() == []
    assert router.scheduled("dee") == {}


def test_an_entry_of_a_user_without_a_document_is_pruned(
    make_service: Callable[[], StateService],
) -> None:
    """A user whose document went (deleted, expired) leaves an entry that due() removes."""
    clock = FakeClock()
    router = _router(make_service(), clock)
    router.schedule("eve", "later", START + 60, "never")
    router.service.delete("eve")
    backend = router.service.manager.backend
    assert [u for u, _ in backend.due(10**15)] == ["eve"]
    clock.advance(120)
    assert router.due() == []
    assert backend.due(10**15) == [], "the stale entry was not pruned"


def test_ctx_schedule_is_written_with_the_step() -> None:
    """A handler schedules (and cancels) in the same write as the step."""

    def book(ctx: Any) -> str:
        ctx.schedule("call-back", START + 3600, "We call you back now.")
        return "Booked."

    def unbook(ctx: Any) -> str:
        ctx.cancel_scheduled("call-back")
        return "Cancelled."

    def touch(ctx: Any) -> None:
        ctx.update({"scheduled": {}})

    menu = Menu(
        "M",
        [
            MenuItem("book", "Book", handler=book),
            MenuItem("unbook", "Unbook", handler=unbook),
            MenuItem("touch", "Touch", handler=touch),
        ],
    )
    clock = FakeClock()
    router = Router(StateService(), main_menu=menu, clock=clock)
    router.handle(Message("fay", text="book", message_id="1"))
    assert router.scheduled("fay") == {"call-back": START + 3600}
    with pytest.raises(UsageError, match="router's own"):
        router.handle(Message("fay", text="touch", message_id="2"))
    router.handle(Message("fay", text="unbook", message_id="3"))
    clock.advance(3600)
    assert router.due() == []


def test_bad_arguments_and_options_are_refused() -> None:
    """A wrong call raises UsageError; a clashing field ConfigurationError."""
    router = _router(StateService(), FakeClock())
    for bad in [
        {"key": "", "at": START, "replies": "x"},
        {"key": "k" * 201, "at": START, "replies": "x"},
        {"key": "k", "at": dt.datetime(2030, 1, 1), "replies": "x"},  # noqa: DTZ001 - naive on purpose
        {"key": "k", "at": "tomorrow", "replies": "x"},
        {"key": "k", "at": 1e12, "replies": "x"},
        {"key": "k", "at": START, "replies": None},
        {"key": "k", "at": START, "replies": [3]},
        {"key": "k", "at": START, "replies": "x", "start": "unknown"},
    ]:
        with pytest.raises(UsageError):
            router.schedule("ana", **bad)
    with pytest.raises(ConfigurationError, match="six different fields"):
        Router(StateService(), main_menu=MENU, scheduled_field="outbox")


def test_the_async_twin() -> None:
    """AsyncRouter.schedule / scheduled / cancel_scheduled / due."""

    async def main() -> None:
        clock = FakeClock()
        store = MemoryBackend()
        router = AsyncRouter(
            AsyncStateService(AsyncMemoryBackend(store)), main_menu=MENU, clock=clock
        )
        await router.schedule("gus", "a", START + 5, ["one", "two"])
        await router.schedule("gus", "b", START + 50, "three")
        assert await router.scheduled("gus") == {"a": START + 5, "b": START + 50}
        assert await router.cancel_scheduled("gus", "b") is True
        clock.advance(60)
        assert _texts(await router.due()) == [("gus", ["one", "two"])]

    asyncio.run(main())
