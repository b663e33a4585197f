"""The router: one incoming message in, the replies out.

The order is the seed bot's: a greeting shows the auth menu (or the main menu
for an authenticated user); an active flow continues; a menu action starts its
flow, shows its submenu or runs its handler; anything else shows the default
menu.

The logic is written once, as coroutines. :class:`AsyncRouter` awaits it;
:class:`Router` drives the same coroutines to completion without an event loop,
which works because every await on its path finishes at once. An async
validator or hook handed to the sync router is detected and refused.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import timedelta
from typing import Any, Final, Protocol, TypeVar

import attrs

from chatstate.exceptions import FlowError
from chatstate.flow._flow import DONE, Flow, Replies
from chatstate.flow._screens import Button, Buttons, ListScreen, Row, Screen, Section, Text
from chatstate.state._backend import Outcome
from chatstate.state._rules import diff
from chatstate.state._service import AsyncStateService, StateService, SyncServiceAsAsync

__all__ = ["AsyncRouter", "Menu", "MenuItem", "Message", "Router", "Turn"]

T = TypeVar("T")
FLOW_KEY: Final = "flow"
ROUTER_PURPOSE: Final = "router"
DEFAULT_GREETINGS: Final = frozenset({"hi", "hello", "hey", "hola", "start", "/start", "menu"})


@attrs.frozen
class Message:
    """A framework-neutral incoming message.

    Attributes:
        user_id: Who sent it (a WhatsApp ``wa_id``, a Telegram chat id, ...).
        text: What they typed, if anything.
        reply_id: The id of the button or list row they tapped, if any.
        message_id: The platform's message id: a redelivery of the same id is
            recognised and changes nothing.
        timestamp: When it was sent (Unix seconds); now when missing.
    """

    user_id: str
    text: str | None = None
    reply_id: str | None = None
    message_id: str | None = None
    timestamp: float | None = None

    @property
    def answer(self) -> str:
        """The tapped reply id, else the typed text, stripped."""
        return (self.reply_id or self.text or "").strip()

    @property
    def fingerprint(self) -> str:
        """What identifies the message's content: a redelivery has the same one."""
        return f"{self.user_id}\x1f{self.text}\x1f{self.reply_id}"


@attrs.frozen
class Turn:
    """What a menu handler or a flow hook knows about the message being handled."""

    message: Message
    state: dict[str, Any]
    authenticated: bool

    @property
    def user_id(self) -> str:
        """The sender."""
        return self.message.user_id


Handler = Callable[[Turn], "Replies | Awaitable[Replies]"]


@attrs.frozen
class MenuItem:
    """One entry of a menu: starts a flow, opens a submenu, or runs a handler."""

    id: str
    title: str
    flow: type[Flow] | None = None
    submenu: Menu | None = None
    handler: Handler | None = None
    requires_auth: bool = False
    description: str | None = None

    def __attrs_post_init__(self) -> None:
        actions = [a for a in (self.flow, self.submenu, self.handler) if a is not None]
        if len(actions) != 1:
            raise FlowError(f"menu item {self.id!r} needs exactly one of flow, submenu, handler")

    @property
    def needs_auth(self) -> bool:
        """True when only authenticated users may use it."""
        return self.requires_auth or bool(self.flow and self.flow.requires_auth)


@attrs.frozen
class Menu:
    """A menu: up to three items become reply buttons, more become a list."""

    body: str
    items: tuple[MenuItem, ...] = attrs.field(converter=tuple)
    button: str = "Menu"

    def screen(self) -> Screen:
        """The menu as a screen."""
        if len(self.items) <= 3:
            return Buttons(self.body, [Button(i.id, i.title) for i in self.items])
        rows = [Row(i.id, i.title, i.description) for i in self.items]
        return ListScreen(self.body, self.button, [Section(rows)])

    def walk(self) -> Iterable[MenuItem]:
        """Every item of this menu and its submenus."""
        for item in self.items:
            yield item
            if item.submenu is not None:
                yield from item.submenu.walk()


@attrs.frozen
class _Plan:
    patch: dict[str, Any] | None
    replies: list[Screen]
    after: Callable[[dict[str, Any]], Awaitable[list[Screen]]] | None = None


class _ClaimLike(Protocol):
    @property
    def duplicate(self) -> bool: ...

    @property
    def data(self) -> dict[str, Any]: ...

    def update(self, patch: dict[str, Any]) -> None: ...

    async def commit(self) -> Outcome: ...

    async def release(self) -> None: ...


