"""The router: one incoming message in, the replies out, exactly once.

The order is the seed bot's: a greeting shows the auth menu (or the main menu
for an authenticated user); an active flow continues; a menu action starts its
flow, shows its submenu or runs its handler; anything else shows the default
menu.

The logic is written once, as coroutines. :class:`AsyncRouter` awaits it;
:class:`Router` drives the same coroutines to completion without an event loop,
which works because every await on its path finishes at once; async callables
handed to the sync router are refused when it is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import threading
import time
from collections.abc import AsyncIterable, Awaitable, Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, Final, Generic, Protocol, TypeVar

import attrs
from typing_extensions import TypeVar as TypeVarD

from chatstate import observe
from chatstate._durations import to_ms
from chatstate._twins import run_sync
from chatstate.exceptions import (
    ClaimLostError,
    ConfigurationError,
    FlowError,
    InvalidScreenError,
    InvalidUserIdError,
    UsageError,
    UserBusyError,
)
from chatstate.flow._context import Catalogues, Context, Translations, is_async
from chatstate.flow._delivery import AsyncDelivery, Delivery
from chatstate.flow._flow import DONE, Flow, Replies, Step
from chatstate.flow._message import Message
from chatstate.flow._scheduled import due_scheduled, scheduled_entry, screens_of, stored_scheduled
from chatstate.flow._screens import (
    Button,
    Buttons,
    ListScreen,
    Row,
    Screen,
    Section,
    Text,
    screen_from_json,
    screen_to_json,
    translate_screen,
)
from chatstate.flow._sending import (
    BroadcastProgress,
    DeliveryMode,
    RateLimit,
    check_key,
    check_progress,
    check_send,
    check_sending,
    event_key,
    identity,
    rate_limit,
    takes_identity,
)
from chatstate.state import (
    AsyncDeadlineIndex,
    AsyncStateService,
    DeadlineIndex,
    Outcome,
    StateData,
    StateService,
    SyncServiceAsAsync,
    diff,
)

__all__ = ["AsyncRouter", "Menu", "MenuItem", "Router"]

DEFAULT_LEASE: Final = timedelta(seconds=5)
DEFAULT_RESEND_AFTER: Final = timedelta(seconds=30)
DEFAULT_CONCURRENCY: Final = 16

log = logging.getLogger("chatstate.flow")

T = TypeVar("T")
DepsT = TypeVarD("DepsT", default=Any)
ROUTER_PURPOSE: Final = "router"
DEADLINE_PURPOSE: Final = "router-deadline"
DEFAULT_GREETINGS: Final = frozenset({"hi", "hello", "hey", "hola", "start", "/start", "menu"})
EXPIRED_TEXT: Final = "That conversation timed out; let's start again."
LOGIN_FIRST_TEXT: Final = "Please log in first."
REMINDER_TEXT: Final = "Are you still there?"
KEPT_BROADCASTS: Final = 32  # broadcast ids remembered per user (the oldest are dropped)

Handler = Callable[[Context[Any]], "Replies | Awaitable[Replies]"]


def _translate_identity(text: str) -> str:
    return text


@attrs.frozen
class MenuItem:
    """One entry of a menu: starts a flow, opens a submenu, or runs a handler.

    Args:
        id: What comes back when the item is tapped; typing it works too.
        title: What the user sees (typing it works too, in the user's language).
        flow: The flow the item starts.
        submenu: The menu the item opens.
        handler: A function of the :class:`Context` returning replies (sync or async).
        requires_auth: Only logged-in users may use it ("Please log in first.").
        guest_only: Only logged-out users see and may use it (register, log in).
        description: A list row's second line.
    """

    id: str
    title: str
    flow: type[Flow] | None = attrs.field(default=None, kw_only=True)
    submenu: Menu | None = attrs.field(default=None, kw_only=True)
    handler: Handler | None = attrs.field(default=None, kw_only=True)
    requires_auth: bool = attrs.field(default=False, kw_only=True)
    guest_only: bool = attrs.field(default=False, kw_only=True)
    description: str | None = attrs.field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        actions = [a for a in (self.flow, self.submenu, self.handler) if a is not None]
        if len(actions) != 1:
            raise FlowError(f"menu item {self.id!r} needs exactly one of flow, submenu, handler")
        if self.flow is not None and not (
            isinstance(self.flow, type) and issubclass(self.flow, Flow)  # type: ignore[redundant-expr]  # callers may be untyped
        ):
            raise FlowError(f"menu item {self.id!r}: flow= takes a Flow subclass")
        if self.submenu is not None and not isinstance(self.submenu, Menu):
            raise FlowError(f"menu item {self.id!r}: submenu= takes a Menu")
        if self.handler is not None and not callable(self.handler):
            raise FlowError(f"menu item {self.id!r}: handler= takes a function of the context")
        if self.guest_only and self.needs_auth:
            raise FlowError(f"menu item {self.id!r} cannot be both guest_only and requires_auth")

    @property
    def needs_auth(self) -> bool:
        """True when only authenticated users may use it."""
        return self.requires_auth or bool(self.flow and self.flow.requires_auth)

    def visible(self, authenticated: bool) -> bool:
        """True when a user who is (or is not) logged in sees the item."""
        return not (self.guest_only and authenticated)


def _menu_items(items: Any) -> tuple[MenuItem, ...]:
    if isinstance(items, MenuItem) or not isinstance(items, Iterable):
        raise ConfigurationError(f"Menu(body, items) takes a list of MenuItem, not {items!r}")
    found: tuple[MenuItem, ...] = tuple(items)
    for item in found:
        if not isinstance(item, MenuItem):
            raise ConfigurationError(f"Menu items must be MenuItem objects, not {item!r}")
    return found


@attrs.frozen
class Menu:
    """A menu: up to three items become reply buttons, more become a list (at most ten).

    Checked against WhatsApp's limits when it is built.
    """

    body: str
    items: tuple[MenuItem, ...] = attrs.field(converter=_menu_items)
    button: str = "Menu"

    def __attrs_post_init__(self) -> None:
        ids = [item.id for item in self.items]
        titles = [item.title.casefold() for item in self.items]
        if len(set(titles)) != len(titles):
            raise InvalidScreenError(
                f"menu {self.body[:30]!r} has two items whose titles differ only in case "
                "(typed titles are matched whatever the case)"
            )
        if len(set(ids)) != len(ids):
            raise InvalidScreenError(f"menu {self.body[:30]!r} repeats an item id")
        self.screen()
        self.screen(authenticated=True)

    def screen(
        self, translate: Callable[[str], str] = _translate_identity, *, authenticated: bool = False
    ) -> Screen:
        """The menu as a screen, in a language, as a user who is (or is not) logged in sees it."""
        items = [i for i in self.items if i.visible(authenticated)] or list(self.items)
        if len(items) <= 3:
            screen: Screen = Buttons(self.body, [Button(i.id, i.title) for i in items])
        else:
            rows = [Row(i.id, i.title, i.description) for i in items]
            screen = ListScreen(self.body, self.button, [Section(rows)])
        return screen if translate is _translate_identity else translate_screen(screen, translate)

    def walk(self) -> Iterable[MenuItem]:
        """Every item of this menu and its submenus."""
        for item in self.items:
            yield item
            if item.submenu is not None:
                yield from item.submenu.walk()


def _check_run_due(send: object, interval: object, limit: object) -> None:
    if not callable(send):
        raise UsageError("run_due takes send(user_id, replies), a function")
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not 0 < interval < math.inf
    ):
        raise UsageError(f"interval must be positive seconds, not {interval!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"limit must be a positive int, not {limit!r}")


def _at(active: Mapping[str, Any], default: float) -> float:
    """When the flow last moved (its stored ``at``); ``default`` if that is not a number."""
    at = active.get("at", default)
    if isinstance(at, bool) or not isinstance(at, int | float) or at != at:  # noqa: PLR0124 - NaN
        return default
    return float(at)


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()


@attrs.define
class _Plan:
    flow: dict[str, Any] | _Keep | None
    replies: list[Screen]
    outcome: str | None = None  # for observers
    flow_name: str = ""
    step_name: str = ""


@attrs.define
class _Opened:
    """A handled message: its replies and, until they are acknowledged, the claim holding them."""

    user_id: str
    replies: list[Screen]
    claim: Any  # the claim kept after the commit, or None: nothing to acknowledge
    keys: list[str]  # the outbox entries the acknowledgement drops
    field: str  # the outbox field
    resent: bool = False


@attrs.define
class _Parcel:
    """Replies to send under one identity; ``stored``: kept in the outbox under ``key``."""

    key: str
    replies: list[Screen]
    stored: bool = False


@attrs.define
class _Fired:
    """What one due index entry gave: parcels to send, and the claim until acknowledged."""

    user_id: str
    parcels: list[_Parcel]
    claim: Any


class _ClaimLike(Protocol):
    _core: Any

    @property
    def duplicate(self) -> bool: ...

    @property
    def data(self) -> dict[str, Any]: ...

    @property
    def open(self) -> bool: ...

    def update(self, patch: Mapping[str, Any]) -> None: ...

    def assign(self, values: Mapping[Any, Any]) -> None: ...

    def set_preserved(self, path: Any, value: Any) -> None: ...

    async def commit(self, *, keep: bool = False) -> Outcome: ...

    async def release(self) -> None: ...


class _StateLike(Protocol):
    manager: Any

    async def get(self, user_id: str) -> dict[str, Any]: ...

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


async def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    result = fn(*args, **kwargs)
    return await result if inspect.isawaitable(result) else result


async def _replies(value: Any) -> list[Screen]:
    if inspect.isawaitable(value):
        value = await value
    if value is None:
        return []
    if isinstance(value, str | Text | Buttons | ListScreen):
        value = [value]
    return [Text(v) if isinstance(v, str) else v for v in value]


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _entry_at(entry: Any) -> int:
    """When an outbox entry was stored (ms); 0 for one that is not ours (dropped soon)."""
    if isinstance(entry, list) and entry and type(entry[0]) is int:
        return int(entry[0])
    return 0


def _entry_replies(entry: Any) -> list[Any]:
    if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], list):
        return entry[1]
    return []


class _RouterCore(Generic[DepsT]):
    """Everything the two routers share."""

    _sync: bool = False
    expired_text: str
    login_first_text: str
    reminder_text: str

    def __init__(  # noqa: C901, PLR0912, PLR0915 - every option is explicit and checked
        self,
        service: Any,
        *,
        main_menu: Menu,
        auth_menu: Menu | None = None,
        flows: Iterable[type[Flow]] = (),
        deps: DepsT = None,  # type: ignore[assignment]
        greetings: Iterable[str] = DEFAULT_GREETINGS,
        is_authenticated: Callable[[Mapping[str, Any]], bool] | None = None,
        token_field: str | None = None,
        flow_field: str = "flow",
        language_field: str = "language",
        default_language: str = "en",
        translations: Translations | None = None,
        expired_text: str = EXPIRED_TEXT,
        login_first_text: str = LOGIN_FIRST_TEXT,
        reminder_text: str = REMINDER_TEXT,
        clock: Callable[[], float] = time.time,
        lease: float | timedelta = DEFAULT_LEASE,
        wait: float | timedelta = timedelta(seconds=10),
        outbox_field: str = "outbox",
        resend_after: float | timedelta | None = DEFAULT_RESEND_AFTER,
        scheduled_field: str = "scheduled",
        broadcast_field: str = "broadcasts",
    ) -> None:
        self._check_service(service)
        self.service = service
        self.rules: StateData = service.rules
        if not isinstance(main_menu, Menu) or not (  # type: ignore[redundant-expr]  # callers may be untyped
            auth_menu is None or isinstance(auth_menu, Menu)
        ):
            raise ConfigurationError("main_menu and auth_menu take Menu objects")
        self.main_menu = main_menu
        self.auth_menu = auth_menu or main_menu
        self.deps = deps
        if isinstance(greetings, str) or not isinstance(greetings, Iterable):
            raise ConfigurationError(f"greetings takes a collection of words, not {greetings!r}")
        greetings = tuple(greetings)
        if not all(isinstance(g, str) for g in greetings):
            raise ConfigurationError("greetings takes words (str)")
        self.greetings = frozenset(g.casefold() for g in greetings)
        field = token_field if token_field is not None else self.rules.token_field
        if not isinstance(field, str) or not field:
            raise ConfigurationError("token_field must be a field name")
        self.token_field = field
        if is_authenticated is not None and not callable(is_authenticated):
            raise ConfigurationError("is_authenticated takes a function of the state document")
        self._is_authenticated = is_authenticated or (lambda doc: bool(doc.get(field)))
        for name, value in (
            ("flow_field", flow_field),
            ("language_field", language_field),
            ("outbox_field", outbox_field),
            ("scheduled_field", scheduled_field),
            ("broadcast_field", broadcast_field),
        ):
            if not isinstance(value, str) or not value:  # type: ignore[redundant-expr]  # callers may be untyped
                raise ConfigurationError(f"{name} must be a top-level field name")
        if flow_field in (language_field, field):
            raise ConfigurationError("flow_field must differ from language_field and token_field")
        if outbox_field in (flow_field, language_field, field):
            raise ConfigurationError(
                "outbox_field must differ from flow_field, language_field and token_field"
            )
        own = (flow_field, language_field, field, outbox_field, scheduled_field, broadcast_field)
        if len(set(own)) != len(own):
            raise ConfigurationError(
                "flow_field, language_field, token_field, outbox_field, scheduled_field and "
                "broadcast_field must be six different fields"
            )
        self.outbox_field = outbox_field
        self.scheduled_field = scheduled_field
        self.broadcast_field = broadcast_field
        self.resend_after_ms = None if resend_after is None else to_ms(resend_after, "resend_after")
        self.flow_field = flow_field
        self.language_field = language_field
        self.catalogues = Catalogues(translations, default_language)
        self.default_language = default_language
        for name, text in (
            ("expired_text", expired_text),
            ("login_first_text", login_first_text),
            ("reminder_text", reminder_text),
        ):
            Text(text)  # checks the text is a non-empty str within WhatsApp's limit
            setattr(self, name, text)
        if not callable(clock):
            raise ConfigurationError("clock takes a function returning Unix seconds")
        self.clock = clock
        to_ms(lease, "lease")
        to_ms(wait, "wait")
        self.lease = lease
        self.wait = wait
        self.flows: dict[str, type[Flow]] = {}
        self.items: tuple[MenuItem, ...] = ()
        every: list[MenuItem] = []
        for menu in (self.main_menu, self.auth_menu):
            every.extend(menu.walk())
        self.items = tuple(dict.fromkeys(every))
        if isinstance(flows, type) or not isinstance(flows, Iterable):
            raise ConfigurationError(f"flows= takes a list of Flow subclasses, not {flows!r}")
        for flow_cls in [i.flow for i in self.items if i.flow is not None] + list(flows):
            if (
                not (isinstance(flow_cls, type) and issubclass(flow_cls, Flow))  # type: ignore[redundant-expr]  # callers may be untyped
                or not flow_cls.steps
            ):
                raise ConfigurationError(
                    f"flows= takes Flow subclasses with steps, not {flow_cls!r}"
                )
            other = self.flows.setdefault(flow_cls.name, flow_cls)
            if other is not flow_cls:
                raise FlowError(f"two flows are named {flow_cls.name!r}")
        self._indexes: dict[str, dict[str, MenuItem]] = {}
        self._homes: dict[tuple[bool, str], Screen] = {}
        self._check_languages()
        self._check_secret_steps()
        if self._sync:
            self._refuse_async(is_authenticated, translations)

    def _check_service(self, service: Any) -> None:
        raise NotImplementedError

    def _check_languages(self) -> None:
        """Build every menu and static prompt in every language, so limits fail now."""
        languages = self.catalogues.languages or {self.default_language}
        for language in sorted(languages):
            translate = self.catalogues.translator(language)
            for menu in {id(m): m for m in self._menus()}.values():
                for authenticated in (False, True):
                    try:
                        menu.screen(translate, authenticated=authenticated)
                    except InvalidScreenError as exc:
                        raise InvalidScreenError(f"in language {language!r}: {exc}") from None
            for flow_cls in self.flows.values():
                for step in flow_cls.steps.values():
                    if isinstance(step.prompt, Text | Buttons | ListScreen):
                        try:
                            translate_screen(step.prompt, translate)
                        except InvalidScreenError as exc:
                            raise InvalidScreenError(
                                f"{flow_cls.__name__}.{step.name} in language {language!r}: {exc}"
                            ) from None

    def _check_secret_steps(self) -> None:
        """Every ``Step(secret=True)`` answer must be a field the service encrypts."""
        missing: list[str] = []
        for flow_cls in self.flows.values():
            for step in flow_cls.steps.values():
                if step.secret:
                    path = (self.flow_field, "data", step.key or step.name)
                    covered = any(path[: len(p)] == p for p in self.rules.secret)
                    if self.rules.encryption is None or not covered:
                        missing.append(".".join(path))
        if missing:
            listed = ", ".join(repr(p) for p in sorted(set(missing)))
            raise ConfigurationError(
                "a secret step's answer must be stored encrypted: build the service's rules "
                f"with StateData(encryption=FieldEncryption(...), secret=[..., {listed}])"
            )

    def _menus(self) -> list[Menu]:
        menus = [self.main_menu, self.auth_menu]
        menus += [i.submenu for i in self.items if i.submenu is not None]
        return menus

    def _refuse_async(self, is_authenticated: Any, translations: Any) -> None:
        found: list[str] = []
        for flow_cls in self.flows.values():
            found += flow_cls.async_callables()
        found += [f"menu item {i.id!r} handler" for i in self.items if is_async(i.handler)]
        if is_async(is_authenticated):
            found.append("is_authenticated")
        if callable(translations) and is_async(translations):
            found.append("translations")
        if found:
            raise UsageError(
                "the sync Router cannot run async code; use AsyncRouter over an "
                f"AsyncStateService (async: {', '.join(found)})"
            )

    # -- screens ---------------------------------------------------------------

    def home(
        self, authenticated: bool, translate: Callable[[str], str] = _translate_identity
    ) -> Screen:
        """The default menu for a user, in a language."""
        menu = self.main_menu if authenticated else self.auth_menu
        return menu.screen(translate, authenticated=authenticated)

    def _home(self, ctx: Context[DepsT]) -> Screen:
        """:meth:`home` for the context's user, built once per language (screens are frozen)."""
        key = (ctx.authenticated, ctx.language)
        screen = self._homes.get(key)
        if screen is None:
            screen = self.home(ctx.authenticated, ctx.t)
            if len(self._homes) < 256:  # languages come from stored state: keep it bounded
                self._homes[key] = screen
        return screen

    def _index(self, language: str) -> dict[str, MenuItem]:
        index = self._indexes.get(language)
        if index is None:
            translate = self.catalogues.translator(language)
            index = {}
            for item in self.items:
                index.setdefault(item.id.casefold(), item)
            for item in self.items:
                index.setdefault(item.title.casefold(), item)
                index.setdefault(translate(item.title).casefold(), item)
            self._indexes[language] = index
        return index

    def _context(
        self, message: Message, doc: dict[str, Any], claim: Any, now: float
    ) -> Context[DepsT]:
        return Context(
            message=message,
            now=now,
            state=doc,
            deps=self.deps,
            authenticated=bool(self._is_authenticated(doc)),
            catalogues=self.catalogues,
            rules=self.rules,
            staging=claim,
            flows=self.flows,
            protected=self.flow_field,
            language_field=self.language_field,
            scheduled_field=self.scheduled_field,
        )

    # -- one message -------------------------------------------------------------

    async def handle_with(self, state: _StateLike, message: Message) -> list[Screen]:
        """Handle one message exactly once: claim the user, plan, commit, reply.

        The claim (one atomic read) recognises a message id seen before, from
        any process, whatever its handling wrote, and makes the user's other
        messages wait: a redelivery, early or late, returns nothing and runs
        nothing. Validators, hooks and handlers run while the claim is held;
        what the step changes (the flow's progress and everything staged on
        the context) is written in one atomic write that also records the
        message id and releases the claim. If anything raises, the claim is
        released with nothing written, so the redelivered message runs again.
        """
        if not isinstance(message, Message):
            raise UsageError(f"handle() takes a Message, not {type(message).__name__}")
        if message.kind == "status":
            return []  # a delivery report: nothing the user said
        claim = await self._claim_message(state, message)
        if claim.duplicate:
            return []
        return await self._run(state, message, claim, keep=False)

    async def _run(
        self, state: _StateLike, message: Message, claim: Any, *, keep: bool
    ) -> list[Screen]:
        """Plan the claimed message, stage its step, commit; ``keep``: with its replies, held.

        Returns the replies; ``[]`` when a handler that took over a lapsed claim
        answered the message already.
        """
        try:
            doc = claim.data
            now = message.timestamp if message.timestamp is not None else self.clock()
            ctx = self._context(message, doc, claim, now)
            plan = await self._plan(ctx, doc, message, now)
            replies = await self._settle(ctx, doc, plan, now, claim)
            keep = keep and bool(replies)
            if keep:
                key: str = claim._core.op_key  # noqa: SLF001 - the message's key in the store
                await self._stage_outbox(state, claim, doc=doc, key=key, replies=replies, now=now)
            outcome = await claim.commit(keep=True) if keep else await claim.commit()
        except BaseException:
            await claim.release()
            raise
        if outcome.status == "duplicate":
            return []
        if plan.outcome is not None:
            observe.notify_flow_step(plan.flow_name, plan.step_name, plan.outcome)
        return replies

    async def open_with(self, state: _StateLike, message: Message) -> _Opened:
        """Handle one message, committing its step and its replies; keep them until acknowledged.

        As :meth:`handle_with`, but the replies are written into the user's
        outbox (``outbox_field``) in the same atomic write that commits the
        step, and the claim stays held (and renewed) until the caller
        acknowledges or abandons the delivery. A redelivery of a message whose
        replies are stored and unacknowledged waits for that holder, then returns
        them again (``resent``) if they are still there.
        """
        if not isinstance(message, Message):
            raise UsageError(f"deliver() takes a Message, not {type(message).__name__}")
        user_id = message.user_id
        if message.kind == "status":
            return _Opened(user_id, [], None, [], self.outbox_field)
        claim = await self._claim_message(state, message)
        key: str = claim._core.op_key  # noqa: SLF001 - the message's key in the store
        if claim.duplicate:
            if key not in self._outbox(claim.data):
                return _Opened(user_id, [], None, [], self.outbox_field)  # sent and acknowledged
            return await self.stored_with(state, user_id, [key])
        replies = await self._run(state, message, claim, keep=True)
        held = claim if replies and claim.open else None
        return _Opened(user_id, replies, held, [key], self.outbox_field)

    async def _claim_message(self, state: _StateLike, message: Message) -> Any:
        """Claim the message's user under its id (a message without one is never a duplicate).

        The fingerprint (what the message says) goes into the request's digest,
        which is keyed when the rules have a ``digest_key`` and left out when
        they do not: the store never holds an unkeyed digest of what a user typed.
        """
        has_id = bool(message.message_id)
        return await state.claim(
            message.user_id,
            message.message_id if has_id else None,
            fingerprint=message.fingerprint if has_id else None,
            purpose=ROUTER_PURPOSE,
            lease=self.lease,
            wait=self.wait,
        )

    def _outbox(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        box = doc.get(self.outbox_field)
        return box if isinstance(box, dict) else {}

    async def _stage_outbox(
        self,
        state: _StateLike,
        claim: Any,
        *,
        doc: Mapping[str, Any],
        key: str,
        replies: list[Screen],
        now: float,
    ) -> None:
        """Stage the replies under ``key``; drop entries older than the dedupe window."""
        now_ms = _ms(now)
        entry = [now_ms, [screen_to_json(r) for r in replies]]
        patch: dict[str, Any] = {key: entry}
        window = state.manager.dedupe_ms
        for old, stored in self._outbox(doc).items():
            if _entry_at(stored) + window < now_ms:
                patch[old] = None  # its message is forgotten: a redelivery runs again
        claim.update({self.outbox_field: patch})
        if self.resend_after_ms is not None:
            await self._schedule(claim.user_id, now_ms + self.resend_after_ms)

    async def stored_with(self, state: _StateLike, user_id: str, keys: list[str]) -> _Opened:
        """The stored replies under ``keys``, once their holder let go; nothing if acknowledged.

        The user is claimed (waiting up to ``wait``) and stays claimed until the
        delivery is acknowledged or abandoned.
        """
        claim = await state.claim(
            user_id, None, purpose=ROUTER_PURPOSE, lease=self.lease, wait=self.wait
        )
        try:
            box = self._outbox(claim.data)
            found = [k for k in keys if k in box]
            found.sort(key=lambda k: _entry_at(box[k]))
            replies = [screen_from_json(r) for k in found for r in _entry_replies(box[k])]
        except BaseException:
            await claim.release()
            raise
        if not found:
            await claim.release()
            return _Opened(user_id, [], None, [], self.outbox_field)
        return _Opened(user_id, replies, claim, found, self.outbox_field, resent=True)

    async def undelivered_with(
        self, state: _StateLike, now: float | None, limit: int
    ) -> list[tuple[str, list[str]]]:
        """Users with replies stored and unacknowledged past ``resend_after``, and their keys.

        Nothing is claimed here: each delivery claims its user when it starts.
        """
        if self.resend_after_ms is None:
            raise UsageError("undelivered() needs resend_after (the router was built without)")
        if not self._indexed():
            raise UsageError(
                f"{type(self._backend).__name__} keeps no deadline index "
                "(schedule, unschedule, due): unacknowledged replies cannot be listed"
            )
        now_ms = _ms(self.clock() if now is None else now)
        found: list[tuple[str, list[str]]] = []
        for user_id, _at_ms in await _call(self._backend.due, now_ms, limit):
            box = self._outbox(await state.get(user_id))
            due = [k for k, e in box.items() if _entry_at(e) + self.resend_after_ms <= now_ms]
            if due:
                found.append((user_id, due))
            # else a flow's deadline (due() fires it and moves the entry), or an entry
            # that is early: the index is left as it is.
        return found

    def _outbox_wake(self, doc: Mapping[str, Any]) -> int | None:
        """When the oldest stored replies are due for a resend (ms), or None."""
        if self.resend_after_ms is None:
            return None
        times = [_entry_at(e) for e in self._outbox(doc).values()]
        return min(times) + self.resend_after_ms if times else None

    async def _reschedule(
        self,
        user_id: str,
        doc: Mapping[str, Any],
        now_ms: int,
        flow_at: int | None = None,
        fired: Iterable[str] = (),
    ) -> None:
        """Index the user's next wake-up: the flow's deadline, a scheduled message or a resend.

        A resend that is due already is put off by ``resend_after`` (``due()``
        leaves it to :meth:`undelivered`, and must not find it again at once).
        ``fired``: scheduled messages this round removes.
        """
        wake = self._outbox_wake(doc)
        if wake is not None and wake <= now_ms:
            assert self.resend_after_ms is not None
            wake = now_ms + self.resend_after_ms
        gone = set(fired)
        later = [e[0] for k, e in stored_scheduled(doc, self.scheduled_field).items()
                 if k not in gone]  # fmt: skip
        times = [t for t in (wake, flow_at, *later) if t is not None]
        if times:
            await self._schedule(user_id, min(times), exact=True)
        else:
            await self._unschedule(user_id)

    async def _settle(
        self, ctx: Context[DepsT], doc: dict[str, Any], plan: _Plan, now: float, claim: Any
    ) -> list[Screen]:
        """Apply ``ctx.start()``, stage the flow's new state, index its next deadline."""
        replies = plan.replies
        final = plan.flow
        wakes = ctx._wakes  # noqa: SLF001 - the router reads what the context staged
        if wakes:
            await self._schedule(ctx.user_id, min(wakes))
        started = ctx._next_flow  # noqa: SLF001 - the router reads what the context staged
        if started is not None:
            final, screen = await self._begin(started, ctx, now)
            replies = [*replies, screen]
        if isinstance(final, _Keep):
            return replies
        active = doc.get(self.flow_field)
        if final is None:
            if active is not None:
                claim.update({self.flow_field: None})
            return replies
        patch = diff(active, final) if isinstance(active, dict) else final
        if patch:
            claim.update({self.flow_field: patch})
        deadline = self._next_deadline(final)
        if deadline is not None:
            await self._schedule(ctx.user_id, deadline[1])
        return replies

    async def _plan(  # noqa: C901, PLR0911 - a rule each
        self, ctx: Context[DepsT], doc: dict[str, Any], message: Message, now: float
    ) -> _Plan:
        authenticated = ctx.authenticated
        answer = message.answer if message.is_text else ""
        word = answer.casefold()
        active = doc.get(self.flow_field)
        if message.is_text and word in self.greetings:
            return _Plan(None if active is not None else KEEP, [self._home(ctx)])
        if isinstance(active, dict):
            flow_cls = self.flows.get(str(active.get("name")))
            if flow_cls is None:
                return _Plan(None, [self._home(ctx)])
            ctx.flow = flow_cls.name
            ctx.step = str(active.get("step"))
            ctx.data = dict(active.get("data") or {})
            timeout = flow_cls.timeout
            if timeout is not None and now - _at(active, now) > timeout.total_seconds():
                return await self._expire(flow_cls, ctx)
            return await self._continue(flow_cls, active, message, ctx, now)
        if message.kind == "reaction":
            return _Plan(KEEP, [])
        if not message.is_text:
            return _Plan(KEEP, [self._home(ctx)])
        index = self._index(ctx.language)
        item = index.get(word)
        if item is None or not item.visible(authenticated):
            return _Plan(KEEP, [self._home(ctx)])
        if item.needs_auth and not authenticated:
            login = Text(ctx.t(self.login_first_text))
            return _Plan(KEEP, [login, self.auth_menu.screen(ctx.t, authenticated=False)])
        if item.submenu is not None:
            return _Plan(KEEP, [item.submenu.screen(ctx.t, authenticated=authenticated)])
        if item.handler is not None:
            return _Plan(KEEP, await _replies(item.handler(ctx)))
        assert item.flow is not None
        state, screen = await self._begin(item.flow, ctx, now)
        return _Plan(state, [screen], "started", item.flow.name, item.flow.first)

    async def _begin(
        self, flow_cls: type[Flow], ctx: Context[DepsT], now: float
    ) -> tuple[dict[str, Any], Screen]:
        first = flow_cls.steps[flow_cls.first]
        ctx.flow, ctx.step, ctx.data = flow_cls.name, first.name, {}
        state = {"name": flow_cls.name, "step": first.name, "data": {}, "history": [],
                 "attempts": 0, "at": now}  # fmt: skip
        return state, await first.render(ctx)

    async def _expire(self, flow_cls: type[Flow], ctx: Context[DepsT]) -> _Plan:
        flow = flow_cls(ctx)
        replies = await _replies(await flow.run_hook("on_timeout", ctx))
        if not replies:
            replies = [Text(ctx.t(self.expired_text)), self._home(ctx)]
        return _Plan(None, replies, "expired", flow_cls.name, ctx.step or "")

    async def _continue(  # noqa: C901, PLR0911 - one branch per command and outcome
        self,
        flow_cls: type[Flow],
        active: dict[str, Any],
        message: Message,
        ctx: Context[DepsT],
        now: float,
    ) -> _Plan:
        steps = flow_cls.steps
        data = ctx.data
        history: list[str] = [h for h in active.get("history") or [] if h in steps]
        step = steps.get(str(active.get("step")))
        word = message.answer.casefold() if message.is_text else ""
        flow = flow_cls(ctx)
        name = flow_cls.name

        def moved(target: Step) -> dict[str, Any]:
            ctx.step = target.name
            state = {**active, "step": target.name, "data": data, "history": history,
                     "attempts": 0, "at": now}  # fmt: skip
            state.pop("reminded", None)
            return state

        def restarted() -> dict[str, Any]:
            data.clear()
            history.clear()
            return moved(steps[flow_cls.first])

        if step is None or word in flow_cls.restart_words:
            state = restarted()
            return _Plan(
                state, [await steps[flow_cls.first].render(ctx)], "restarted", name, ctx.step or ""
            )
        if word in flow_cls.cancel_words:
            replies = await _replies(await flow.run_hook("on_cancel", ctx))
            return _Plan(None, replies, "cancelled", name, step.name)
        if word in flow_cls.back_words:
            if not history:
                return _Plan(KEEP, [await step.render(ctx)], "back", name, step.name)
            previous = steps[history.pop()]
            data.pop(previous.key or previous.name, None)
            state = moved(previous)
            return _Plan(state, [await previous.render(ctx)], "back", name, previous.name)
        verdict = await step.accept(message, ctx)
        if not verdict.ok:
            error = Text(verdict.error)
            if not verdict.counts:
                return _Plan(KEEP, [error, await step.render(ctx)], "invalid", name, step.name)
            attempts = int(active.get("attempts", 0)) + 1
            if attempts < step.max_attempts:
                state = {**active, "attempts": attempts, "at": now}
                state.pop("reminded", None)
                return _Plan(state, [error, await step.render(ctx)], "invalid", name, step.name)
            if step.on_too_many == "restart":
                state = restarted()
                screen = await steps[flow_cls.first].render(ctx)
                return _Plan(state, [error, screen], "restarted", name, step.name)
            replies = await _replies(await flow.run_hook("on_cancel", ctx))
            return _Plan(None, [error, *replies], "cancelled", name, step.name)
        data[step.key or step.name] = verdict.value
        target = await step.target(verdict.value, ctx)
        if target == DONE:
            replies = await _replies(await flow.run_hook("on_complete", ctx))
            return _Plan(None, replies, "completed", name, step.name)
        history.append(step.name)
        state = moved(steps[target])
        return _Plan(state, [await steps[target].render(ctx)], "answered", name, step.name)

    # -- deadlines -------------------------------------------------------------------

    def _next_deadline(self, active: Mapping[str, Any]) -> tuple[str, int] | None:
        """The active flow's next event and its time (Unix ms), or ``None``."""
        flow_cls = self.flows.get(str(active.get("name")))
        if flow_cls is None:
            return None
        at = _at(active, math.nan)
        if math.isnan(at):
            return None
        timeout = self._timeout_ms(flow_cls, at)
        if flow_cls.reminder is not None and not active.get("reminded"):
            remind = _ms(at + flow_cls.reminder.total_seconds())
            if timeout is None or remind < timeout:
                return "reminder", remind
        if timeout is not None:
            return "timeout", timeout
        return None

    def _due_event(self, active: Any, now_ms: int) -> tuple[str, int] | None:
        """The flow's next event; its timeout if a late collection finds both due."""
        if not isinstance(active, dict):
            return None
        event = self._next_deadline(active)
        flow_cls = self.flows.get(str(active.get("name")))
        if event is None or flow_cls is None or event[0] != "reminder":
            return event
        timeout = self._timeout_ms(flow_cls, _at(active, math.nan))
        if timeout is not None and timeout <= now_ms:
            return "timeout", timeout  # no reminder for a flow that is already dead
        return event

    @staticmethod
    def _timeout_ms(flow_cls: type[Flow], at: float) -> int | None:
        """When an idle flow has timed out: 1 ms after ``at + timeout`` ("idle longer than")."""
        if flow_cls.timeout is None:
            return None
        return _ms(at + flow_cls.timeout.total_seconds()) + 1

    @property
    def _backend(self) -> Any:
        return self.service.manager.backend

    def _indexed(self) -> bool:
        return isinstance(self._backend, DeadlineIndex | AsyncDeadlineIndex)

    async def _schedule(self, user_id: str, at_ms: int, *, exact: bool = False) -> None:
        if self._indexed():
            await _call(self._backend.schedule, user_id, at_ms, earlier_only=not exact)

    async def _unschedule(self, user_id: str) -> None:
        if self._indexed():
            await _call(self._backend.unschedule, user_id)

    async def due_with(
        self, state: _StateLike, now: float | None, limit: int
    ) -> list[tuple[str, list[Screen]]]:
        """Fire every due reminder, timeout and scheduled message, each once across processes."""
        self._check_indexed()
        _check_limit(limit)
        now = self._now(now)
        entries = await _call(self._backend.due, _ms(now), limit)
        fired: list[tuple[str, list[Screen]]] = []
        for user_id, at_ms in entries:
            try:
                got = await self._fire_due(
                    state, user_id, int(at_ms), now, keep=False, resend=False
                )
            except UserBusyError:
                continue  # handling a message of theirs; it stays due
            except Exception:
                log.exception("a due reminder or timeout of user %r failed; it stays due", user_id)
                continue
            fired.extend((user_id, p.replies) for p in got.parcels if p.replies)
        return fired

    def _check_indexed(self) -> None:
        if not self._indexed():
            raise UsageError(
                f"{type(self._backend).__name__} keeps no deadline index "
                "(schedule, unschedule, due); "
                "timeouts still apply at the user's next message"
            )

    def _now(self, now: object) -> float:
        if now is not None and (
            isinstance(now, bool) or not isinstance(now, int | float) or not 0 <= now < 1e11
        ):
            raise UsageError(f"now must be Unix seconds (a finite number), not {now!r}")
        return self.clock() if now is None else float(now)

    def _stale_outbox(self, doc: Mapping[str, Any], now_ms: int) -> list[_Parcel]:
        """Stored replies unacknowledged for ``resend_after``, oldest first."""
        if self.resend_after_ms is None:
            return []
        box = self._outbox(doc)
        keys = [k for k, e in box.items() if _entry_at(e) + self.resend_after_ms <= now_ms]
        keys.sort(key=lambda k: _entry_at(box[k]))
        parcels = [
            _Parcel(k, [screen_from_json(r) for r in _entry_replies(box[k])], stored=True)
            for k in keys
        ]
        return [p for p in parcels if p.replies] + [
            _Parcel(p.key, [], stored=True) for p in parcels if not p.replies
        ]

    async def _fire(self, state: _StateLike, user_id: str, at_ms: int, now: float) -> list[Screen]:
        """Fire what is due for the user at most once; the replies to send."""
        fired = await self._fire_due(state, user_id, at_ms, now, keep=False, resend=False)
        return [r for p in fired.parcels for r in p.replies]

    async def _fire_due(  # noqa: C901, PLR0912, PLR0915 - one branch per kind of deadline
        self,
        state: _StateLike,
        user_id: str,
        at_ms: int,
        now: float,
        *,
        keep: bool,
        resend: bool,
    ) -> _Fired:
        """Under the user's claim: fire what is due, and collect replies to resend.

        ``keep``: the new replies are committed into the outbox and the claim is
        held until :meth:`_close_fired` acknowledges them (at least once);
        otherwise they are committed as sent (at most once). ``resend``: replies
        stored longer than ``resend_after`` come back too, to send and
        acknowledge. An entry whose user has nothing due (no document any more:
        expired or erased) is moved to their next deadline or removed.
        """
        now_ms = _ms(now)
        claim = await state.claim(
            user_id, f"deadline-{at_ms}", purpose=DEADLINE_PURPOSE, lease=self.lease, wait=0
        )
        if claim.duplicate:  # fired by another process: look again at what is due now
            claim = await state.claim(
                user_id, None, purpose=DEADLINE_PURPOSE, lease=self.lease, wait=0
            )
        try:
            doc = claim.data
            resends = self._stale_outbox(doc, now_ms) if resend else []
            active = doc.get(self.flow_field)
            flow_cls = self.flows.get(str(active.get("name"))) if isinstance(active, dict) else None
            event = self._due_event(active, now_ms) if flow_cls is not None else None
            if event is not None and event[1] > now_ms:
                event = None  # the index was early: the flow moved on since
            sched = due_scheduled(doc, self.scheduled_field, now_ms)
            if event is None and not sched:
                following = (
                    self._next_deadline(active)
                    if flow_cls is not None and isinstance(active, dict)
                    else None
                )
                await self._reschedule(user_id, doc, now_ms, following and following[1])
                if not resends:
                    await claim.release()
                    return _Fired(user_id, [], None)
                return _Fired(user_id, resends, claim)
            events = [f"{key}@{at}" for key, at, _s, _f in sched]
            message_id = f"scheduled-{sched[0][0]}-{sched[0][1]}" if sched else ""
            if event is not None:
                events.append(f"{event[0]}-{event[1]}")
                message_id = f"deadline-{event[1]}"
            message = Message(user_id, message_id=message_id, timestamp=now)
            ctx = self._context(message, doc, claim, now)
            replies: list[Screen] = [s for _k, _a, screens, _f in sched for s in screens]
            starts = [self.flows[f] for _k, _a, _s, f in sched if f in self.flows]
            if sched:
                claim.update({self.scheduled_field: dict.fromkeys(k for k, *_ in sched)})
            plan = _Plan(KEEP, [])
            following_at: int | None = None
            if isinstance(active, dict) and flow_cls is not None:
                ctx.flow, ctx.step = flow_cls.name, str(active.get("step"))
                ctx.data = dict(active.get("data") or {})
                if event is None:
                    nxt = self._next_deadline(active)
                    following_at = None if nxt is None else nxt[1]
                elif event[0] == "timeout":
                    plan = await self._expire(flow_cls, ctx)
                else:
                    flow = flow_cls(ctx)
                    got = await _replies(await flow.run_hook("on_reminder", ctx))
                    if not got:
                        step = flow_cls.steps.get(ctx.step)
                        got = [Text(ctx.t(self.reminder_text))]
                        if step is not None:
                            got.append(await step.render(ctx))
                    reminded = {**active, "reminded": True}
                    plan = _Plan(reminded, got, "reminded", flow_cls.name, ctx.step or "")
                    nxt = self._next_deadline(reminded)
                    following_at = None if nxt is None else nxt[1]
            # Held (at least once, or resends): the index moves after the commit, under the
            # claim, so a process killed in between leaves it early, never late.
            held = keep or bool(resends)
            if not held:
                fired_keys = [k for k, *_ in sched]
                await self._reschedule(user_id, doc, now_ms, following_at, fired=fired_keys)
            if starts and ctx._next_flow is None:  # noqa: SLF001 - the router's own staging
                ctx._next_flow = starts[-1]  # noqa: SLF001
            plan.replies = [*replies, *plan.replies]
            sent = await self._settle(ctx, doc, plan, now, claim)
            key = event_key(events)
            stored = keep and bool(sent)
            if stored:
                await self._stage_outbox(state, claim, doc=doc, key=key, replies=sent, now=now)
            hold = stored or bool(resends)
            if held:
                outcome = await claim.commit(keep=True)
                if outcome.status != "duplicate":
                    await self._reschedule_after(state, user_id, outcome, now_ms)
                if not hold:
                    await claim.release()
            else:
                outcome = await claim.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await claim.release()
            with contextlib.suppress(Exception):
                await self._schedule(user_id, at_ms)  # it stays due
            raise
        if outcome.status == "duplicate":
            return _Fired(user_id, [], None)  # a handler that took over a lapsed claim did it
        if plan.outcome is not None:
            observe.notify_flow_step(plan.flow_name, plan.step_name, plan.outcome)
        parcels = [*resends, _Parcel(key, sent, stored=stored)] if sent else resends
        return _Fired(user_id, parcels, claim if hold else None)

    async def _reschedule_after(
        self, state: _StateLike, user_id: str, outcome: Outcome, now_ms: int
    ) -> None:
        """Index the user's next wake-up from the document just committed (still claimed)."""
        del outcome  # a backend may answer a write without the document (Redis does)
        doc = await state.get(user_id)
        active = doc.get(self.flow_field)
        following = self._next_deadline(active) if isinstance(active, dict) else None
        await self._reschedule(user_id, doc, now_ms, following and following[1])

    async def _close_fired(self, fired: _Fired, sent: list[str]) -> None:
        """Acknowledge the stored replies that were sent; the rest stay for a resend."""
        claim = fired.claim
        if claim is None:
            return
        fired.claim = None
        if not sent:
            await claim.release()
            return
        claim.update({self.outbox_field: dict.fromkeys(sent)})
        try:
            await claim.commit()
        except ClaimLostError:
            log.warning("user %r was taken over before the acknowledgement", fired.user_id)

    async def due_one(  # noqa: C901 - each failure has its own handling
        self, state: _StateLike, user_id: str, at_ms: int, deliver: _Sender, *, keep: bool
    ) -> bool:
        """One index entry of :meth:`run_due`: fire, send each parcel, acknowledge.

        Returns False when the entry could not be handled now (busy, failed).
        """
        resend = self.resend_after_ms is not None
        # One message's turn of the rate before the user is claimed (most due entries
        # send one): a claimed user waiting for the rate could not answer meanwhile.
        # A turn that goes unused (a busy user, nothing to send) is given back.
        await deliver.pace(1)
        fired: _Fired | None = None
        try:
            fired = await self._fire_due(
                state, user_id, at_ms, self.clock(), keep=keep, resend=resend
            )
        except UserBusyError:
            return False
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("a due reminder or timeout of user %r failed; it stays due", user_id)
            return False
        finally:
            if fired is None or not any(parcel.replies for parcel in fired.parcels):
                deliver.give_back(1)
        paced = 1
        sent: list[str] = []
        ok = True
        try:
            for parcel in fired.parcels:
                if parcel.replies:
                    ident = identity(user_id, parcel.key)
                    await deliver(user_id, parcel.replies, ident, paced=paced)
                    paced = 0
                if parcel.stored:
                    sent.append(parcel.key)
        except asyncio.CancelledError:
            await self._close_fired(fired, sent)
            raise
        except Exception:
            ok = False
            log.exception("sending due replies to user %r failed", user_id)
        try:
            await self._close_fired(fired, sent)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("acknowledging the replies sent to user %r failed", user_id)
        return ok

    async def broadcast_one(
        self,
        state: _StateLike,
        broadcast_id: str,
        user_id: str,
        screens: list[Screen],
        deliver: _Sender,
    ) -> str:
        """One user of a broadcast: ``"sent"``, ``"skipped"`` (had it) or ``"failed"``.

        The rate's turn is taken after a read says the user gets it and before
        they are claimed, so a user is never held while the rate holds their send.
        """
        key = f"broadcast:{broadcast_id}"
        if not self._gets_broadcast(await state.get(user_id), broadcast_id, key):
            return "skipped"
        await deliver.pace(len(screens))
        try:
            claim = await state.claim(
                user_id, None, purpose=ROUTER_PURPOSE, lease=self.lease, wait=self.wait
            )
        except BaseException:
            deliver.give_back(len(screens))
            raise
        try:
            doc = claim.data
            if not self._gets_broadcast(doc, broadcast_id, key):  # sent since the read
                deliver.give_back(len(screens))
                await claim.release()
                return "skipped"
            seen = doc.get(self.broadcast_field)
            seen = seen if isinstance(seen, dict) else {}
            if broadcast_id in seen:  # resumed: the replies stored then
                replies = [screen_from_json(r) for r in _entry_replies(self._outbox(doc)[key])]
            else:
                now = self.clock()
                patch: dict[str, Any] = {broadcast_id: _ms(now)}
                oldest = sorted(seen, key=lambda b: _entry_at([seen[b]]))
                for old in oldest[: max(0, len(seen) + 1 - KEPT_BROADCASTS)]:
                    patch[old] = None
                claim.update({self.broadcast_field: patch})
                replies = screens
                await self._stage_outbox(state, claim, doc=doc, key=key, replies=replies, now=now)
                await claim.commit(keep=True)
        except BaseException:
            with contextlib.suppress(Exception):
                await claim.release()
            raise
        fired = _Fired(user_id, [], claim)
        try:
            await deliver(user_id, replies, identity(user_id, key), paced=len(screens))
        except asyncio.CancelledError:
            await self._close_fired(fired, [])
            raise
        except Exception:
            log.exception("broadcast %r: sending to user %r failed", broadcast_id, user_id)
            await self._close_fired(fired, [])
            return "failed"
        await self._close_fired(fired, [key])
        return "sent"

    def _gets_broadcast(self, doc: Mapping[str, Any], broadcast_id: str, key: str) -> bool:
        """Whether a user whose document is ``doc`` is sent the broadcast now (read unclaimed)."""
        seen = doc.get(self.broadcast_field)
        return not (isinstance(seen, dict) and broadcast_id in seen) or key in self._outbox(doc)

    # -- scheduled messages --------------------------------------------------------

    async def schedule_with(  # noqa: PLR0917 - the public method's arguments, in order
        self,
        state: _StateLike,
        user_id: str,
        key: str,
        at: float | datetime,
        replies: Any,
        start: type[Flow] | str | None,
    ) -> None:
        """Store (or move) the scheduled message ``key`` under the user's claim, and index it."""
        self._check_indexed()
        if not isinstance(user_id, str) or not user_id:  # type: ignore[redundant-expr]  # callers may be untyped
            raise UsageError("schedule() takes a user id (a non-empty str)")
        entry = scheduled_entry(key, at, replies, start, self.flows)
        claim = await state.claim(
            user_id, None, purpose=ROUTER_PURPOSE, lease=self.lease, wait=self.wait
        )
        try:
            claim.update({self.scheduled_field: {key: entry}})
            await self._schedule(user_id, entry[0])
            await claim.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await claim.release()
            raise

    async def cancel_with(self, state: _StateLike, user_id: str, key: str) -> bool:
        """Remove the scheduled message ``key``; False when there was none."""
        check_key(key, "a scheduled message's key")
        claim = await state.claim(
            user_id, None, purpose=ROUTER_PURPOSE, lease=self.lease, wait=self.wait
        )
        try:
            if key not in stored_scheduled(claim.data, self.scheduled_field):
                await claim.release()
                return False
            claim.update({self.scheduled_field: {key: None}})
            await claim.commit()
        except BaseException:
            with contextlib.suppress(Exception):
                await claim.release()
            raise
        return True  # the index entry, if it was this one's, fires nothing and moves on

    async def scheduled_with(self, state: _StateLike, user_id: str) -> dict[str, float]:
        """The user's scheduled messages: key to Unix seconds."""
        found = stored_scheduled(await state.get(user_id), self.scheduled_field)
        return {k: e[0] / 1000 for k, e in sorted(found.items(), key=lambda i: i[1][0])}

    # -- sending at scale (run_due, broadcast) ---------------------------------------

    def _sending_options(  # noqa: PLR0917 - run_due's options, checked in one place
        self,
        send: object,
        interval: object,
        limit: object,
        concurrency: object,
        rate: object,
        delivery: object,
    ) -> tuple[bool, RateLimit | None, bool]:
        """Check ``run_due``'s arguments; return (send takes identity, rate limit, keep)."""
        _check_run_due(send, interval, limit)
        check_sending(concurrency, delivery)
        limiter = rate_limit(rate)
        self._check_indexed()
        if delivery == "at-least-once" and self.resend_after_ms is None:
            raise UsageError(
                "delivery='at-least-once' resends what a killed process left unacknowledged "
                "after resend_after: build the router with resend_after"
            )
        assert callable(send)
        keyed = takes_identity(send)
        check_send(send, keyed, "run_due")
        return keyed, limiter, delivery == "at-least-once"

    def _broadcast_options(  # noqa: PLR0917 - broadcast's arguments, checked in one place
        self,
        broadcast_id: object,
        replies: object,
        send: object,
        concurrency: object,
        rate: object,
        users: object,
        on_progress: object,
    ) -> tuple[list[Screen], bool, RateLimit | None]:
        check_key(broadcast_id, "a broadcast id")
        screens = [screen_from_json(s) for s in screens_of(replies)]
        if not screens:
            raise UsageError("a broadcast needs replies to send")
        if not callable(send):
            raise UsageError("broadcast takes send(user_id, replies), a function")
        check_sending(concurrency, "at-least-once")
        keyed = takes_identity(send)
        check_send(send, keyed, "broadcast")
        check_progress(on_progress)
        if isinstance(users, Collection) and not isinstance(users, str):
            # A list given whole is checked before anyone is sent anything (an iterator
            # is read as the broadcast goes: a bad id in it counts as failed).
            check = self.service.manager.user_id
            for user_id in users:
                try:
                    check(user_id)
                except InvalidUserIdError as exc:
                    raise InvalidUserIdError(f"broadcast users: {exc}") from None
        return screens, keyed, rate_limit(rate)

    async def fresh_due(self, exclude: set[str], limit: int) -> list[tuple[str, int]]:
        """Due index entries of users not in ``exclude`` (``[]`` if the store failed; logged)."""
        try:
            entries = await _call(self._backend.due, _ms(self.clock()), limit + len(exclude))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("collecting due deadlines failed; trying again")
            return []
        return [(u, int(a)) for u, a in entries if u not in exclude][:limit]


def _resting(resting: dict[str, float]) -> set[str]:
    """Users whose last due handling failed less than an interval ago (pruned as it reads)."""
    now = time.monotonic()
    for user_id in [u for u, until in resting.items() if until <= now]:
        del resting[user_id]
    return set(resting)


class Router(_RouterCore[DepsT]):
    """Routes messages for a :class:`~chatstate.StateService` (sync callables only).

    Args:
        service: Where users' state lives (a :class:`~chatstate.StateService`).
        main_menu: The menu of a logged-in user (and of everyone if there is no
            ``auth_menu``).
        auth_menu: The menu of a user who has not logged in.
        flows: Flows that no menu starts (a hook starts them with ``ctx.start``).
        deps: Your bot's own services (an API client, a database): every
            callable reaches them as ``ctx.deps``.
        greetings: Words that show the menu (and drop an active flow).
        is_authenticated: Decides from the state document; by default, a
            non-empty ``token_field``.
        token_field: See ``is_authenticated``; by default the service rules'
            ``token_field``.
        flow_field: The top-level state field holding the active flow's progress.
        language_field: The state field holding the user's language code.
        default_language: The language of users with none stored (and of texts
            with no translation).
        translations: Language code to catalogue (a mapping of texts, or a
            gettext translations object), or a function ``(text, language)``.
        expired_text: Sent when an idle flow has timed out.
        login_first_text: Sent when a logged-out user picks an item that needs a login.
        reminder_text: Sent (with the current prompt) when a flow's reminder is due.
        clock: Unix seconds, for messages without a timestamp and for :meth:`due`.
        lease: A message's claim lapses after this long if its handler dies.
        wait: How long a message waits while another message of the user is handled.
        outbox_field: The top-level field where :meth:`deliver` keeps replies.
        resend_after: Replies unacknowledged this long are resent (``None``: never).
        scheduled_field: The top-level field holding scheduled messages.
        broadcast_field: The top-level field recording the broadcasts a user got.

    Raises:
        UsageError: the service is an :class:`~chatstate.AsyncStateService`, an
            option is wrong, or a flow, menu handler or translation function is async.
        InvalidScreenError: a menu or a translated prompt breaks WhatsApp's limits.
    """

    _sync = True
    service: StateService

    def _check_service(self, service: Any) -> None:
        if isinstance(service, AsyncStateService) or not isinstance(service, StateService):
            raise UsageError(
                f"Router takes a StateService, not {type(service).__name__}; "
                "use AsyncRouter with an AsyncStateService"
            )
        self._state = SyncServiceAsAsync(service)

    def handle(self, message: Message) -> list[Screen]:
        """Handle one message and return the replies to send (nothing for a redelivery).

        The replies are not kept: a process that dies after this returns and
        before they are sent loses them. :meth:`deliver` keeps them until
        they are acknowledged sent.
        """
        return run_sync(self.handle_with(self._state, message))

    def deliver(self, message: Message) -> Delivery:
        """Handle one message; its replies are kept in the store until acknowledged sent.

        Use it as a context manager around the send::

            with router.deliver(message) as delivery:
                for screen in delivery.replies:
                    send(message.user_id, screen)

        Entering handles the message, exactly once; leaving the block normally
        acknowledges the replies; an exception leaves them stored for the
        redelivery (see :class:`~chatstate.flow.AsyncDelivery`).

        Raises:
            UsageError: ``message`` is not a :class:`Message` (raised on entering).
        """
        return Delivery(self, str(getattr(message, "user_id", "")), message)

    def undelivered(self, now: float | None = None, *, limit: int = 100) -> list[Delivery]:
        """Replies stored longer than ``resend_after`` and not acknowledged, to send now.

        For platforms that never redeliver a message (a poller that confirmed
        its offset): call it every few seconds, send each delivery's replies in
        a ``with`` block, which acknowledges them. Entering the block claims
        the user (holding them until it ends). See :meth:`AsyncRouter.undelivered`.

        Raises:
            UsageError: the backend keeps no deadline index, or ``resend_after`` is None.
        """
        _check_limit(limit)
        found = run_sync(self.undelivered_with(self._state, now, limit))
        return [Delivery(self, user_id, None, keys=keys) for user_id, keys in found]

    def due(self, now: float | None = None, *, limit: int = 100) -> list[tuple[str, list[Screen]]]:
        """Fire due reminders and timeouts; return ``(user_id, replies)`` to send.

        Each fires once across every process calling ``due``; call it every
        second or so from one thread or a scheduler. A user busy with a message
        is skipped (the message moves the deadline).

        Raises:
            UsageError: the backend keeps no deadline index.
        """
        return run_sync(self.due_with(self._state, now, limit))

    def schedule(
        self,
        user_id: str,
        key: str,
        at: float | datetime,
        replies: Any = None,
        *,
        start: type[Flow] | str | None = None,
    ) -> None:
        """Send ``replies`` to the user at ``at`` (and start the flow ``start``), once.

        Independent of flows: it is stored in the user's document (under
        ``scheduled_field``), so it survives restarts and goes with
        ``erase()``, and indexed in the backend's deadline index;
        :meth:`due` and :meth:`run_due` fire it once across processes, under
        the user's claim, removing it in the write that records its replies.
        Scheduling ``key`` again moves it (or replaces what it says). Inside a
        step or hook, ``ctx.schedule(...)`` does the same in that step's write.

        Args:
            user_id: Whose message.
            key: Your name for it (at most 200 characters), to move or cancel it.
            at: An aware :class:`~datetime.datetime`, or Unix seconds (on the
                router's clock). A time in the past fires at the next round.
            replies: A text, a screen, or a list of them (sent as they are: not
                translated).
            start: A flow (known to the router) to start when it fires; its
                first prompt follows the replies. An active flow is replaced.

        Raises:
            UsageError: a bad argument, or a backend without a deadline index.
            UserBusyError: a message of the user was still being handled after ``wait``.
        """
        run_sync(self.schedule_with(self._state, user_id, key, at, replies, start))

    def cancel_scheduled(self, user_id: str, key: str) -> bool:
        """Cancel the user's scheduled message ``key``; False when there was none (or it fired)."""
        return run_sync(self.cancel_with(self._state, user_id, key))

    def scheduled(self, user_id: str) -> dict[str, float]:
        """The user's scheduled messages, earliest first: key to Unix seconds."""
        return run_sync(self.scheduled_with(self._state, user_id))

    def run_due(  # noqa: C901 - the thread pool's loop and its stop
        self,
        send: Callable[..., Any],
        *,
        interval: float = 1.0,
        limit: int = 100,
        concurrency: int = DEFAULT_CONCURRENCY,
        rate: float | RateLimit | None = None,
        delivery: DeliveryMode = "at-most-once",
        stop: threading.Event | None = None,
    ) -> None:
        """Fire due reminders, timeouts and scheduled messages and resend, until ``stop`` is set.

        The sync twin of :meth:`AsyncRouter.run_due` (the same options), on
        ``concurrency`` threads: ``send(user_id, replies)`` (with
        ``identity=...`` when it has that parameter) is called from those
        threads. Blocks the calling thread; set ``stop`` (a
        :class:`threading.Event`) to end it after the sends in flight.

        Raises:
            UsageError: a bad argument, an async ``send``, or no deadline index.
        """
        keyed, limiter, keep = self._sending_options(
            send, interval, limit, concurrency, rate, delivery
        )
        if is_async(send):
            raise UsageError("the sync Router's run_due takes a sync send; use AsyncRouter")
        if stop is not None and not isinstance(stop, threading.Event):
            raise UsageError("stop takes a threading.Event")
        stop = stop or threading.Event()
        deliver = _Sender(send, keyed, limiter, sync=True)
        slots = threading.BoundedSemaphore(concurrency)
        lock = threading.Lock()
        busy: set[str] = set()
        resting: dict[str, float] = {}

        def one(user_id: str, at_ms: int) -> None:
            ok = False
            try:
                ok = run_sync(self.due_one(self._state, user_id, at_ms, deliver, keep=keep))
            except Exception:
                log.exception("a due deadline of user %r failed", user_id)
            finally:
                with lock:
                    busy.discard(user_id)
                    if not ok:
                        resting[user_id] = time.monotonic() + interval
                slots.release()

        with ThreadPoolExecutor(concurrency, thread_name_prefix="chatstate-due") as pool:
            while not stop.is_set():
                with lock:
                    exclude = busy | _resting(resting)
                fresh = run_sync(self.fresh_due(exclude, limit))
                for user_id, at_ms in fresh:
                    while not slots.acquire(timeout=0.05):
                        if stop.is_set():
                            return
                    with lock:
                        busy.add(user_id)
                    pool.submit(one, user_id, at_ms)
                if len(fresh) < limit:
                    stop.wait(interval)

    def broadcast(
        self,
        broadcast_id: str,
        replies: Any,
        send: Callable[..., Any],
        *,
        users: Iterable[str] | None = None,
        prefix: str = "",
        concurrency: int = DEFAULT_CONCURRENCY,
        rate: float | RateLimit | None = None,
        on_progress: Callable[[BroadcastProgress], Any] | None = None,
    ) -> BroadcastProgress:
        """Send ``replies`` to every user once; see :meth:`AsyncRouter.broadcast`.

        Sends on ``concurrency`` threads; ``on_progress`` is called from them,
        one at a time.
        """
        screens, keyed, limiter = self._broadcast_options(
            broadcast_id, replies, send, concurrency, rate, users, on_progress
        )
        if is_async(send) or (on_progress is not None and is_async(on_progress)):
            raise UsageError("the sync Router's broadcast takes sync functions; use AsyncRouter")
        source: Iterable[str] = self.service.users(prefix) if users is None else _user_ids(users)
        deliver = _Sender(send, keyed, limiter, sync=True)
        progress = BroadcastProgress(broadcast_id)
        lock = threading.Lock()
        slots = threading.BoundedSemaphore(concurrency)

        def one(user_id: str) -> None:
            try:
                outcome = run_sync(
                    self.broadcast_one(self._state, broadcast_id, user_id, screens, deliver)
                )
            except Exception:
                log.exception("broadcast %r: user %r failed", broadcast_id, user_id)
                outcome = "failed"
            finally:
                slots.release()
            with lock:
                setattr(progress, outcome, getattr(progress, outcome) + 1)
                if on_progress is not None:
                    on_progress(progress)

        futures: list[Future[None]] = []
        with ThreadPoolExecutor(concurrency, thread_name_prefix="chatstate-broadcast") as pool:
            seen: set[str] = set()
            for user_id in source:
                if user_id in seen:
                    continue
                seen.add(user_id)
                with lock:
                    progress.total += 1
                slots.acquire()
                futures.append(pool.submit(one, user_id))
        for future in futures:
            future.result()  # an on_progress error surfaces here
        progress.done = True
        if on_progress is not None:
            on_progress(progress)
        return progress


def _user_ids(users: object) -> Iterable[str]:
    if isinstance(users, str) or not isinstance(users, Iterable):
        raise UsageError(f"users takes a collection of user ids, not {users!r}")
    return users


class _Sender:
    """Calls ``send`` for one user's replies, paced by the rate limit.

    :meth:`pace` may take the rate's tokens ahead, before the user is claimed
    (a user is never held while their send waits for the rate); the call
    then takes only those it was not given ahead.
    """

    __slots__ = ("keyed", "limiter", "send", "sync")

    def __init__(
        self, send: Callable[..., Any], keyed: bool, limiter: RateLimit | None, *, sync: bool
    ) -> None:
        self.send, self.keyed, self.limiter, self.sync = send, keyed, limiter, sync

    def give_back(self, screens: int) -> None:
        """Return turns :meth:`pace` took for messages that will not be sent."""
        if self.limiter is not None:
            self.limiter.give_back(screens)

    async def pace(self, screens: int) -> None:
        """Wait for the rate to allow ``screens`` more messages."""
        if self.limiter is None or screens <= 0:
            return
        if self.sync:
            self.limiter.acquire_sync(screens)
        else:
            await self.limiter.acquire(screens)

    async def __call__(
        self, user_id: str, replies: list[Screen], ident: str, *, paced: int = 0
    ) -> None:
        await self.pace(len(replies) - paced)
        send = self.send
        result = send(user_id, replies, identity=ident) if self.keyed else send(user_id, replies)
        if inspect.isawaitable(result):
            if self.sync:
                if inspect.iscoroutine(result):
                    result.close()  # never awaited: no "coroutine was never awaited" warning
                raise UsageError(
                    "send returned an awaitable, which the sync Router cannot await (its "
                    "replies were not sent): use AsyncRouter for an async send"
                )
            await result


def _check_limit(limit: object) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise UsageError(f"limit must be a positive int, not {limit!r}")


class AsyncRouter(_RouterCore[DepsT]):
    """The asyncio twin of :class:`Router` (same options); callables may be async."""

    service: AsyncStateService

    def _check_service(self, service: Any) -> None:
        if not isinstance(service, AsyncStateService):
            raise UsageError(
                f"AsyncRouter takes an AsyncStateService, not {type(service).__name__}; "
                "use Router with a StateService"
            )

    async def handle(self, message: Message) -> list[Screen]:
        """Handle one message and return the replies to send (nothing for a redelivery).

        The replies are not kept: see :meth:`deliver`.
        """
        return await self.handle_with(self.service, message)

    def deliver(self, message: Message) -> AsyncDelivery:
        """Handle one message; its replies are kept in the store until acknowledged sent.

        Use it as an asynchronous context manager around the send::

            async with router.deliver(message) as delivery:
                for screen in delivery.replies:
                    await send(message.user_id, screen)

        Entering handles the message, exactly once, and commits its step with
        its replies in one write; the user stays claimed (the lease renewed)
        until the block ends. Leaving it normally acknowledges the replies: they
        are dropped from the store and the user's next message may run. An
        exception leaves them stored and lets the user go: the redelivered
        message returns them again (``delivery.resent``) and runs nothing. A
        redelivery of an acknowledged message has no replies.

        Raises:
            UsageError: ``message`` is not a :class:`Message` (raised on entering).
            UserBusyError: another message of the user was still being handled
                after ``wait`` (on entering).
        """
        return AsyncDelivery(self, str(getattr(message, "user_id", "")), message)

    async def undelivered(
        self, now: float | None = None, *, limit: int = 100
    ) -> list[AsyncDelivery]:
        """Replies stored longer than ``resend_after`` and not acknowledged, to send now.

        A platform that redelivers an unanswered message (a webhook) gets them
        back through the redelivery. For one that never does (a Telegram
        poller that confirmed its offset), call this every few seconds, or let
        :meth:`run_due` do it. Nothing is claimed by the listing: entering a
        delivery's ``async with`` block claims its user (waiting up to ``wait``)
        and reads the replies still unacknowledged then (none, if another
        process sent them meanwhile); leaving it acknowledges them::

            for delivery in await router.undelivered():
                async with delivery:
                    if delivery.replies:  # none: another process sent them meanwhile
                        await send(delivery.user_id, delivery.replies)

        Uses the backend's deadline index (memory, SQLite and Redis keep one).

        Args:
            now: Unix seconds (the router's clock when omitted).
            limit: At most this many users.

        Raises:
            UsageError: the backend keeps no deadline index, or ``resend_after`` is None.
        """
        _check_limit(limit)
        found = await self.undelivered_with(self.service, now, limit)
        return [AsyncDelivery(self, user_id, None, keys=keys) for user_id, keys in found]

    async def due(
        self, now: float | None = None, *, limit: int = 100
    ) -> list[tuple[str, list[Screen]]]:
        """See :meth:`Router.due`."""
        return await self.due_with(self.service, now, limit)

    async def schedule(
        self,
        user_id: str,
        key: str,
        at: float | datetime,
        replies: Any = None,
        *,
        start: type[Flow] | str | None = None,
    ) -> None:
        """See :meth:`Router.schedule`."""
        await self.schedule_with(self.service, user_id, key, at, replies, start)

    async def cancel_scheduled(self, user_id: str, key: str) -> bool:
        """See :meth:`Router.cancel_scheduled`."""
        return await self.cancel_with(self.service, user_id, key)

    async def scheduled(self, user_id: str) -> dict[str, float]:
        """See :meth:`Router.scheduled`."""
        return await self.scheduled_with(self.service, user_id)

    async def run_due(
        self,
        send: Callable[..., Any],
        *,
        interval: float = 1.0,
        limit: int = 100,
        concurrency: int = DEFAULT_CONCURRENCY,
        rate: float | RateLimit | None = None,
        delivery: DeliveryMode = "at-most-once",
    ) -> None:
        """Fire due reminders, timeouts and scheduled messages forever, and resend what is owed.

        Run it as a task beside your web server (cancel it to stop: sends in
        flight are cancelled too). Each round reads up to ``limit`` due index
        entries and hands each to one of ``concurrency`` workers, which claims
        the user, fires what is due, calls ``await send(user_id, replies)``
        (``send(user_id, replies, identity=...)`` when ``send`` has a parameter
        named ``identity``), paced by ``rate``, and resends replies left
        unacknowledged for ``resend_after`` (by a crash, or a failed send).

        Args:
            send: Your platform call (sync or async). The identity is
                ``"<user id>:<key>"``, the same for every resend of the same
                replies: pass it as the platform's idempotency key.
            interval: Seconds between rounds when nothing more is due.
            limit: Index entries read per round (1 or more).
            concurrency: Sends in flight at once (1 to 10,000).
            rate: Messages (screens) a second for this process, a number or a
                shared :class:`RateLimit`; ``None``: no limit. Telegram allows a
                bot about 30, the WhatsApp Cloud API 80 per number by default.
            delivery: ``"at-most-once"``: fired replies are committed as sent,
                then sent; a process killed (or a ``send`` failing) loses them.
                ``"at-least-once"``: committed into the outbox first and
                acknowledged once ``send`` returned; a killed process's or a
                failed send's replies are resent after ``resend_after`` with the
                same identity (needs ``resend_after``).

        Raises:
            UsageError: a bad argument, or a backend without a deadline index.
        """
        keyed, limiter, keep = self._sending_options(
            send, interval, limit, concurrency, rate, delivery
        )
        deliver = _Sender(send, keyed, limiter, sync=False)
        slots = asyncio.Semaphore(concurrency)
        busy: set[str] = set()
        resting: dict[str, float] = {}
        tasks: set[asyncio.Task[None]] = set()

        async def one(user_id: str, at_ms: int) -> None:
            ok = False
            try:
                ok = await self.due_one(self.service, user_id, at_ms, deliver, keep=keep)
            finally:
                busy.discard(user_id)
                if not ok:
                    resting[user_id] = time.monotonic() + interval
                slots.release()

        try:
            while True:
                fresh = await self.fresh_due(busy | _resting(resting), limit)
                for user_id, at_ms in fresh:
                    await slots.acquire()
                    busy.add(user_id)
                    task = asyncio.create_task(one(user_id, at_ms))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if len(fresh) < limit:
                    await asyncio.sleep(interval)
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def broadcast(  # noqa: C901 - a sync or async source of user ids
        self,
        broadcast_id: str,
        replies: Any,
        send: Callable[..., Any],
        *,
        users: Iterable[str] | AsyncIterable[str] | None = None,
        prefix: str = "",
        concurrency: int = DEFAULT_CONCURRENCY,
        rate: float | RateLimit | None = None,
        on_progress: Callable[[BroadcastProgress], Any] | None = None,
    ) -> BroadcastProgress:
        """Send ``replies`` to each user once, rate-limited, resumable after a crash.

        Each user is claimed (waiting up to ``wait``); the broadcast id is
        recorded in their document (``broadcast_field``, the last 32 ids) with
        the replies in their outbox, in one write; then ``send`` is called and
        the replies acknowledged. Calling it again with the same id resumes: a
        user who had it is skipped, one whose send did not finish (a killed
        process, a failed send) gets the stored replies again with the same
        identity (``"<user id>:broadcast:<id>"``); ``run_due`` resends those
        too after ``resend_after``. Nobody gets it twice except a user whose
        send the platform accepted just before the process died (the identity
        lets the platform drop that repeat).

        Args:
            broadcast_id: Names the broadcast (at most 200 characters).
            replies: A text, a screen, or a list of them (not translated).
            send: As for :meth:`run_due` (sync or async; ``identity=`` if it takes it).
            users: The user ids; by default every user the backend lists
                (:meth:`AsyncStateService.users <chatstate.AsyncStateService.users>`).
            prefix: With ``users`` omitted: only ids starting with it.
            concurrency: Users handled at once (1 to 10,000).
            rate: Messages a second, or a shared :class:`RateLimit` (``None``: no limit).
            on_progress: Called (awaited if async) with the
                :class:`BroadcastProgress` after each user, and once more at
                the end, with ``done`` true.

        Returns:
            The counts: ``sent``, ``skipped``, ``failed``, ``total``.

        Raises:
            UsageError: a bad argument.
            ConfigurationError: ``users`` omitted over a backend that cannot list users.
        """
        screens, keyed, limiter = self._broadcast_options(
            broadcast_id, replies, send, concurrency, rate, users, on_progress
        )
        source: Iterable[str] | AsyncIterable[str] = (
            self.service.users(prefix) if users is None else users
        )
        if not isinstance(source, AsyncIterable):
            source = _user_ids(source)
        deliver = _Sender(send, keyed, limiter, sync=False)
        progress = BroadcastProgress(broadcast_id)
        slots = asyncio.Semaphore(concurrency)
        tasks: set[asyncio.Task[None]] = set()

        async def one(user_id: str) -> None:
            try:
                outcome = await self.broadcast_one(
                    self.service, broadcast_id, user_id, screens, deliver
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("broadcast %r: user %r failed", broadcast_id, user_id)
                outcome = "failed"
            finally:
                slots.release()
            setattr(progress, outcome, getattr(progress, outcome) + 1)
            if on_progress is not None:
                await _call(on_progress, progress)

        seen: set[str] = set()

        async def start(user_id: str) -> None:
            if user_id in seen:
                return
            seen.add(user_id)
            progress.total += 1
            await slots.acquire()
            task = asyncio.create_task(one(user_id))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        try:
            if isinstance(source, AsyncIterable):
                async for user_id in source:
                    await start(user_id)
            else:
                for user_id in source:
                    await start(user_id)
            await asyncio.gather(*tasks)
        finally:
            for task in list(tasks):
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        progress.done = True
        if on_progress is not None:
            await _call(on_progress, progress)
        return progress
