"""run_due at scale: concurrency, a rate limit, identities, at-least-once; the sync twin."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from chatstate import AsyncStateService, StateService
from chatstate.exceptions import ConfigurationError, UsageError
from chatstate.flow import AsyncRouter, Menu, MenuItem, RateLimit, Router, render_text
from chatstate.state import AsyncMemoryBackend, MemoryBackend
from fakes import START, FakeClock

MENU = Menu("Menu", [MenuItem("help", "Help", handler=lambda ctx: "Help.")])


def test_a_rate_limit_spaces_messages_evenly() -> None:
    """Each message books 1/rate seconds after the previous; a send of 3 books 3."""
    clock = FakeClock(0.0)
    limit = RateLimit(10, clock=clock)
    assert [limit.reserve() for _ in range(3)] == [0.0, pytest.approx(0.1), pytest.approx(0.2)]
    clock.advance(1.0)
    assert limit.reserve(3) == 0.0
    assert limit.reserve() == pytest.approx(0.3)
    assert repr(limit) == "RateLimit(10)"
    for bad in (0, -1, True, "30", float("inf"), 1e9):
        with pytest.raises(ConfigurationError, match="messages a second"):
            RateLimit(bad)


def test_turns_given_back_come_sooner_and_keep_the_rate() -> None:
    """A turn booked for a send that will not happen (a busy user) is given back."""
    clock = FakeClock(0.0)
    limit = RateLimit(10, clock=clock)
    assert [limit.reserve() for _ in range(3)] == [0.0, pytest.approx(0.1), pytest.approx(0.2)]
    limit.give_back(2)  # the last two will not be sent
    assert limit.reserve() == pytest.approx(0.1)
    limit.give_back(0)
    assert limit.reserve() == pytest.approx(0.2)


def test_run_due_refuses_bad_arguments() -> None:
    """Wrong call-time arguments raise UsageError before anything runs."""
    router = AsyncRouter(AsyncStateService(), main_menu=MENU)

    async def send(user_id: str, replies: list[Any]) -> None:
        pass

    for bad in [
        {"concurrency": 0},
        {"concurrency": True},
        {"delivery": "exactly-once"},
        {"rate": 0},
        {"limit": 0},
    ]:
        with pytest.raises(UsageError):
            asyncio.run(router.run_due(send, **bad))
    plain = AsyncRouter(AsyncStateService(), main_menu=MENU, resend_after=None)
    with pytest.raises(UsageError, match="resend_after"):
        asyncio.run(plain.run_due(send, delivery="at-least-once"))
    sync = Router(StateService(), main_menu=MENU)
    with pytest.raises(UsageError, match="sync send"):
        sync.run_due(send)
    # A send that cannot take (user_id, replies): every send would fail, each only logged.
    for wrong in (lambda user_id: None, lambda user_id, replies, extra: None):
        with pytest.raises(UsageError, match=r"calls send\(user_id, replies\)"):
            sync.run_due(wrong)
        with pytest.raises(UsageError, match=r"calls send\(user_id, replies\)"):
            asyncio.run(router.run_due(wrong))


def _async_router(clock: FakeClock, **options: Any) -> AsyncRouter:
    store = MemoryBackend()
    return AsyncRouter(
        AsyncStateService(AsyncMemoryBackend(store)), main_menu=MENU, clock=clock, **options
    )


def test_sends_run_concurrently_within_the_bound_and_get_an_identity() -> None:
    """20 due messages, concurrency 4: at most 4 sends at once, each with its own identity."""

    async def main() -> None:
        clock = FakeClock()
        router = _async_router(clock)
        for n in range(20):
            await router.schedule(f"u{n}", "ping", START, f"hello {n}")
        running = peak = 0
        seen: list[str] = []
        done = asyncio.Event()

        async def send(user_id: str, replies: list[Any], identity: str) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            assert render_text(replies[0]) == f"hello {user_id[1:]}"
            seen.append(identity)
            if len(seen) == 20:
                done.set()

        task = asyncio.create_task(router.run_due(send, concurrency=4, interval=0.01))
        await asyncio.wait_for(done.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert 1 < peak <= 4
        assert sorted(seen) == sorted(f"u{n}:due:ping@{int(START * 1000)}" for n in range(20))

    asyncio.run(main())


def test_at_least_once_resends_a_failed_send_with_the_same_identity() -> None:
    """A send that fails leaves the replies stored: resent after resend_after, same identity."""

    async def main() -> None:
        clock = FakeClock()
        router = _async_router(clock, resend_after=30)
        await router.schedule("ana", "bill", START, "Your bill is ready.")
        calls: list[str] = []
        done, first = asyncio.Event(), asyncio.Event()

        async def send(user_id: str, replies: list[Any], *, identity: str) -> None:
            calls.append(identity)
            first.set()
            if len(calls) == 1:
                raise RuntimeError("the platform is down")
            done.set()

        task = asyncio.create_task(router.run_due(send, delivery="at-least-once", interval=0.01))
        await asyncio.wait_for(first.wait(), 30)
        await asyncio.sleep(0.05)
        assert len(calls) == 1  # not before resend_after
        assert await router.service.get("ana") != {}
        clock.advance(30)
        await asyncio.wait_for(done.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert calls == [calls[0], calls[0]]
        assert (await router.service.get("ana"))["outbox"] == {}

    asyncio.run(main())


def test_at_most_once_loses_a_failed_send() -> None:
    """The default: a failing send is logged and not retried."""

    async def main() -> None:
        clock = FakeClock()
        router = _async_router(clock, resend_after=30)
        await router.schedule("bo", "k", START, "once")
        calls: list[str] = []
        first = asyncio.Event()

        def send(user_id: str, replies: list[Any]) -> None:  # a sync send works too
            calls.append(user_id)
            first.set()
            raise RuntimeError("down")

        task = asyncio.create_task(router.run_due(send, interval=0.01))
        await asyncio.wait_for(first.wait(), 30)
        clock.advance(60)
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert calls == ["bo"]

    asyncio.run(main())


def test_the_sync_run_due_sends_on_threads_until_stopped() -> None:
    """Router.run_due: threads, a stop event, the same identities."""
    clock = FakeClock()
    router = Router(StateService(), main_menu=MENU, clock=clock)
    for n in range(12):
        router.schedule(f"s{n}", "k", START, "hi")
    stop = threading.Event()
    lock = threading.Lock()
    seen: list[str] = []

    def send(user_id: str, replies: list[Any], identity: str) -> None:
        with lock:
            seen.append(identity)
            if len(seen) == 12:
                stop.set()

    runner = threading.Thread(
        target=router.run_due, args=(send,), kwargs={"stop": stop, "interval": 0.01, "rate": 1e4}
    )
    runner.start()
    runner.join(30)
    assert not runner.is_alive()
    assert len(seen) == len(set(seen)) == 12
    assert router.due() == []
