"""Broadcasts: each user once, resumable by id, with progress; over listed users too."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from chatstate import AsyncStateService, StateService
from chatstate.exceptions import UsageError
from chatstate.flow import AsyncRouter, BroadcastProgress, Menu, MenuItem, Router, render_text
from chatstate.state import AsyncMemoryBackend, MemoryBackend
from fakes import FakeClock

MENU = Menu("Menu", [MenuItem("help", "Help", handler=lambda _ctx: "Help.")])


def test_a_broadcast_reaches_each_listed_user_once_with_progress() -> None:
    """users= omitted: every user the backend lists; a second run skips them all."""
    service = StateService()
    for n in range(5):
        service.update(f"u{n}", {"plan": "free"})
    router = Router(service, main_menu=MENU, clock=FakeClock())
    sent: list[tuple[str, str, str]] = []
    seen: list[int] = []

    def send(user_id: str, replies: list[Any], identity: str) -> None:
        sent.append((user_id, render_text(replies[0]), identity))

    progress = router.broadcast(
        "promo-1", "Spring sale!", send, concurrency=3, on_progress=lambda p: seen.append(p.handled)
    )
    assert (progress.total, progress.sent, progress.skipped, progress.failed) == (5, 5, 0, 0)
    assert progress.done
    assert sorted(seen) == [1, 2, 3, 4, 5]
    assert sorted(sent) == [(f"u{n}", "Spring sale!", f"u{n}:broadcast:promo-1") for n in range(5)]
    again = router.broadcast("promo-1", "Spring sale!", send)
    assert (again.sent, again.skipped) == (0, 5)
    assert len(sent) == 5
    assert service.get("u0")["outbox"] == {}


def test_a_failed_send_is_retried_by_running_it_again_with_the_same_identity() -> None:
    """Replies of a failed send stay stored: the rerun sends them (same identity), skips the rest."""
    router = Router(StateService(), main_menu=MENU, clock=FakeClock())
    calls: list[str] = []

    def flaky(user_id: str, replies: list[Any], identity: str) -> None:
        calls.append(identity)
        if user_id == "b" and calls.count(identity) == 1:
            raise RuntimeError("platform down")

    first = router.broadcast("news", ["Hello", "World"], flaky, users=["a", "b", "c", "a"])
    assert (first.total, first.sent, first.failed) == (3, 2, 1)
    second = router.broadcast(
        "news", ["ignored: the stored replies are sent"], flaky, users=list("abc")
    )
    assert (second.sent, second.skipped, second.failed) == (1, 2, 0)
    assert calls.count("b:broadcast:news") == 2


def test_broadcast_refuses_bad_arguments() -> None:
    """A bad id, no replies, a bad concurrency or users raise UsageError."""
    router = Router(StateService(), main_menu=MENU)

    def send(user_id: str, replies: list[Any]) -> None:
        pass

    for args, kwargs in [
        (("", "x", send), {}),
        (("id", None, send), {}),
        (("id", "x", "send"), {}),
        (("id", "x", send), {"concurrency": 0}),
        (("id", "x", send), {"users": 3}),
        (("id", "x", send), {"rate": -1}),
    ]:
        with pytest.raises(UsageError):
            router.broadcast(*args, **kwargs)


def test_the_async_broadcast() -> None:
    """AsyncRouter.broadcast over the listed users, an async send and an async progress hook."""

    async def main() -> BroadcastProgress:
        store = MemoryBackend()
        service = AsyncStateService(AsyncMemoryBackend(store))
        for n in range(4):
            await service.update(f"v{n}", {"x": 1})
        router = AsyncRouter(service, main_menu=MENU, clock=FakeClock())
        got: list[str] = []
        counts: list[int] = []

        async def send(user_id: str, replies: list[Any]) -> None:
            await asyncio.sleep(0)
            got.append(user_id)

        async def progress(p: BroadcastProgress) -> None:
            counts.append(p.sent)

        result = await router.broadcast("b", "hi", send, prefix="v", on_progress=progress)
        assert sorted(got) == ["v0", "v1", "v2", "v3"]
        assert sorted(counts) == [1, 2, 3, 4]
        return result

    assert asyncio.run(main()).sent == 4
