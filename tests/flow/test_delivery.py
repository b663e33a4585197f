"""Replies kept until acknowledged: deliver(), the redelivery of unsent replies, undelivered()."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from chatstate import AsyncMemoryBackend, AsyncStateService, MemoryBackend, StateService
from chatstate.exceptions import UsageError
from chatstate.flow import (
    AsyncDelivery,
    AsyncRouter,
    Delivery,
    Flow,
    Menu,
    MenuItem,
    Message,
    Reaction,
    Router,
    Step,
    Text,
    render_text,
)

RUNS: Counter[str] = Counter()


class Signup(Flow):
    """A name, then a welcome that counts how often it ran."""

    who = Step("Your name?")

    def on_complete(self, data: dict[str, Any]) -> str:
        RUNS["welcome"] += 1
        return f"Welcome, {data['who']}."


MENU = Menu("Menu", [MenuItem("signup", "Sign up", flow=Signup)])
T0 = 1_700_000_000.0


class SendError(Exception):
    """The platform refused a send."""


def _texts(screens: list[Any]) -> list[str]:
    return [render_text(s) for s in screens]


def _msg(text: str, mid: str, at: float = T0) -> Message:
    return Message("ann", text=text, message_id=mid, timestamp=at)


def _sync_router(**options: Any) -> tuple[Router, StateService]:
    svc = StateService(MemoryBackend())
    return Router(svc, main_menu=MENU, clock=lambda: T0, **options), svc


def test_an_acknowledged_message_stays_silent_on_redelivery() -> None:
    """deliver() returns the replies once; after the block, a redelivery has none."""
    router, svc = _sync_router()
    with router.deliver(_msg("signup", "m1")) as delivery:
        assert isinstance(delivery, Delivery)
        assert _texts(delivery.replies) == ["Your name?"]
        assert not delivery.resent
    assert delivery.acknowledged
    assert svc.get("ann")["outbox"] == {}  # the stored replies were dropped
    with router.deliver(_msg("signup", "m1")) as again:
        assert again.replies == []


def test_a_failed_send_keeps_the_replies_for_the_redelivery() -> None:
    """An exception in the block leaves the replies stored; the redelivery sends them, runs nothing."""
    router, svc = _sync_router()
    router.handle(_msg("signup", "m1"))
    RUNS.clear()
    delivery = router.deliver(_msg("Ann", "m2"))
    with pytest.raises(SendError), delivery:
        raise SendError
    assert _texts(delivery.replies) == ["Welcome, Ann."]
    assert not delivery.acknowledged
    assert RUNS["welcome"] == 1
    assert list(svc.get("ann")["outbox"]) != []  # kept, and the user is free
    with router.deliver(_msg("Ann", "m2")) as again:
        assert again.resent
        assert _texts(again.replies) == ["Welcome, Ann."]
    assert RUNS["welcome"] == 1  # the step did not run again
    assert svc.get("ann")["outbox"] == {}
    with router.deliver(_msg("Ann", "m2")) as third:
        assert third.replies == []


def test_a_dropped_delivery_is_resent_after_its_lease() -> None:
    """A handler that committed and never acknowledged (a dead process) is resent after the lease."""
    router, _svc = _sync_router(lease=0.2)
    delivery = router.deliver(_msg("signup", "m1")).start()
    assert _texts(delivery.replies) == ["Your name?"]
    delivery._opened.claim._claim._beat.stop()  # the process "dies": no heartbeat, no ack
    with router.deliver(_msg("signup", "m1")) as again:  # waits for the lease, then resends
        assert again.resent
        assert _texts(again.replies) == ["Your name?"]


def test_a_copy_waits_for_the_holder_and_then_sends_nothing() -> None:
    """A redelivery while the first copy is being sent waits for it; acknowledged, it sends nothing."""

    async def main() -> None:
        svc = AsyncStateService(AsyncMemoryBackend())
        router = AsyncRouter(svc, main_menu=MENU, clock=lambda: T0, wait=5)
        order: list[str] = []
        first = await router.deliver(_msg("signup", "m1")).start()

        async def copy() -> list[Any]:
            async with router.deliver(_msg("signup", "m1")) as d:
                order.append("copy")
                return d.replies

        task = asyncio.create_task(copy())
        await asyncio.sleep(0.05)
        assert order == []  # still waiting for the holder
        order.append("sent")
        await first.ack()
        assert await task == []
        assert order == ["sent", "copy"]

    asyncio.run(main())


def test_undelivered_lists_replies_older_than_resend_after() -> None:
    """undelivered() finds stored replies past resend_after, once; acknowledged they are gone."""

    async def main() -> None:
        svc = AsyncStateService(AsyncMemoryBackend())
        router = AsyncRouter(svc, main_menu=MENU, clock=lambda: T0, resend_after=30)
        with pytest.raises(SendError):
            async with router.deliver(_msg("signup", "m1")):
                raise SendError
        assert await router.undelivered(now=T0 + 10) == []  # not yet
        found = await router.undelivered(now=T0 + 31)
        assert [type(d) for d in found] == [AsyncDelivery]
        async with found[0] as delivery:
            assert delivery.user_id == "ann"
            assert _texts(delivery.replies) == ["Your name?"]
        assert await router.undelivered(now=T0 + 100) == []
        async with router.deliver(_msg("signup", "m1")) as redelivered:
            assert redelivered.replies == []  # sent by the sweeper: silent

    asyncio.run(main())


def test_run_due_resends_and_acknowledges() -> None:
    """run_due() sends unacknowledged replies with the same send() and acknowledges them."""

    async def main() -> None:
        now = [T0]
        svc = AsyncStateService(AsyncMemoryBackend())
        router = AsyncRouter(svc, main_menu=MENU, clock=lambda: now[0], resend_after=30)
        with pytest.raises(SendError):
            async with router.deliver(_msg("signup", "m1")):
                raise SendError
        now[0] = T0 + 40
        sent: list[tuple[str, list[str]]] = []

        async def send(user_id: str, replies: list[Any]) -> None:
            sent.append((user_id, _texts(replies)))

        task = asyncio.create_task(router.run_due(send, interval=0.01))
        for _ in range(200):
            if sent:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sent == [("ann", ["Your name?"])]
        assert (await svc.get("ann"))["outbox"] == {}

    asyncio.run(main())


def test_a_message_with_no_reply_holds_nothing() -> None:
    """A message whose handling has no replies stores none and lets the user go at once."""
    router, svc = _sync_router()
    reaction = Message("ann", message_id="m1", timestamp=T0, reaction=Reaction("w.1", "+1"))
    with router.deliver(reaction) as d:
        assert d.replies == []
    assert "outbox" not in svc.get("ann")
    with router.deliver(_msg("x", "m2")) as d2:  # not held: the next message runs at once
        assert d2.replies  # the menu


def test_deliver_refuses_what_is_not_a_message() -> None:
    """A wrong argument is a clear UsageError when the delivery starts."""
    router, _ = _sync_router()
    with pytest.raises(UsageError, match="Message"), router.deliver("hello"):  # type: ignore[arg-type]
        pass


def test_the_outbox_drops_entries_older_than_the_dedupe_window() -> None:
    """Stored replies live as long as their message's id: older ones go at the next commit."""
    svc = StateService(MemoryBackend(), dedupe_window=60)
    router = Router(svc, main_menu=MENU, clock=lambda: T0)
    with pytest.raises(SendError), router.deliver(_msg("signup", "m1")):
        raise SendError
    with router.deliver(_msg("hi", "m2", at=T0 + 61)):
        pass
    assert svc.get("ann")["outbox"] == {}


