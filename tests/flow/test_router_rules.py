"""The router's rules, one per test: routing order, flow commands, deadlines.

Which rule wins for a message (greeting, active flow, menu item, default), what
each flow command stores and reports to observers, and the exact edges of
reminders and timeouts (``Router.due``).
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest

from chatstate import StateService, observe
from chatstate.exceptions import UsageError
from chatstate.flow import (
    Flow,
    Menu,
    MenuItem,
    Message,
    Router,
    Step,
    render_text,
)
from chatstate.flow._message import Media
from chatstate.flow._router import DEADLINE_PURPOSE, ROUTER_PURPOSE
from chatstate.testing import Conversation
from fakes import START, Fake, FakeClock


def _number(answer: str) -> int:
    if not answer.isdigit():
        from chatstate.flow import Invalid

        raise Invalid("A number, please.")
    return int(answer)


class Order(Flow):
    """Three steps; the second retries once, then restarts the flow."""

    timeout = timedelta(minutes=30)
    reminder = timedelta(minutes=5)
    item = Step("Which item?", next="count")
    count = Step("How many?", clean=_number, next="confirm", max_attempts=2, on_too_many="restart")
    confirm = Step("Confirm?", clean=_number)

    def on_cancel(self, data: dict[str, Any]) -> str:
        assert self.ctx is not None
        return f"Cancelled {self.ctx.flow} at {self.ctx.step}."

    def on_complete(self, data: dict[str, Any]) -> str:
        return f"Done: {data}"


class Strict(Flow):
    """One step that cancels after two invalid answers; no deadlines."""

    age = Step("Your age?", clean=_number, max_attempts=2, next="nick")
    nick = Step("Your name?")


class Sub(Flow):
    start_at = Step("Sub flow?")


MENU = Menu(
    "Main",
    [
        MenuItem("order", "Order", flow=Order),
        MenuItem("strict", "Strict", flow=Strict),
        MenuItem("more", "More", submenu=Menu("More things", [MenuItem("sub", "Sub", flow=Sub)])),
        MenuItem("help", "Help", handler=lambda ctx: "Helping."),
    ],
)


class Steps(observe.Observer):
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def flow_step(self, flow: str, step: str, outcome: str) -> None:
        self.seen.append((flow, step, outcome))


@pytest.fixture
def steps():
    recorder = observe.add_observer(Steps())
    yield recorder
    observe.remove_observer(recorder)


def _router(clock: FakeClock | None = None, **options: Any) -> Router:
    return Router(StateService(), main_menu=MENU, clock=clock or FakeClock(), **options)


def _chat(router: Router | None = None) -> Conversation:
    return Conversation(router or _router(), "ana")


# -- routing order in _plan -------------------------------------------------------------


def test_a_greeting_drops_the_active_flow_and_shows_the_menu() -> None:
    chat = _chat()
    chat.send("order")
    assert "flow" in chat.state
    assert chat.send("hi") == ["Main\n* Order\n* Strict\n* More\n* Help"]
    assert "flow" not in chat.state


def test_a_caption_is_not_a_command() -> None:
    """A photo captioned "hi" or "cancel" neither greets nor cancels: only text does."""
    chat = _chat()
    chat.send("order")
    photo = Message("ana", text="hi", kind="image", media=Media("m1"))
    chat.send_message(photo)
    assert chat.state["flow"]["step"] == "item"
    chat.send_message(Message("ana", text="cancel", kind="image", media=Media("m2")))
    assert chat.state["flow"]["step"] == "item"


def test_an_unknown_stored_flow_is_dropped_with_the_menu() -> None:
    chat = _chat()
    chat.router.service.update("ana", {"flow": {"name": "Gone", "step": "x"}})
    assert chat.send("whatever") == ["Main\n* Order\n* Strict\n* More\n* Help"]
    assert "flow" not in chat.state


def test_menu_routing_leaves_a_flow_field_it_cannot_read_alone() -> None:
    """Without an active flow (a non-object is none), menu answers write no flow field."""
    chat = _chat()
    chat.router.service.update("ana", {"flow": 7})
    chat.send("nothing on the menu")
    chat.send("help")
    chat.send("more")
    chat.send_message(Message("ana", kind="reaction", reaction=_reaction()))
    chat.send_message(Message("ana", kind="image", media=Media("m1")))
    assert chat.state["flow"] == 7


def _reaction() -> Any:
    from chatstate.flow._message import Reaction

    return Reaction(message_id="m0", emoji="x")


def test_a_submenu_item_shows_the_submenu() -> None:
    chat = _chat()
    assert chat.send("more") == ["More things\n[Sub]"]
    assert "flow" not in chat.state


def test_idle_exactly_the_timeout_is_not_expired_at_the_next_message() -> None:
    clock = FakeClock()
    chat = _chat(_router(clock))
    chat.send_message(Message("ana", text="order", message_id="1", timestamp=START))
    late = START + 30 * 60
    chat.send_message(Message("ana", text="tea", message_id="2", timestamp=late))
    assert chat.texts == ["How many?"]
    chat.send_message(Message("ana", text="2", message_id="3", timestamp=late + 30 * 60 + 0.01))
    assert chat.texts[0] == "That conversation timed out; let's start again."


# -- flow state and commands in _begin / _continue -------------------------------------


def test_a_started_flow_is_stored_in_full() -> None:
    chat = _chat()
    chat.send_message(Message("ana", text="order", message_id="1", timestamp=START))
    assert chat.state["flow"] == {
        "name": "order", "step": "item", "data": {}, "history": [], "attempts": 0, "at": START
    }  # fmt: skip


def test_observers_see_every_outcome_with_its_flow_and_step(steps: Steps) -> None:
    chat = _chat()
    chat.send("order")
    chat.send("tea")  # answered item
    chat.send("x")  # invalid count (1 of 2)
    chat.send("back")  # back to item
    chat.send("coffee")  # answered item
    chat.send("restart")  # restarted, at the first step
    chat.send("tea")
    chat.send("x")
    assert chat.send("y") == ["A number, please.", "Which item?"]  # too many: restarted
    assert chat.state["flow"]["step"] == "item"
    assert chat.state["flow"]["data"] == {}
    chat.send("tea")
    chat.send("3")
    chat.send("1")  # completed at confirm
    chat.send("strict")
    chat.send("a")
    assert chat.send("b") == ["A number, please.", "Cancelled."]  # too many: cancelled
    chat.send("strict")
    assert chat.send("cancel") == ["Cancelled."]
    assert steps.seen == [
        ("order", "item", "started"),
        ("order", "item", "answered"),
        ("order", "count", "invalid"),
        ("order", "item", "back"),
        ("order", "item", "answered"),
        ("order", "item", "restarted"),
        ("order", "item", "answered"),
        ("order", "count", "invalid"),
        ("order", "count", "restarted"),
        ("order", "item", "answered"),
        ("order", "count", "answered"),
        ("order", "confirm", "completed"),
        ("strict", "age", "started"),
        ("strict", "age", "invalid"),
        ("strict", "age", "cancelled"),
        ("strict", "age", "started"),
        ("strict", "age", "cancelled"),
    ]


def test_a_wrong_kind_of_answer_is_reported_as_invalid(steps: Steps) -> None:
    chat = _chat()
    chat.send("order")
    chat.send_message(Message("ana", kind="image", media=Media("m1")))
    assert steps.seen[-1] == ("order", "item", "invalid")


def test_hooks_see_the_flow_and_step() -> None:
    chat = _chat()
    chat.send("order")
    chat.send("tea")
    assert chat.send("cancel") == ["Cancelled order at count."]


def test_attempts_start_at_zero_and_reset_on_each_move() -> None:
    chat = _chat()
    chat.send("order")
    chat.send("x")  # item takes anything
    chat.send("y")  # invalid count: 1 of 2
    assert chat.state["flow"]["attempts"] == 1
    chat.send("2")
    assert chat.state["flow"] == {**chat.state["flow"], "step": "confirm", "attempts": 0}
    chat.send("hi")
    chat.send("strict")
    assert chat.send("a") == ["A number, please.", "Your age?"]  # the first of two
    assert chat.state["flow"]["step"] == "age"


def test_a_stored_flow_without_attempts_or_data_counts_from_zero() -> None:
    chat = _chat()
    chat.router.service.update("ana", {"flow": {"name": "strict", "step": "age", "history": []}})
    assert chat.send("a") == ["A number, please.", "Your age?"]
    assert chat.state["flow"]["attempts"] == 1


def test_back_to_a_step_whose_answer_is_missing() -> None:
    """``history`` names a step whose data is gone (a renamed key): back still works."""
    chat = _chat()
    stored = {"name": "order", "step": "count", "history": ["item"], "data": {}, "attempts": 0}
    chat.router.service.update("ana", {"flow": stored})
    assert chat.send("back") == ["Which item?"]
    assert chat.state["flow"]["step"] == "item"


def test_an_invalid_answer_restarts_the_idle_clock_and_clears_the_reminder() -> None:
    clock = FakeClock()
    router = _router(clock)
    chat = _chat(router)
    chat.send_message(Message("ana", text="order", message_id="1", timestamp=START))
    chat.send_message(Message("ana", text="tea", message_id="2", timestamp=START))
    clock.now = START + 5 * 60
    assert router.due()  # reminded
    assert chat.state["flow"]["reminded"] is True
    clock.now = START + 20 * 60
    chat.send_message(Message("ana", text="x", message_id="3", timestamp=clock.now))
    assert chat.state["flow"]["at"] == clock.now
    assert "reminded" not in chat.state["flow"]
    clock.now = START + 45 * 60  # 25 minutes after the invalid answer: reminded again
    assert next(render_text(s) for _, r in router.due() for s in r) == "Are you still there?"


def test_an_answer_clears_the_reminder() -> None:
    clock = FakeClock()
    router = _router(clock)
    chat = _chat(router)
    chat.send("order")
    clock.now += 5 * 60
    assert router.due()
    chat.send("tea")
    assert "reminded" not in chat.state["flow"]


# -- handle_with ------------------------------------------------------------------------


def test_handle_names_what_it_was_given() -> None:
    with pytest.raises(UsageError, match="not int"):
        _router().handle(3)  # type: ignore[arg-type]


def test_the_message_claim_is_kept_under_the_router_purpose_and_fingerprint() -> None:
    router = _router()
    message = Message("ana", text="order", message_id="m1", timestamp=START)
    router.handle(message)
    again = router.service.claim(
        "ana", "m1", purpose=ROUTER_PURPOSE, fingerprint=message.fingerprint
    )
    assert again.duplicate


def test_a_flow_started_by_a_hook_is_stamped_with_the_message_time() -> None:
    class Chain(Flow):
        only = Step("First?")

        def on_complete(self, data: dict[str, Any], ctx: Any) -> str:
            ctx.start(Order)
            return "Next:"

    menu = Menu("M", [MenuItem("chain", "Chain", flow=Chain), MenuItem("order", "O", flow=Order)])
    chat = Conversation(Router(StateService(), main_menu=menu), "ana")
    chat.send_message(Message("ana", text="chain", message_id="1", timestamp=START))
    chat.send_message(Message("ana", text="x", message_id="2", timestamp=START + 1))
    assert chat.texts == ["Next:", "Which item?"]
    assert chat.state["flow"]["at"] == START + 1


class _Claim:
    def __init__(self, status: str) -> None:
        self.duplicate = False
        self.data: dict[str, Any] = {}
        self.status = status

    def update(self, patch: Any) -> None:
        pass

    async def commit(self) -> Any:
        class Outcome:
            status = self.status

        return Outcome()

    async def release(self) -> None:
        pass


class _State:
    def __init__(self, status: str) -> None:
        self.status = status

    async def claim(self, *args: Any, **kwargs: Any) -> _Claim:
        return _Claim(self.status)


def test_a_commit_found_duplicate_sends_nothing() -> None:
    """A handler that took over a lapsed claim answered already: no second reply."""
    router = _router()
    message = Message("ana", text="help", message_id="m1")
    assert asyncio.run(router.handle_with(_State("duplicate"), message)) == []
    assert asyncio.run(router.handle_with(_State("applied"), message))


# -- deadlines: _next_deadline, _due_event, _timeout_ms, _fire, due_with -------------------


class Nudge(Flow):
    """A reminder and no timeout."""

    reminder = timedelta(minutes=5)
    only = Step("Still?")


class Watched(Flow):
    reminder = timedelta(minutes=5)
    timeout = timedelta(minutes=30)
    only = Step("Watched?")
    seen: list[Any] = []  # noqa: RUF012 - a test's record

    def on_timeout(self, data: dict[str, Any], ctx: Any) -> str:
        assert self.ctx is ctx
        ctx.start(Nudge)
        return "Timed out; nudging."

    def on_reminder(self, data: dict[str, Any], ctx: Any) -> str:
        assert self.ctx is ctx
        if data.get("fail"):
            raise RuntimeError("boom")
        Watched.seen.append((dict(data), ctx.message.message_id, ctx.message.timestamp))
        return f"Reminded at {ctx.step}."


DEADLINE_MENU = Menu(
    "Menu",
    [
        MenuItem("order", "Order", flow=Order),
        MenuItem("nudge", "Nudge", flow=Nudge),
        MenuItem("watched", "Watched", flow=Watched),
    ],
)


def _deadline_router(clock: FakeClock) -> Router:
    return Router(StateService(), main_menu=DEADLINE_MENU, clock=clock)


def _start(router: Router, user: str, flow: str) -> None:
    router.handle(Message(user, text=flow, message_id=f"{user}-start", timestamp=START))


def _index(router: Router) -> list[tuple[str, int]]:
    return [(u, int(t)) for u, t in router.service.manager.backend.due(10**15, 100)]


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def test_a_reminder_without_a_timeout_fires_once_and_leaves_nothing_due() -> None:
    clock = FakeClock()
    router = _deadline_router(clock)
    _start(router, "ana", "nudge")
    clock.now = START + 5 * 60
    assert [(u, [render_text(s) for s in r]) for u, r in router.due()] == [
        ("ana", ["Are you still there?", "Still?"])
    ]
    assert _index(router) == []


def test_a_late_collection_exactly_at_the_timeout_sends_the_timeout() -> None:
    """Collected at the first timed-out millisecond, with the reminder never sent."""
    router = _deadline_router(FakeClock())
    _start(router, "ana", "order")
    fired = router.due(now=START + 30 * 60 + 0.001)
    texts = [render_text(s) for _, r in fired for s in r]
    assert texts[0] == "That conversation timed out; let's start again."
    assert _index(router) == []


def test_a_flow_without_a_time_has_no_deadline_and_its_entry_is_dropped() -> None:
    router = _deadline_router(FakeClock())
    router.service.update("ana", {"flow": {"name": "order", "step": "item", "at": "never"}})
    router.service.manager.backend.schedule("ana", _ms(START), earlier_only=False)
    assert router.due(now=START + 3600) == []
    assert _index(router) == []


def test_an_early_entry_is_moved_to_the_real_deadline() -> None:
    router = _deadline_router(FakeClock())
    _start(router, "ana", "order")
    backend = router.service.manager.backend
    backend.schedule("ana", _ms(START + 60), earlier_only=True)
    assert router.due(now=START + 60) == []
    assert _index(router) == [("ana", _ms(START + 5 * 60))]


def test_a_fired_deadline_claims_its_own_op_id() -> None:
    clock = FakeClock()
    router = _deadline_router(clock)
    _start(router, "ana", "order")
    router.due(now=START + 5 * 60)
    at_ms = _ms(START + 5 * 60)
    assert router.service.claim("ana", f"deadline-{at_ms}", purpose=DEADLINE_PURPOSE).duplicate


def test_a_reminder_hook_sees_the_data_the_deadline_and_the_time(steps: Steps) -> None:
    Watched.seen.clear()
    router = _deadline_router(FakeClock())
    _start(router, "ana", "watched")
    router.service.update("ana", {"flow": {"data": {"k": 1}}})
    now = START + 5 * 60 + 1
    fired = router.due(now=now)
    assert [render_text(s) for _, r in fired for s in r] == ["Reminded at only."]
    assert Watched.seen == [({"k": 1}, f"deadline-{_ms(START + 5 * 60)}", now)]
    late = START + 31 * 60
    assert [render_text(s) for _, r in router.due(now=late) for s in r] == [
        "Timed out; nudging.",
        "Still?",
    ]
    assert steps.seen[-2:] == [("watched", "only", "reminded"), ("watched", "only", "expired")]
    assert router.service.get("ana")["flow"]["at"] == late  # the hook's flow starts now
    assert _index(router) == [("ana", _ms(late + 5 * 60))]


def test_due_skips_a_busy_user_at_once_and_goes_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    router = _deadline_router(FakeClock())
    _start(router, "ana", "order")
    _start(router, "bo", "order")
    claim = router.service.claim("ana", "in-flight", lease=30)
    naps: list[float] = []
    monkeypatch.setattr(time, "sleep", naps.append)
    fired = router.due(now=START + 5 * 60)
    monkeypatch.undo()
    assert naps == [], "due() waited for a busy user"
    claim.release()
    assert [u for u, _ in fired] == ["bo"]


def test_a_failing_user_is_logged_stays_due_and_the_others_fire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    router = _deadline_router(FakeClock())
    _start(router, "ana", "watched")
    _start(router, "bo", "watched")
    router.service.update("ana", {"flow": {"data": {"fail": True}}})
    fired = router.due(now=START + 5 * 60)
    assert [u for u, _ in fired] == ["bo"]
    assert [r.getMessage() for r in caplog.records] == [
        "a due reminder or timeout of user 'ana' failed; it stays due"
    ]
    assert ("ana", _ms(START + 5 * 60)) in _index(router)


def test_due_checks_limit_and_now_at_their_edges() -> None:
    router = _deadline_router(FakeClock())
    _start(router, "ana", "order")
    _start(router, "bo", "order")
    for bad in ("3", 1.5, True, 0):
        with pytest.raises(UsageError, match="limit"):
            router.due(limit=bad)  # type: ignore[arg-type]
    for bad_now in (-1, 1e11, True, "1"):
        with pytest.raises(UsageError, match="now must be"):
            router.due(now=bad_now)  # type: ignore[arg-type]
    assert router.due(now=0) == []
    assert len(router.due(now=START + 5 * 60, limit=1)) == 1  # now= is used, not the clock
    assert len(router.due(now=START + 5 * 60, limit=1)) == 1


def test_a_deadline_commit_found_duplicate_sends_nothing() -> None:
    router = _deadline_router(FakeClock())
    state = _State("duplicate")
    flow = {"name": "order", "step": "item", "data": {}, "history": [], "attempts": 0}
    original = _Claim.__init__

    def with_flow(self: _Claim, status: str) -> None:
        original(self, status)
        self.data = {"flow": {**flow, "at": START}}

    _Claim.__init__ = with_flow  # type: ignore[method-assign]
    try:
        at_ms = _ms(START + 5 * 60)
        assert asyncio.run(router._fire(state, "ana", at_ms, START + 5 * 60)) == []
        fired = asyncio.run(router._fire(_State("applied"), "ana", at_ms, START + 5 * 60))
        assert render_text(fired[0]) == "Are you still there?"
    finally:
        _Claim.__init__ = original  # type: ignore[method-assign]


def test_the_menu_screens_follow_the_login_and_the_language() -> None:
    """Login-first shows the logged-out menu; a submenu is shown as the user sees it."""
    more = Menu(
        "More things",
        [
            MenuItem("join", "Join", guest_only=True, handler=lambda ctx: "Joined."),
            MenuItem("faq", "FAQ", handler=lambda ctx: "Asked."),
        ],
    )
    main = Menu(
        "Main",
        [
            MenuItem("pay", "Pay", requires_auth=True, handler=lambda ctx: "Paid."),
            MenuItem("more", "More", submenu=more),
        ],
    )
    guest = Menu(
        "Welcome",
        [
            MenuItem("login", "Log in", guest_only=True, handler=lambda ctx: "In."),
            MenuItem("pay", "Pay", requires_auth=True, handler=lambda ctx: "Paid."),
        ],
    )
    router = Router(
        StateService(),
        main_menu=main,
        auth_menu=guest,
        translations={"es": {"More things": "Más cosas", "Welcome": "Bienvenido"}},
        token_field="token",
    )
    chat = Conversation(router, "ana")
    router.service.update("ana", {"flow": 7})
    assert chat.send("pay") == ["Please log in first.", "Welcome\n[Log in]\n[Pay]"]
    assert chat.state["flow"] == 7
    router.service.update("ana", {"language": "es"})
    assert chat.send("pay") == ["Please log in first.", "Bienvenido\n[Log in]\n[Pay]"]
    router.service.update("ana", {"token": "t"})
    assert chat.send("more") == ["Más cosas\n[FAQ]"]


def test_a_user_busy_elsewhere_waits_only_the_routers_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from chatstate.exceptions import UserBusyError

    router = _router(wait=0.05)
    claim = router.service.claim("ana", "in-flight", lease=30)
    fake = Fake()  # no real time passes
    monkeypatch.setattr(time, "sleep", fake.sleep)  # the default policies look them up late
    monkeypatch.setattr(time, "monotonic", fake.clock)
    with pytest.raises(UserBusyError):
        router.handle(Message("ana", text="help", message_id="m1"))
    monkeypatch.undo()
    assert sum(fake.naps) <= 0.05, fake.naps  # it waited the router's wait, not the default 10 s
    claim.release()


def test_a_message_id_reused_for_other_content_is_refused() -> None:
    """With a digest_key, an id that comes back with other content is refused."""
    from chatstate import StateData
    from chatstate.exceptions import OpIdReusedError

    service = StateService(rules=StateData(digest_key="a deployment secret!"))
    router = Router(service, main_menu=MENU, clock=FakeClock())
    router.handle(Message("ana", text="help", message_id="m1"))
    with pytest.raises(OpIdReusedError):
        router.handle(Message("ana", text="order", message_id="m1"))


def test_without_a_digest_key_the_content_of_a_message_is_not_kept() -> None:
    """No digest_key: the op log holds no digest of what was typed (the id's copy is silent)."""
    service = StateService()
    router = Router(service, main_menu=MENU, clock=FakeClock())
    router.handle(Message("ana", text="help", message_id="m1"))
    records = service.manager.backend._users["ana"].log.records
    assert [r.digest for r in records.values()] == [""]
    assert router.handle(Message("ana", text="order", message_id="m1")) == []


def test_due_names_the_backend_without_an_index() -> None:
    class Plain:
        def __init__(self) -> None:
            from chatstate import MemoryBackend

            self.inner = MemoryBackend()

        def load(self, user_id: str) -> Any:
            return self.inner.load(user_id)

        def apply(self, user_id: str, write: Any) -> Any:
            return self.inner.apply(user_id, write)

        def close(self) -> None:
            pass

    with pytest.raises(UsageError, match=r"^Plain keeps no deadline index"):
        Router(StateService(Plain()), main_menu=MENU).due()


def _took_over(service: StateService, user: str) -> bool:
    """Whether another handler can take the user's claim now (after a short sleep)."""
    import time

    from chatstate.exceptions import UserBusyError

    time.sleep(0.1)
    try:
        other = service.claim(user, "taker", wait=0)
    except UserBusyError:
        return False
    other.release()
    return True


def test_the_routers_lease_bounds_a_message_and_a_deadline() -> None:
    """The router claims a message and a deadline with its own lease (renewed while alive)."""
    leases: list[object] = []

    class Recording(StateService):
        def claim(self, user_id: str, op_id: str | None = None, **kwargs: Any) -> Any:
            leases.append(kwargs.get("lease"))
            return super().claim(user_id, op_id, **kwargs)

    service = Recording()

    class Slow(Flow):
        reminder = timedelta(minutes=5)
        only = Step("Slow?")

    menu = Menu("M", [MenuItem("slow", "Slow", flow=Slow)])
    router = Router(service, main_menu=menu, lease=0.05, clock=FakeClock())
    router.handle(Message("ana", text="slow", message_id="m2", timestamp=START))
    assert router.due(now=START + 5 * 60)
    assert leases == [0.05, 0.05]
