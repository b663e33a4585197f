"""Broadcasts: each user once, resumable by id, with progress; over listed users too."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest

from chatstate import AsyncStateService, StateService
from chatstate.exceptions import InvalidUserIdError, UsageError
from chatstate.flow import (
    AsyncRouter,
    BroadcastProgress,
    Menu,
    MenuItem,
    Message,
    RateLimit,
    Router,
    Screen,
    render_text,
)
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
    seen: list[tuple[int, bool]] = []

    def send(user_id: str, replies: list[Any], identity: str) -> None:
        sent.append((user_id, render_text(replies[0]), identity))

    progress = router.broadcast(
        "promo-1",
        "Spring sale!",
        send,
        concurrency=3,
        on_progress=lambda p: seen.append((p.handled, p.done)),
    )
    assert (progress.total, progress.sent, progress.skipped, progress.failed) == (5, 5, 0, 0)
    assert progress.done
    # After each user, then once more with done (the probe's last call said done=False).
    assert sorted(seen[:-1]) == [(n, False) for n in range(1, 6)]
    assert seen[-1] == (5, True)
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
        assert sorted(counts) == [1, 2, 3, 4, 4]  # and once more, done
        return result

    assert asyncio.run(main()).sent == 4


class _Gate(RateLimit):
    """A rate that lets the first send go and holds the rest until opened (no clock)."""

    def __init__(self) -> None:
        super().__init__(1)
        self.passed = 0
        self.held = asyncio.Event()
        self.opened = asyncio.Event()

    async def acquire(self, messages: int = 1) -> None:
        if self.passed:
            self.held.set()
            await self.opened.wait()
        self.passed += 1


def test_a_user_whose_send_waits_for_the_rate_can_message_the_bot() -> None:
    """The rate's turn is taken before the user is claimed, not while they are held.

    A probe with rate=1 and concurrency=16 found users held for up to 16 s, their own
    messages failing with UserBusyError after the router's wait.
    """

    async def main() -> tuple[list[Screen], list[str], BroadcastProgress]:
        service = AsyncStateService()
        for user in ("u0", "u1"):
            await service.update(user, {"plan": "free"})
        router = AsyncRouter(service, main_menu=MENU, clock=FakeClock(), wait=0.2)
        got: list[str] = []
        gate = _Gate()

        async def send(user_id: str, replies: list[Any]) -> None:
            got.append(user_id)

        running = asyncio.create_task(
            router.broadcast("b", "hi", send, users=["u0", "u1"], rate=gate)
        )
        await gate.held.wait()  # u1's send waits for its turn
        answer = await router.handle(Message("u1", text="hi", message_id="m1"))
        gate.opened.set()
        return answer, got, await running

    answer, got, progress = asyncio.run(main())
    assert [render_text(s) for s in answer] == ["Menu\n[Help]"]
    assert sorted(got) == ["u0", "u1"]
    assert (progress.sent, progress.failed) == (2, 0)


def test_bad_broadcast_arguments_are_refused_before_anyone_is_sent_anything() -> None:
    """A send or on_progress of the wrong shape, a bad id in a given list: errors up front."""
    router = Router(StateService(), main_menu=MENU, clock=FakeClock())
    sent: list[str] = []

    def send(user_id: str, replies: list[Any]) -> None:
        sent.append(user_id)

    with pytest.raises(UsageError, match="on_progress"):
        router.broadcast("b", "hi", send, users=["a"], on_progress=5)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="on_progress"):
        router.broadcast("b", "hi", send, users=["a"], on_progress=lambda: None)
    with pytest.raises(UsageError, match=r"send\(user_id, replies\)"):
        router.broadcast("b", "hi", lambda user_id: None, users=["a"])
    with pytest.raises(UsageError, match=r"send\(user_id, replies\)"):
        router.broadcast("b", "hi", lambda u, r, extra: None, users=["a"])
    for bad in ([5], [""], ["a", None]):
        with pytest.raises(InvalidUserIdError, match="broadcast users"):
            router.broadcast("b", "hi", send, users=bad)  # type: ignore[arg-type]
    assert sent == []
    assert router.service.get("a") == {}


def test_a_sync_send_that_returns_a_coroutine_sends_nothing_and_keeps_the_replies() -> None:
    """On the sync Router an async send wrapped in a lambda is a failed send, not a silent one."""
    service = StateService()
    service.update("a", {"plan": "free"})
    router = Router(service, main_menu=MENU, clock=FakeClock())

    async def send_async(user_id: str, replies: list[Any]) -> None:
        raise AssertionError("never awaited")

    def send(user_id: str, replies: list[Any]) -> Any:  # sync, but returns a coroutine
        return send_async(user_id, replies)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        progress = router.broadcast("b", "hi", send, users=["a"])
    assert (progress.sent, progress.failed) == (0, 1)
    assert "broadcast:b" in service.get("a")["outbox"]  # kept for the resend