class _StateLike(Protocol):
    async def claim(
        self,
        user_id: str,
        op_id: str | None = None,
        *,
        fingerprint: str | None = None,
        purpose: str = ...,
        lease: float | timedelta = ...,
        wait: float | timedelta = ...,
    ) -> _ClaimLike: ...


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends to its end, without an event loop."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise TypeError(
        "an async validator, prompt or hook was used with the sync Router: use AsyncRouter"
    )


async def _replies(value: Any) -> list[Screen]:
    if inspect.isawaitable(value):
        value = await value
    if value is None:
        return []
    if isinstance(value, str | Text | Buttons | ListScreen):
        value = [value]
    return [Text(v) if isinstance(v, str) else v for v in value]


class _RouterCore:
    """Everything the two routers share."""

    def __init__(
        self,
        *,
        main_menu: Menu,
        auth_menu: Menu | None = None,
        greetings: Iterable[str] = DEFAULT_GREETINGS,
        is_authenticated: Callable[[dict[str, Any]], bool] | None = None,
        token_field: str = "jwt_token",  # noqa: S107 - a field name
        expired_text: str = "That conversation timed out; let's start again.",
        login_first_text: str = "Please log in first.",
        clock: Callable[[], float] = time.time,
        lease: float | timedelta = timedelta(seconds=30),
        wait: float | timedelta = timedelta(seconds=10),
    ) -> None:
        self.main_menu = main_menu
        self.auth_menu = auth_menu or main_menu
        self.greetings = frozenset(g.casefold() for g in greetings)
        self._is_authenticated = is_authenticated or (lambda doc: bool(doc.get(token_field)))
        self.expired_text = expired_text
        self.login_first_text = login_first_text
        self.clock = clock
        self.lease = lease
        self.wait = wait
        self.flows: dict[str, type[Flow]] = {}
        self.items: dict[str, MenuItem] = {}
        for menu in (self.main_menu, self.auth_menu):
            for item in menu.walk():
                self.items.setdefault(item.id.casefold(), item)
                self.items.setdefault(item.title.casefold(), item)
                if item.flow is not None:
                    other = self.flows.setdefault(item.flow.name, item.flow)
                    if other is not item.flow:
                        raise FlowError(f"two flows are named {item.flow.name!r}")

    def home(self, authenticated: bool) -> Screen:
        """The default menu for a user."""
        return (self.main_menu if authenticated else self.auth_menu).screen()

    async def handle_with(self, state: _StateLike, message: Message) -> list[Screen]:
        """Handle one message exactly once: claim the user, plan, commit, reply.

        The claim (one atomic read) recognises a message id seen before, from
        any process, whatever its handling wrote, and makes the user's other
        messages wait: a redelivery, early or late, returns nothing and runs
        nothing. Validators, hooks and handlers run while the claim is held;
        what the step changes is written in one atomic write that also records
        the message id and releases the claim. If anything raises, the claim is
        released with nothing written, so the redelivered message runs again.
        """
        claim = await state.claim(
            message.user_id,
            message.message_id,
            fingerprint=message.fingerprint,
            purpose=ROUTER_PURPOSE,
            lease=self.lease,
            wait=self.wait,
        )
        if claim.duplicate:
            return []
        try:
            plan = await self._plan(claim.data, message)
            if plan.patch:
                claim.update(plan.patch)
            after = await plan.after(claim.data) if plan.after else []
            outcome = await claim.commit()
        except BaseException:
            await claim.release()
            raise
        if outcome.status == "duplicate":
            return []  # a handler that took over a lapsed claim answered already
        return plan.replies + after

    async def _plan(self, doc: dict[str, Any], message: Message) -> _Plan:  # noqa: PLR0911 - a rule each
        authenticated = self._is_authenticated(doc)
        answer = message.answer
        word = answer.casefold()
        active = doc.get(FLOW_KEY)
        now = message.timestamp if message.timestamp is not None else self.clock()
        if word in self.greetings:
            return _Plan({FLOW_KEY: None} if active else None, [self.home(authenticated)])
        if isinstance(active, dict):
            flow_cls = self.flows.get(str(active.get("name")))
            if flow_cls is None:
                return _Plan({FLOW_KEY: None}, [self.home(authenticated)])
            timeout = flow_cls.timeout
            if timeout is not None and now - float(active.get("at", now)) > timeout.total_seconds():
                return _Plan({FLOW_KEY: None}, [Text(self.expired_text), self.home(authenticated)])
            turn = Turn(message, doc, authenticated)
            return await self._continue(flow_cls, active, answer, turn, now)
        item = self.items.get(word) or self.items.get(answer.casefold())
        if item is None:
            return _Plan(None, [self.home(authenticated)])
        if item.needs_auth and not authenticated:
            return _Plan(None, [Text(self.login_first_text), self.auth_menu.screen()])
        if item.submenu is not None:
            return _Plan(None, [item.submenu.screen()])
        if item.handler is not None:
            return _Plan(None, await _replies(item.handler(Turn(message, doc, authenticated))))
        assert item.flow is not None
        return await self._start(item.flow, now)

    async def _start(self, flow_cls: type[Flow], now: float) -> _Plan:
        first = flow_cls.steps[flow_cls.first]
        state = {"name": flow_cls.name, "step": first.name, "data": {}, "history": [],
                 "attempts": 0, "at": now}  # fmt: skip
        return _Plan({FLOW_KEY: state}, [await first.render({})])

    async def _continue(  # noqa: C901, PLR0911 - one branch per command and outcome
        self, flow_cls: type[Flow], active: dict[str, Any], answer: str, turn: Turn, now: float
    ) -> _Plan:
        steps = flow_cls.steps
        data: dict[str, Any] = dict(active.get("data") or {})
        history: list[str] = list(active.get("history") or [])
        step = steps.get(str(active.get("step")))
        word = answer.casefold()
        flow = flow_cls(turn)

        def moved(**changes: Any) -> dict[str, Any]:
            new = {**active, "data": data, "history": history, "attempts": 0, "at": now, **changes}
            return {FLOW_KEY: diff(active, new)}

        async def cancelled(doc: dict[str, Any]) -> list[Screen]:
            flow.turn = attrs.evolve(turn, state=doc)
            return await _replies(flow.on_cancel(data))

        if step is None or word in flow_cls.restart_words:
            first = steps[flow_cls.first]
            data.clear()
            history.clear()
            return _Plan(moved(step=first.name), [await first.render({})])
        if word in flow_cls.cancel_words:
            return _Plan({FLOW_KEY: None}, [], cancelled)
        if word in flow_cls.back_words:
            if not history:
                return _Plan(None, [await step.render(data)])
            previous = steps[history.pop()]
            data.pop(previous.key or previous.name, None)
            return _Plan(moved(step=previous.name), [await previous.render(data)])
        ok, value = await step.accept(answer)
        if not ok:
            attempts = int(active.get("attempts", 0)) + 1
            if attempts < step.max_attempts:
                patch = {FLOW_KEY: {"attempts": attempts, "at": now}}
                return _Plan(patch, [Text(value), await step.render(data)])
            if step.on_too_many == "restart":
                first = steps[flow_cls.first]
                data.clear()
                history.clear()
                return _Plan(moved(step=first.name), [Text(value), await first.render({})])
            return _Plan({FLOW_KEY: None}, [Text(value)], cancelled)
        data[step.key or step.name] = value
        target = await step.target(value, data)
        if target == DONE:

            async def completed(doc: dict[str, Any]) -> list[Screen]:
                flow.turn = attrs.evolve(turn, state=doc)
                return await _replies(flow.on_complete(data))

            return _Plan({FLOW_KEY: None}, [], completed)
        history.append(step.name)
        return _Plan(moved(step=target), [await steps[target].render(data)])