def test_screens_survive_the_store() -> None:
    """Every kind of screen comes back from the outbox equal to what was stored."""
    from chatstate.flow import Button, Buttons, ListScreen, Row, Section
    from chatstate.flow._screens import screen_from_json, screen_to_json

    screens = [
        Text("hi"),
        Buttons("pick", [Button("a", "A"), Button("b", "B")], header="H", footer="F"),
        ListScreen("list", "Open", [Section([Row("r", "R", "d"), Row("s", "S")], "T")]),
    ]
    for screen in screens:
        assert screen_from_json(screen_to_json(screen)) == screen


def test_an_abandoned_delivery_cannot_be_acknowledged() -> None:
    """ack() after abandon() is a UsageError (the replies stay stored); ack() before start too."""
    router, svc = _sync_router()
    with pytest.raises(UsageError, match="not started"):
        router.deliver(_msg("signup", "m0")).ack()
    delivery = router.deliver(_msg("signup", "m1")).start()
    delivery.abandon()
    with pytest.raises(UsageError, match="abandoned"):
        delivery.ack()
    assert list(svc.get("ann")["outbox"])  # still stored for the redelivery
    again = router.deliver(_msg("signup", "m1")).start()
    again.ack()
    again.ack()  # twice: nothing more
    assert again.acknowledged
    assert svc.get("ann")["outbox"] == {}


def test_listing_undelivered_replies_holds_no_user() -> None:
    """undelivered() claims nobody: a user's next message runs at once; entering claims."""
    svc = StateService(MemoryBackend())
    router = Router(svc, main_menu=MENU, clock=lambda: T0, wait=0.01)
    with pytest.raises(SendError), router.deliver(_msg("signup", "m1")):
        raise SendError
    (listed,) = router.undelivered(now=T0 + 31)
    with router.deliver(_msg("hi", "m2")) as next_message:  # not busy: nothing is held
        assert next_message.replies
    with listed as delivery:  # the stored replies are still there: sent now
        assert _texts(delivery.replies) == ["Your name?"]
    assert router.undelivered(now=T0 + 100) == []


def test_a_messages_repr_hides_what_was_typed() -> None:
    """A Message's repr shows the text's length, never the text (it may be a PIN)."""
    shown = repr(Message("ann", text="483917", message_id="w1"))
    assert "483917" not in shown
    assert "<6 characters>" in shown