class Router(_RouterCore):
    """Routes messages for a :class:`~chatstate.StateService` (sync validators and hooks).

    Args:
        service: Where users' state lives.
        main_menu: The menu of an authenticated user (and of everyone if there
            is no ``auth_menu``).
        auth_menu: The menu of a user who has not logged in.
        greetings: Words that show the menu (and drop an active flow).
        is_authenticated: Decides from the state document; by default, a
            non-empty ``token_field``.
        token_field: See ``is_authenticated``.
        expired_text: Sent when an idle flow has timed out.
        login_first_text: Sent when a user picks an item that needs a login.
        clock: Seconds since the epoch, for messages without a timestamp.
    """

    def __init__(self, service: StateService, **options: Any) -> None:
        super().__init__(**options)
        self.service = service
        self._state = SyncServiceAsAsync(service)

    def handle(self, message: Message) -> list[Screen]:
        """Handle one message and return the replies to send.

        Raises:
            TypeError: an async validator, prompt or hook is in the way (use
                :class:`AsyncRouter`).
        """
        return run_sync(self.handle_with(self._state, message))


class AsyncRouter(_RouterCore):
    """The asyncio twin of :class:`Router`; validators, prompts and hooks may be async."""

    def __init__(self, service: AsyncStateService, **options: Any) -> None:
        super().__init__(**options)
        self.service = service

    async def handle(self, message: Message) -> list[Screen]:
        """Handle one message and return the replies to send."""
        return await self.handle_with(self.service, message)
